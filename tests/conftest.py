"""Suite-wide settings."""

from collections.abc import Iterator

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
