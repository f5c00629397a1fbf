"""Scheduler under KV pressure: preemption by recompute, project shares, sequences that can't fit."""

from __future__ import annotations

from engine.block_manager import BlockManager
from engine.scheduler import Scheduler
from engine.sequence import SequenceStatus
from tests.paged_sim import FakeModel, expected_completion, make_seq, step


def setup(num_blocks: int, max_num_seqs: int = 8, budget: int = 64, **kw: object):
    bm = BlockManager(num_blocks=num_blocks, block_size=4, **kw)  # type: ignore[arg-type]
    return bm, Scheduler(max_num_seqs, budget, bm), FakeModel(bm)


def test_preempted_sequences_finish_with_the_same_tokens() -> None:
    bm, sched, model = setup(num_blocks=10)
    seqs = [make_seq([i * 10 + k for k in range(8)], max_tokens=16, rid=f"s{i}") for i in range(3)]
    for s in seqs:
        sched.add(s)
    for _ in range(200):
        if not sched.has_unfinished():
            break
        step(sched, model)
    assert not sched.has_unfinished() and sched.num_preemptions > 0
    assert any(s.num_preemptions for s in seqs)
    for s in seqs:
        assert s.finish_reason == "length"
        assert s.completion_token_ids == expected_completion(s.prompt_token_ids, 16)
        assert s.num_cached_prompt_tokens == 0  # the cache hit of a resume is not a prompt hit
    assert bm.num_free_blocks == 10 and bm.num_used_blocks == 0


def test_victim_is_the_latest_of_the_project_most_over_its_share() -> None:
    bm, sched, model = setup(num_blocks=8)
    a1 = make_seq(list(range(100, 112)), "A", max_tokens=8, rid="a1")  # 3 blocks
    a2 = make_seq(list(range(200, 212)), "A", max_tokens=8, rid="a2")  # 3 blocks
    b1 = make_seq(list(range(300, 308)), "B", max_tokens=8, rid="b1")  # 2 blocks, latest arrival
    for s in (a1, a2, b1):
        sched.add(s)
    step(sched, model)
    assert bm.num_free_blocks == 0 and bm.usage_by_project() == {"A": 6, "B": 2}
    batch = step(sched, model)  # a1 needs a 4th block: A is 2 over its share of 4
    assert batch.preempted == [a2] and a2.status is SequenceStatus.WAITING
    assert a2.block_table == [] and a2.num_computed_tokens == 0 and a2.num_completion_tokens == 1
    assert sched.waiting["A"][0] is a2 and batch.seqs == [a1, b1]
    for _ in range(100):
        if not sched.has_unfinished():
            break
        batch = step(sched, model)
        if a2 in batch.seqs and batch.is_prefill[batch.seqs.index(a2)]:
            # Resumed: its full blocks were still cached, so only the tail is recomputed.
            assert batch.num_new_tokens[batch.seqs.index(a2)] < a2.num_tokens
    assert a2.completion_token_ids == expected_completion(a2.prompt_token_ids, 8)
    assert bm.num_used_blocks == 0


def test_preempted_sequence_goes_first_in_its_project_queue() -> None:
    bm, sched, model = setup(num_blocks=6, max_num_seqs=2)
    a1 = make_seq(list(range(100, 112)), "A", max_tokens=12, rid="a1")
    a2 = make_seq(list(range(200, 211)), "A", max_tokens=12, rid="a2")
    a3 = make_seq([1, 2, 3], "A", max_tokens=2, rid="a3")
    for s in (a1, a2, a3):
        sched.add(s)
    step(sched, model)
    while not sched.num_preemptions:
        step(sched, model)
    assert list(sched.waiting["A"]) == [a2, a3]


def test_project_within_its_share_preempts_to_get_its_blocks_back() -> None:
    bm, sched, model = setup(num_blocks=8, project_shares={"A": 1, "B": 1})
    hogs = [make_seq(list(range(k, k + 13)), "A", max_tokens=20, rid=f"a{k}") for k in (0, 50)]
    for s in hogs:
        sched.add(s)
    step(sched, model)
    assert bm.num_free_blocks == 0 and bm.blocks_over_share("A") == 4
    late = make_seq([7, 7, 7, 7, 7], "A", max_tokens=2, rid="a-late")
    sched.add(late)
    step(sched, model)
    assert late.status is SequenceStatus.WAITING and sched.num_preemptions == 0  # over share: waits
    b1 = make_seq([9] * 6, "B", max_tokens=2, rid="b1")  # 2 blocks, within B's 4
    sched.add(b1)
    batch = step(sched, model)
    assert b1 in batch.seqs and batch.preempted == [hogs[1]]
    assert b1.completion_token_ids == expected_completion(b1.prompt_token_ids, 1)


