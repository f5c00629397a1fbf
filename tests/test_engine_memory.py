"""The engine runs for months behind the agent: after any mix of finished, cancelled and
streamed requests, every KV block is free again (prefix-cached ones count: they are
evictable), nothing is left in the scheduler, and round after round the process holds no
more Python objects than before, whether or not anyone reads the engine's stats."""

from __future__ import annotations

import gc
import random
import sys
import threading
from collections.abc import Iterator

import pytest
import torch

from engine import create_engine, engine_stats
from engine.api import EngineConfig, GenerationRequest, GenerationResult, SamplingParams
from engine.llm_engine import LLMEngine
from tests.checkpoints import tiny_checkpoint

ROUND = 120  # requests per round: several full batches; 96 KV blocks: preemptions too


@pytest.fixture(scope="module")
def engine() -> Iterator[LLMEngine]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    eng = create_engine(EngineConfig(model_path=str(tiny_checkpoint("llama")), device="cpu",
                                     dtype="float32", max_model_len=256, max_num_seqs=16, num_kv_blocks=96))
    eng.start()
    yield eng
    eng.shutdown()
    torch.set_num_threads(threads)


def serve_round(engine: LLMEngine, rng: random.Random, tag: str) -> list[GenerationResult]:
    """``ROUND`` requests of random lengths, a third of them streamed and a third cancelled
    (some at once, some while they run); returns every final result."""
    results: list[GenerationResult] = []
    lock = threading.Lock()
    done = threading.Semaphore(0)

    def on_done(result: GenerationResult) -> None:
        with lock:
            results.append(result)
        done.release()

    # token ids below 256: Python keeps one object per small int, so that the prefix cache's
    # keys (token tuples) hold no int objects of their own and the counts below stay steady
    shared_head = [rng.randrange(3, 256) for _ in range(24)]  # a system prompt: prefix hits
    for i in range(ROUND):
        prompt = shared_head + [rng.randrange(3, 256) for _ in range(rng.randrange(1, 40))]
        engine.submit(GenerationRequest(
            f"{tag}-{i}", prompt,
            SamplingParams(temperature=rng.choice([0.0, 0.8]), max_tokens=rng.randrange(1, 12),
                           ignore_eos=True),
            on_done=on_done, on_delta=(lambda delta: None) if i % 3 == 0 else None,
            project=rng.choice(["maze", "general"]),
        ))
        if i % 3 == 1:
            engine.cancel(f"{tag}-{i - rng.randrange(0, 2)}")  # this one, or the one before
    for _ in range(ROUND):
        assert done.acquire(timeout=120), f"{len(results)} of {ROUND} answered"
    return results


def assert_idle(engine: LLMEngine) -> None:
    stats = engine.stats()
    assert stats["running"] == 0 and stats["waiting"] == 0, stats
    assert stats["kv_blocks_free"] == stats["kv_blocks_total"], stats
    assert not engine.scheduler.running and engine.scheduler.num_waiting == 0


def live_objects() -> tuple[int, int]:
    gc.collect()
    return len(gc.get_objects()), sys.getallocatedblocks()


def test_every_request_ends_and_the_engine_returns_to_where_it_was(
    engine: LLMEngine, monkeypatch: pytest.MonkeyPatch,
) -> None:
    # tokens/s is kept over the last RATE_WINDOW_S of steps: short, so that the window is full
    # within the warm-up (bounded by time, it grows until then)
    monkeypatch.setattr(engine_stats, "RATE_WINDOW_S", 0.2)
    rng = random.Random(7)
    first = serve_round(engine, rng, "warm")  # fills the prefix cache, compiles, warms
    assert sorted({r.finish_reason for r in first}) == ["cancelled", "length"]
    assert len({r.request_id for r in first}) == ROUND  # one final result each
    assert_idle(engine)
    for round_no in range(3):  # until the prefix cache has turned over a few times
        serve_round(engine, rng, f"warm{round_no}")
    objects, blocks = live_objects()
    for round_no in range(4):
        serve_round(engine, rng, f"r{round_no}")
    assert_idle(engine)
    objects_after, blocks_after = live_objects()
    # A leak of one object per request would show 480 objects or blocks.
    assert objects_after - objects < 100, (objects, objects_after)
    assert blocks_after - blocks < 300, (blocks, blocks_after)


def test_the_rate_window_forgets_old_steps_without_being_read() -> None:
    """Steps older than the window go as new ones come, not only when stats are read (with
    no metrics reader the window grew by one entry per step, forever)."""
    stats = engine_stats.EngineStats()
    for i in range(10_000):
        stats.record_step(i * 0.01, i * 0.01 + 0.005, 0, 1)  # 100 steps a second
    assert len(stats._steps) <= engine_stats.RATE_WINDOW_S * 100 + 1
    assert stats.snapshot()["tokens_generated"] == 10_000
