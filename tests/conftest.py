"""Suite-wide settings."""

import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from hypothesis import settings

from tests.mqtt_broker import Broker, start_broker
from tests.old_client import OldClient

# CI must be repeatable: property tests draw the same examples every run.
# Explore new ones locally with: ./run_tests.sh --hypothesis-profile=explore
settings.register_profile("repeatable", derandomize=True, print_blob=True)
settings.register_profile("explore", derandomize=False, max_examples=500)
settings.load_profile("repeatable")


# A Mosquitto of its own per test module (tests may stop and restart it), and a client
# written like the old ones; a module may override either.
@pytest.fixture(scope="module")
def broker() -> Iterator[Broker]:
    broker = start_broker()
    yield broker
    broker.stop()


@pytest.fixture
def client(broker: Broker) -> Iterator[OldClient]:
    client = OldClient(broker)
    yield client
    client.close()


# torch on one thread for a whole module; a module opts in with
# ``pytestmark = pytest.mark.usefixtures("one_torch_thread")``. The tiny test models gain
# nothing from threads, and on busy CI cores OpenMP threads only spin and contend.
@pytest.fixture(scope="module")
def one_torch_thread() -> Iterator[None]:
    import torch  # here, not at the top: most test modules never load torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# A test file of Triton kernel checks run in the Triton interpreter (CPU): a child pytest
# with TRITON_INTERPRET=1, because the interpreter is chosen when triton is first imported.
@pytest.fixture(scope="session")
def run_in_triton_interpreter() -> Callable[[str], None]:
    tests = Path(__file__).resolve().parent

    def run(name: str) -> None:
        env = {**os.environ, "TRITON_INTERPRET": "1"}
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tests / name)]
        proc = subprocess.run(cmd, cwd=tests.parent, env=env, capture_output=True, text=True,
                              timeout=300)
        assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]

    return run