def test_slot_share_preempts_but_never_back_and_forth() -> None:
    bm, sched, model = setup(num_blocks=64, max_num_seqs=4)
    a = [make_seq([k, k + 1], "A", max_tokens=50, rid=f"a{k}") for k in range(0, 50, 10)]
    for s in a:
        sched.add(s)
    step(sched, model)
    assert sched.num_running == 4 and sched.num_waiting == 1  # idle slots go to A
    b = [make_seq([90 + k, 1], "B", max_tokens=50, rid=f"b{k}") for k in range(3)]
    for s in b:
        sched.add(s)
    step(sched, model)
    step(sched, model)
    assert sched.num_running_of("B") == 2 and sched.num_preemptions == 2  # B's slot share: 2
    for _ in range(10):
        step(sched, model)
    assert sched.num_preemptions == 2 and sched.num_running_of("A") == 2


def test_a_sequence_the_cache_cannot_hold_fails_instead_of_looping() -> None:
    bm, sched, model = setup(num_blocks=4)  # 16 tokens in all
    too_long = make_seq(list(range(20)), max_tokens=2, rid="too-long")
    grows = make_seq(list(range(40, 50)), "Q", max_tokens=20, rid="grows")
    fine = make_seq([1, 2, 3], "R", max_tokens=2, rid="fine")
    for s in (too_long, grows, fine):
        sched.add(s)
    batch = step(sched, model)
    assert batch.failed == [too_long] and "4 KV cache blocks" in (too_long.error or "")
    failed = []
    for _ in range(40):
        if not sched.has_unfinished():
            break
        failed += step(sched, model).failed
    assert failed == [grows] and grows.num_tokens == 17 and fine.finish_reason == "length"
    assert not sched.has_unfinished() and bm.num_free_blocks == 4


def test_shared_prefix_blocks_are_not_counted_as_freed() -> None:
    bm, sched, model = setup(num_blocks=7)
    system = list(range(500, 508))  # 2 blocks, shared by every sequence of A
    a1 = make_seq(system + [1, 2, 3], "A", max_tokens=3, rid="a1")
    sched.add(a1)
    step(sched, model)
    a2 = make_seq(system + [4, 5, 6], "A", max_tokens=3, rid="a2")
    sched.add(a2)
    batch = step(sched, model)
    assert a2.num_cached_prompt_tokens == 8 and a2.block_table[:2] == a1.block_table[:2]
    assert batch.num_new_tokens == [1, 3] and bm.usage("A") == 4
    while sched.has_unfinished():
        step(sched, model)
    for s in (a1, a2):
        assert s.completion_token_ids == expected_completion(s.prompt_token_ids, 3)
    assert bm.num_used_blocks == 0


def test_requests_bigger_than_their_share_never_preempt_each_other_forever() -> None:
    # Shares of 1 block each, requests of 3 blocks: taking blocks back for a request
    # that outgrows its share mid-prefill would hand them back and forth without end.
    bm, sched, model = setup(num_blocks=3, max_num_seqs=3, budget=11)
    x1 = make_seq(list(range(1, 8)), "x", max_tokens=1, rid="x1")
    y = make_seq(list(range(21, 32)), "y", max_tokens=1, rid="y")
    sched.add(x1)
    sched.add(y)
    assert step(sched, model).num_new_tokens == [7, 4]  # x1 done; y has 1 block of 3
    x2 = make_seq(list(range(41, 52)), "x", max_tokens=1, rid="x2")
    sched.add(x2)
    for _ in range(50):
        if not sched.has_unfinished():
            break
        step(sched, model)
    assert not sched.has_unfinished() and sched.num_preemptions == 0
    for s in (x1, y, x2):
        assert s.completion_token_ids == expected_completion(s.prompt_token_ids, 1)
