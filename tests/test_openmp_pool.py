"""Ending the calling thread's OpenMP team (``engine.openmp_pool``): it works on this torch
(libgomp), ends only a team, leaves torch working, and the engine still serves after
``start()`` released its caller's team and after its loop released its own when idle.

The thread checks run in a child process: they count the process's threads."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from engine import openmp_pool
from engine.openmp_pool import release_calling_thread_pool

REPO = Path(__file__).resolve().parents[1]
openmp = pytest.mark.skipif("OpenMP" not in torch.__config__.parallel_info(),
                            reason="this torch does not run on OpenMP")


@pytest.fixture
def two_threads() -> Iterator[None]:
    """A team needs more than one thread; the suite may have set one."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def _child(code: str) -> str:
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=REPO, capture_output=True,
                          text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


@openmp
def test_release_after_parallel_work_and_torch_still_works(two_threads: None) -> None:
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(768, 768, generator=gen), torch.randn(768, 768, generator=gen)
    expected = a @ b
    summed = (a * 2).sum(dim=1)  # an ATen parallel_for op as well as MKL's
    assert release_calling_thread_pool() is True
    assert release_calling_thread_pool() is True  # no team left: harmless
    assert torch.equal(a @ b, expected)  # the team comes back by itself
    assert torch.equal((a * 2).sum(dim=1), summed)
    for _ in range(3):  # release, work, release again
        assert release_calling_thread_pool() is True
        assert torch.equal(a @ b, expected)


@openmp
def test_release_on_another_thread_leaves_the_callers_team_working(two_threads: None) -> None:
    a = torch.randn(512, 512)
    expected = a @ a
    results: list[object] = []

    def worker() -> None:
        results.append(torch.equal(a @ a, expected))
        results.append(release_calling_thread_pool())
        results.append(torch.equal(a @ a, expected))

    thread = threading.Thread(target=worker)
    thread.start()
    thread.join(60)
    assert results == [True, True, True]
    assert torch.equal(a @ a, expected)


@openmp
def test_release_ends_the_team_and_it_comes_back() -> None:
    out = _child("""
        import os, time, torch
        from engine.openmp_pool import release_calling_thread_pool
        torch.set_num_threads(3)
        count = lambda: len(os.listdir("/proc/self/task"))
        a = torch.randn(4_000_000)  # an ATen parallel_for op (OpenMP), whatever MKL's threads
        def settled(want):
            deadline = time.monotonic() + 10
            while count() != want and time.monotonic() < deadline:
                time.sleep(0.01)
            return count()
        base = count()
        a.exp()
        with_team = count()
        assert release_calling_thread_pool()
        after = settled(with_team - 2)
        a.exp()
        again = count()
        print(base, with_team, after, again)
    """)
    base, with_team, after, again = map(int, out.split())
    assert with_team == base + 2  # a team of 3: two workers beside this thread
    assert after == with_team - 2  # ended
    assert again == with_team  # and made again by the next parallel op


@openmp
def test_the_library_is_the_one_torch_loaded() -> None:
    """A second copy of libgomp would have teams of its own: pausing it would free nothing."""
    out = _child("""
        import os, torch
        maps = open("/proc/self/maps").read()
        mapped = {os.path.realpath(line.split()[-1]) for line in maps.splitlines()
                  if "libgomp" in line and "/" in line}
        from engine.openmp_pool import _torch_openmp
        lib = _torch_openmp()
        print(os.path.realpath(lib._name) if lib is not None else "none")
        print(*sorted(mapped), sep="\\n")
    """)
    chosen, *mapped = out.strip().splitlines()
    assert chosen != "none" and chosen in mapped


def test_without_openmp_nothing_is_released(monkeypatch: pytest.MonkeyPatch) -> None:
    openmp_pool._torch_openmp.cache_clear()
    try:
        monkeypatch.setattr(torch.__config__, "parallel_info",
                            lambda: "ATen parallel backend: native thread pool")
        assert openmp_pool._torch_openmp() is None
        assert release_calling_thread_pool() is False
    finally:
        monkeypatch.undo()
        openmp_pool._torch_openmp.cache_clear()
    if "OpenMP" in torch.__config__.parallel_info():
        assert openmp_pool._torch_openmp() is not None


# -- the engine ------------------------------------------------------------------------------


def _engine(path: Path):
    from engine import create_engine
    from engine.api import EngineConfig

    return create_engine(EngineConfig(model_path=str(path), device="cpu", dtype="float32",
                                      num_kv_blocks=32, max_model_len=128))


PROMPTS = [[5, 17, 99, 3, 250, 7], [300, 12, 44]]


def _tokens(engine) -> list[list[int]]:
    from engine.api import SamplingParams

    results = engine.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=10, ignore_eos=True),
                              timeout=60)
    assert all(len(r.token_ids) == 10 for r in results)
    return [r.token_ids for r in results]


@openmp
def test_the_engine_generates_after_its_teams_were_released(two_threads: None,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    import engine.llm_engine as llm_engine
    from tests.checkpoints import tiny_checkpoint

    path = tiny_checkpoint("qwen2")
    with monkeypatch.context() as patch:  # the reference: teams never released
        patch.setattr(llm_engine, "release_calling_thread_pool", lambda: False)
        engine = _engine(path)
        try:
            reference = _tokens(engine)
        finally:
            engine.shutdown()

    calls: list[tuple[str, bool]] = []
    lock = threading.Lock()

    def recording() -> bool:
        released = release_calling_thread_pool()
        with lock:
            calls.append((threading.current_thread().name, released))
        return released

    def loop_calls() -> list[bool]:
        with lock:
            return [ok for name, ok in calls if name == "llm-engine"]

    def wait_for_loop_calls(n: int) -> None:
        deadline = time.monotonic() + 20
        while len(loop_calls()) < n and time.monotonic() < deadline:
            time.sleep(0.01)
        assert len(loop_calls()) >= n, calls

    monkeypatch.setattr(llm_engine, "release_calling_thread_pool", recording)
    engine = _engine(path)
    try:
        engine.start()
        assert (threading.current_thread().name, True) in calls  # start() ended the caller's team
        assert loop_calls() == []  # nothing ran on the loop yet: nothing to release there
        first = _tokens(engine)
        wait_for_loop_calls(1)  # idle again: the loop ended its own team
        time.sleep(llm_engine.IDLE_TICK_S + 0.3)  # a pause past an idle tick, with no team
        assert len(loop_calls()) == 1  # once per idle spell, not once per tick
        second = _tokens(engine)  # woken: the team is made again
        wait_for_loop_calls(2)
        assert all(loop_calls())
    finally:
        engine.shutdown()
    assert first == second == reference
