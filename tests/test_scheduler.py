"""Scheduler and Sequence bookkeeping: plain Python, no model."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from engine.api import SamplingParams
from engine.block_manager import BlockManager
from engine.scheduler import ScheduledBatch, Scheduler
from engine.sequence import Sequence, SequenceStatus
from tests.paged_sim import FakeModel, expected_completion, make_seq, step

GREEDY = SamplingParams(temperature=0, max_tokens=4)


def seq(n: int, project: str = "general", rid: str | None = None) -> Sequence:
    return Sequence(rid or f"r{n}", list(range(1, n + 1)), GREEDY, project)


def run_step(sched: Scheduler, token: int = 7) -> ScheduledBatch:
    batch = sched.schedule()
    sched.update(batch, [token] * len(batch))
    return batch


def ids(batch: ScheduledBatch) -> list[str]:
    return [s.request_id for s in batch.seqs]


def test_bookkeeping_imports_no_torch() -> None:
    code = (
        "import sys, engine.scheduler, engine.sequence, engine.block_manager, engine.admission;"
        " assert 'torch' not in sys.modules"
    )
    root = Path(__file__).resolve().parent.parent
    subprocess.run([sys.executable, "-c", code], cwd=root, check=True, timeout=60)


def test_sequence_progress_and_timings() -> None:
    s = Sequence("a", [5, 6, 7], GREEDY, arrival_time=10.0)
    assert s.is_prefill and s.num_uncomputed_tokens == 3 and s.status is SequenceStatus.WAITING
    s.mark_scheduled(now=10.5)
    s.num_computed_tokens = 3
    s.append_token(9, now=11.0)
    assert not s.is_prefill and s.num_uncomputed_tokens == 1
    assert s.completion_token_ids == [9] and s.prompt_token_ids == [5, 6, 7]
    s.finish("length", now=12.0)
    assert s.is_finished and s.timings() == (0.5, 1.0, 2.0)


def test_new_requests_join_running_decodes() -> None:
    sched = Scheduler(max_num_seqs=8, max_num_batched_tokens=64)
    a = seq(10, rid="a")
    sched.add(a)
    first = run_step(sched)
    assert first.seqs == [a] and first.num_new_tokens == [10] and first.num_prefills == 1
    b = seq(5, rid="b")
    sched.add(b)
    mixed = run_step(sched)
    assert mixed.seqs == [a, b] and mixed.num_new_tokens == [1, 5] and mixed.num_prefills == 1
    assert run_step(sched).num_new_tokens == [1, 1]
    assert a.num_computed_tokens == 12 and a.num_completion_tokens == 3


def test_token_budget_and_max_num_seqs() -> None:
    sched = Scheduler(max_num_seqs=3, max_num_batched_tokens=20)
    for i in range(5):
        sched.add(seq(8, rid=f"s{i}"))
    batch = run_step(sched)
    assert batch.num_new_tokens == [8, 8, 4]  # the third prompt is chunked to the budget
    assert batch.produces_token == [True, True, False]
    batch = run_step(sched)
    assert batch.num_new_tokens == [1, 1, 4]  # decodes first; max_num_seqs = 3
    assert sched.num_running == 3 and sched.num_waiting == 2
    sched.remove(sched.running[0])
    assert run_step(sched).num_new_tokens == [1, 1, 8]


def test_fcfs_head_of_line_is_not_overtaken() -> None:
    sched = Scheduler(max_num_seqs=8, max_num_batched_tokens=16)
    sched.add(seq(10, rid="first"))
    sched.add(seq(12, rid="big"))
    sched.add(seq(2, rid="small"))
    # "small" would fit whole, but "big" came first: it takes the rest of the budget.
    assert ids(run_step(sched)) == ["first", "big"]
    assert ids(run_step(sched)) == ["first", "big", "small"]


def test_chunked_prefill_never_stalls_decodes() -> None:
    bm = BlockManager(num_blocks=64, block_size=4)
    sched = Scheduler(max_num_seqs=4, max_num_batched_tokens=16, block_manager=bm)
    model = FakeModel(bm)
    a, b = make_seq([1, 2, 3], max_tokens=30, rid="a"), make_seq([4, 5], max_tokens=30, rid="b")
    sched.add(a)
    sched.add(b)
    step(sched, model)
    long = make_seq(list(range(10, 60)), max_tokens=2, rid="long")  # 50 tokens: 4 chunks
    sched.add(long)
    chunks = []
    while long.num_completion_tokens == 0:
        batch = step(sched, model)
        assert batch.seqs[:2] == [a, b] and batch.num_new_tokens[:2] == [1, 1]  # a, b decode
        assert batch.num_tokens <= 16
        chunks.append(batch.num_new_tokens[2])
    assert chunks == [14, 14, 14, 8]
    assert long.completion_token_ids == expected_completion(long.prompt_token_ids, 2)[:1]


def test_update_ignores_tokens_of_partial_chunks() -> None:
    sched = Scheduler(max_num_seqs=2, max_num_batched_tokens=16)
    s = seq(20, rid="s")
    sched.add(s)
    batch = run_step(sched, token=5)  # a runner that samples for every row
    assert batch.produces_token == [False] and s.num_tokens == 20 and s.num_computed_tokens == 16
    assert run_step(sched, token=5).produces_token == [True] and s.completion_token_ids == [5]


def test_round_robin_between_projects() -> None:
    sched = Scheduler(max_num_seqs=4, max_num_batched_tokens=64)
    for i in range(4):
        sched.add(seq(4, "busy", rid=f"busy{i}"))
    sched.add(seq(4, "quiet", rid="quiet0"))
    sched.add(seq(4, "other", rid="other0"))
    assert ids(run_step(sched)) == ["busy0", "quiet0", "other0", "busy1"]


def test_round_robin_pointer_moves_on_between_steps() -> None:
    sched = Scheduler(max_num_seqs=1, max_num_batched_tokens=64)
    for i in range(2):
        sched.add(seq(4, "a", rid=f"a{i}"))
        sched.add(seq(4, "b", rid=f"b{i}"))
    order = []
    while sched.has_unfinished():
        batch = run_step(sched)
        order += [s.request_id for s in batch.seqs if s.num_completion_tokens == 1]
        sched.remove(batch.seqs[0])  # finish after one token
    assert order == ["a0", "b0", "a1", "b1"]


def test_remove_waiting_and_all_sequences() -> None:
    sched = Scheduler(max_num_seqs=1, max_num_batched_tokens=64)
    a, b, c = seq(3, "p", "a"), seq(3, "q", "b"), seq(3, "p", "c")
    for s in (a, b, c):
        sched.add(s)
    run_step(sched)
    assert set(sched.all_sequences()) == {a, b, c}
    sched.remove(b)
    assert sched.num_waiting == 1 and set(sched.all_sequences()) == {a, c}
    sched.remove(a)
    assert run_step(sched).seqs == [c]


def test_max_num_seqs_capped_by_token_budget() -> None:
    assert Scheduler(max_num_seqs=64, max_num_batched_tokens=16).max_num_seqs == 15


def test_prefix_cache_through_the_scheduler() -> None:
    bm = BlockManager(num_blocks=32, block_size=4)
    sched = Scheduler(max_num_seqs=4, max_num_batched_tokens=64, block_manager=bm)
    model = FakeModel(bm)
    system = list(range(30, 42))
    first = make_seq(system + [1, 2], max_tokens=3, rid="first")
    sched.add(first)
    while sched.has_unfinished():
        step(sched, model)
    turn2 = make_seq(first.token_ids + [3, 4, 5], max_tokens=3, rid="turn2")
    sched.add(turn2)
    batch = step(sched, model)
    assert turn2.num_cached_prompt_tokens == 16 and batch.num_new_tokens == [4]
    while sched.has_unfinished():
        step(sched, model)
    assert turn2.completion_token_ids == expected_completion(turn2.prompt_token_ids, 3)
    assert bm.num_free_blocks == 32 and bm.num_used_blocks == 0
