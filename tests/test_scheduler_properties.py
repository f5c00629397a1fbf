"""Scheduler + BlockManager under random streams: bookkeeping invariants and the fairness bound."""

from __future__ import annotations

import math
import random
from collections import Counter

from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from engine.block_manager import BlockManager
from engine.scheduler import Scheduler
from engine.sequence import Sequence, SequenceStatus
from tests.paged_sim import FakeModel, expected_completion, make_seq, step

SYSTEM_PROMPTS = [[1, 2, 3, 4, 5, 6, 7, 8, 9], [1, 2, 3, 40, 41], [60, 61, 62, 63, 64, 65, 66]]


class SchedulerMachine(RuleBasedStateMachine):
    """add / step / cancel with few blocks; after every rule the bookkeeping must add up."""

    @initialize(
        num_blocks=st.integers(3, 12),
        block_size=st.sampled_from([1, 2, 4]),
        max_num_seqs=st.integers(1, 4),
        budget=st.integers(2, 12),
        caching=st.booleans(),
        shares=st.sampled_from([None, {"x": 1, "y": 1}, {"x": 3, "y": 1, "z": 1}]),
    )
    def setup(self, num_blocks, block_size, max_num_seqs, budget, caching, shares) -> None:
        self.bm = BlockManager(num_blocks, block_size, shares, enable_prefix_caching=caching)
        self.sched = Scheduler(max_num_seqs, budget, self.bm)
        self.model = FakeModel(self.bm)
        self.seqs: list[Sequence] = []
        self.steps_without_work = 0

    @rule(
        project=st.sampled_from("xyz"),
        system=st.integers(0, len(SYSTEM_PROMPTS) - 1),
        cut=st.integers(0, 9),
        suffix=st.lists(st.integers(0, 96), max_size=8),
        max_tokens=st.integers(1, 6),
    )
    def add(self, project: str, system: int, cut: int, suffix: list[int], max_tokens: int) -> None:
        prompt = SYSTEM_PROMPTS[system][:cut] + suffix
        if prompt:
            seq = make_seq(prompt, project, max_tokens, rid=f"r{len(self.seqs)}")
            self.seqs.append(seq)
            self.sched.add(seq)

    @rule()
    def one_step(self) -> None:
        if not self.sched.has_unfinished():
            return
        batch = step(self.sched, self.model)
        assert len(batch) <= self.sched.max_num_seqs
        assert batch.num_tokens <= self.sched.max_num_batched_tokens
        assert len({id(s) for s in batch.seqs}) == len(batch)
        assert batch.seqs or batch.failed or batch.preempted, "work but nothing scheduled"

    @rule(index=st.integers(0, 50))
    def cancel(self, index: int) -> None:
        live = [s for s in self.seqs if not s.is_finished]
        if live:
            seq = live[index % len(live)]
            self.sched.remove(seq)
            seq.finish("cancelled")

    @invariant()
    def bookkeeping_adds_up(self) -> None:
        if not hasattr(self, "bm"):
            return
        bm, live = self.bm, [s for s in self.seqs if not s.is_finished]
        owners: Counter[int] = Counter()
        per_project: dict[str, set[int]] = {}
        for s in live:
            assert len(set(s.block_table)) == len(s.block_table)
            owners.update(s.block_table)
            per_project.setdefault(s.project, set()).update(s.block_table)
            if s.status is SequenceStatus.WAITING:
                assert s.block_table == [] and s.num_computed_tokens == 0
            else:
                assert len(s.block_table) * bm.block_size >= s.num_computed_tokens
        for s in self.seqs:
            if s.is_finished:
                assert s.block_table == []
        for block, n in owners.items():
            assert bm.ref_count(block) == n
            assert n == 1 or bm.is_cached(block), "only cached prefix blocks are shared"
        assert bm.num_used_blocks == len(owners)
        assert bm.num_free_blocks + bm.num_used_blocks == bm.num_blocks
        usage = bm.usage_by_project()
        for project, blocks in per_project.items():
            assert usage[project] == len(blocks)
        assert set(self.sched.all_sequences()) == set(live)

    def teardown(self) -> None:
        if not hasattr(self, "bm"):
            return
        for _ in range(2000):
            if not self.sched.has_unfinished():
                break
            step(self.sched, self.model)
        assert not self.sched.has_unfinished(), "the scheduler did not drain"
        assert self.bm.num_free_blocks == self.bm.num_blocks and self.bm.num_used_blocks == 0
        for s in self.seqs:
            assert s.is_finished
            if s.finish_reason == "length":
                assert s.completion_token_ids == expected_completion(
                    s.prompt_token_ids, s.sampling.max_tokens
                )


TestSchedulerMachine = SchedulerMachine.TestCase
TestSchedulerMachine.settings = settings(max_examples=80, stateful_step_count=40, deadline=None)


# -- fairness under a flood ----------------------------------------------------------------------

B, S, BS, K = 16, 4, 4, 2  # budget, max_num_seqs, block size, projects


@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 10**6),
    per_step=st.integers(1, 4),
    shape=st.sampled_from([(16, 1, 32, 8), (32, 20, 32, 32), (24, 1, 24, 24), (16, 20, 28, 4)]),
    quiet_len=st.integers(1, 12),
)
def test_a_flood_never_delays_a_project_within_its_share_beyond_the_bound(
    seed: int, per_step: int, shape: tuple[int, int, int, int], quiet_len: int
) -> None:
    num_blocks, flood_min, flood_max, flood_tokens = shape
    bound = K * (math.ceil((flood_max + flood_tokens) / (B - S + 1)) + 1)  # the docstring's
    rng = random.Random(seed)
    bm = BlockManager(num_blocks, BS, project_shares={"flood": 1, "quiet": 1})
    sched = Scheduler(S, B, bm)
    model = FakeModel(bm)
    everyone: list[Sequence] = []
    quiet: tuple[Sequence, int] | None = None  # one quiet request at a time, and when it came
    waits: list[int] = []
    seen: set[int] = set()
    for t in range(300):
        for _ in range(rng.randint(0, per_step) if t < 250 else 0):
            prompt = [100 + rng.randrange(50) for _ in range(rng.randint(flood_min, flood_max))]
            everyone.append(make_seq(prompt, "flood", rng.randint(1, flood_tokens)))
            sched.add(everyone[-1])
        if t < 250 and (quiet is None or quiet[0].is_finished):
            prompt = [rng.randrange(1, 50) for _ in range(quiet_len)]  # no block shared with flood
            quiet = (make_seq(prompt, "quiet", rng.randint(1, 4)), t)
            everyone.append(quiet[0])
            sched.add(quiet[0])
        batch = step(sched, model)
        assert not batch.failed
        if quiet is not None and quiet[0] in batch.seqs and quiet[0].seq_id not in seen:
            seen.add(quiet[0].seq_id)
            waits.append(t - quiet[1] + 1)  # steps from arrival to first chunk, inclusive
    assert sched.num_preemptions > 0 or flood_tokens <= 8
    assert len(waits) >= 50 and max(waits) <= bound, (max(waits), bound)
    for _ in range(5000):
        if not sched.has_unfinished():
            break
        step(sched, model)
    assert not sched.has_unfinished() and bm.num_used_blocks == 0
    for s in everyone:
        assert s.project == "flood" or s.num_preemptions == 0
        assert s.completion_token_ids == expected_completion(
            s.prompt_token_ids, s.sampling.max_tokens
        )
