"""Scheduler and Sequence bookkeeping: plain Python, no model."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from engine.api import SamplingParams
from engine.scheduler import ScheduledBatch, Scheduler
from engine.sequence import Sequence, SequenceStatus

GREEDY = SamplingParams(temperature=0, max_tokens=4)


def seq(n: int, project: str = "general", rid: str | None = None) -> Sequence:
    return Sequence(rid or f"r{n}", list(range(1, n + 1)), GREEDY, project)


def run_step(sched: Scheduler, token: int = 7) -> ScheduledBatch:
    batch = sched.schedule()
    sched.update(batch, [token] * len(batch))
    return batch


def test_bookkeeping_imports_no_torch() -> None:
    code = "import sys, engine.scheduler, engine.sequence; assert 'torch' not in sys.modules"
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
    assert batch.num_new_tokens == [8, 8]  # a third prompt would exceed 20 tokens
    batch = run_step(sched)
    assert batch.num_new_tokens == [1, 1, 8]  # max_num_seqs = 3
    assert sched.num_running == 3 and sched.num_waiting == 2
    sched.remove(sched.running[0])
    assert run_step(sched).num_new_tokens == [1, 1, 8]


def test_fcfs_head_of_line_is_not_overtaken() -> None:
    sched = Scheduler(max_num_seqs=8, max_num_batched_tokens=16)
    sched.add(seq(10, rid="first"))
    sched.add(seq(12, rid="big"))
    sched.add(seq(2, rid="small"))
    # "small" would fit, but "big" came first and must not starve behind later small ones.
    assert [s.request_id for s in run_step(sched).seqs] == ["first"]
    assert [s.request_id for s in run_step(sched).seqs] == ["first", "big", "small"]


def test_prompt_larger_than_budget_runs_alone() -> None:
    sched = Scheduler(max_num_seqs=4, max_num_batched_tokens=16)
    sched.add(seq(40, rid="huge"))
    sched.add(seq(4, rid="next"))
    batch = run_step(sched)
    assert [s.request_id for s in batch.seqs] == ["huge"]
    assert [s.request_id for s in run_step(sched).seqs] == ["huge", "next"]


def test_round_robin_between_projects() -> None:
    sched = Scheduler(max_num_seqs=4, max_num_batched_tokens=64)
    for i in range(4):
        sched.add(seq(4, "busy", rid=f"busy{i}"))
    sched.add(seq(4, "quiet", rid="quiet0"))
    sched.add(seq(4, "other", rid="other0"))
    admitted = [s.request_id for s in run_step(sched).seqs]
    assert admitted == ["busy0", "quiet0", "other0", "busy1"]


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
    assert Scheduler(max_num_seqs=64, max_num_batched_tokens=16).max_num_seqs == 16


@settings(max_examples=60, deadline=None)
@given(
    prompts=st.lists(
        st.tuples(st.integers(1, 40), st.sampled_from("xyz")), min_size=1, max_size=12
    ),
    max_seqs=st.integers(1, 6),
    budget=st.integers(16, 64),
    life=st.integers(1, 4),
)
def test_invariants_under_random_load(
    prompts: list[tuple[int, str]], max_seqs: int, budget: int, life: int
) -> None:
    sched = Scheduler(max_seqs, budget)
    seqs = [seq(n, p, rid=f"r{i}") for i, (n, p) in enumerate(prompts)]
    for s in seqs:
        sched.add(s)
    admitted: dict[str, list[str]] = {}
    for _ in range(200):
        if not sched.has_unfinished():
            break
        batch = sched.schedule()
        assert batch.seqs, "a step with work must schedule something"
        assert len(batch) <= sched.max_num_seqs and len(set(map(id, batch.seqs))) == len(batch)
        assert batch.num_tokens <= budget or batch.num_prefills == 1
        for s, n in zip(batch.seqs, batch.num_new_tokens, strict=True):
            assert n == s.num_uncomputed_tokens
            if s.is_prefill:
                admitted.setdefault(s.project, []).append(s.request_id)
        sched.update(batch, [1] * len(batch))
        for s in batch.seqs:
            if s.num_completion_tokens >= life:
                sched.remove(s)
    assert not sched.has_unfinished()
    for project, ids in admitted.items():  # FCFS inside a project
        assert ids == [s.request_id for s in seqs if s.project == project]
