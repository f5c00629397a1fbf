"""BlockManager: allocation, reference counts, prefix caching, LRU eviction, project shares."""

from __future__ import annotations

import pytest

from engine.block_manager import BlockManager
from engine.sequence import Sequence
from tests.paged_sim import greedy

BS = 4


def seq(tokens: list[int], project: str = "p") -> Sequence:
    return Sequence("r", tokens, greedy(4), project)


def compute(bm: BlockManager, s: Sequence, n: int | None = None) -> None:
    """Allocate for and 'compute' the next n tokens (all of them by default)."""
    n = s.num_uncomputed_tokens if n is None else n
    assert bm.allocate_slots(s, n)
    s.num_computed_tokens += n
    bm.mark_computed(s)


def start(bm: BlockManager, s: Sequence) -> int:
    """Admit: reuse the cached prefix, then compute the rest; the tokens reused."""
    hit = bm.reuse_prefix(s)
    compute(bm, s)
    return hit


def test_allocate_and_free() -> None:
    bm = BlockManager(num_blocks=8, block_size=BS)
    s = seq(list(range(10)))
    assert bm.num_blocks_needed(s, 10) == 3 and bm.can_allocate(s, 10)
    assert bm.allocate_slots(s, 6)
    assert len(s.block_table) == 2 and bm.num_free_blocks == 6 and bm.num_used_blocks == 2
    s.num_computed_tokens = 6
    assert bm.allocate_slots(s, 2) and len(s.block_table) == 2  # block 2 still has room
    assert bm.allocate_slots(s, 4) and len(s.block_table) == 3
    assert all(bm.ref_count(b) == 1 for b in s.block_table)
    bm.free(s)
    assert s.block_table == [] and s.num_computed_tokens == 0
    assert bm.num_free_blocks == 8 and bm.num_used_blocks == 0


def test_allocation_fails_without_change_when_short() -> None:
    bm = BlockManager(num_blocks=3, block_size=BS)
    a, b = seq(list(range(8))), seq(list(range(100, 108)))
    assert bm.allocate_slots(a, 8)
    assert not bm.can_allocate(b, 8) and not bm.allocate_slots(b, 8)
    assert b.block_table == [] and bm.num_free_blocks == 1


def test_prefix_hit_across_sequences_with_the_same_system_prompt() -> None:
    bm = BlockManager(num_blocks=16, block_size=BS)
    system = list(range(50, 62))  # 3 full blocks
    a, b = seq(system + [1, 2, 3]), seq(system + [7, 8])
    assert start(bm, a) == 0
    assert start(bm, b) == 12
    assert b.num_cached_prompt_tokens == 12 and b.block_table[:3] == a.block_table[:3]
    assert all(bm.ref_count(x) == 2 for x in a.block_table[:3])
    assert bm.ref_count(a.block_table[3]) == 1 and a.block_table[3] != b.block_table[3]
    bm.free(a)
    assert all(bm.ref_count(x) == 1 for x in b.block_table)


def test_second_turn_reuses_the_first_turn_and_revives_free_blocks() -> None:
    bm = BlockManager(num_blocks=16, block_size=BS)
    turn1 = seq(list(range(1, 11)))  # 10 prompt tokens
    start(bm, turn1)
    for tok in (90, 91, 92):  # decode 3 tokens: 13 tokens, 12 computed after the 3rd step
        turn1.append_token(tok)
        compute(bm, turn1, 1)
    table = list(turn1.block_table)
    bm.free(turn1)
    free_before = bm.num_free_blocks
    turn2 = seq(turn1.token_ids + [5, 6, 7])  # history + the new user message
    assert start(bm, turn2) == 12 and turn2.block_table[:3] == table[:3]
    assert bm.num_free_blocks == free_before - 4  # 3 revived + 1 new


@pytest.mark.parametrize(("n", "hit"), [(8, 4), (9, 8), (12, 8), (13, 12)])
def test_the_last_token_is_always_computed(n: int, hit: int) -> None:
    bm = BlockManager(num_blocks=16, block_size=BS)
    tokens = list(range(1, 13))
    start(bm, seq(tokens + [99]))  # 3 full blocks cached
    s = seq(tokens[:n] if n <= 12 else tokens + [99])
    assert bm.reuse_prefix(s) == hit and s.num_uncomputed_tokens >= 1


def test_eviction_takes_unused_blocks_first_then_lru() -> None:
    bm = BlockManager(num_blocks=6, block_size=BS)
    a, b = seq(list(range(0, 8))), seq(list(range(20, 28)))
    start(bm, a)
    start(bm, b)
    a_blocks, b_blocks = list(a.block_table), list(b.block_table)
    bm.free(a)  # tail first: a's last block becomes the least recently freed
    bm.free(b)
    assert bm.num_free_blocks == 6 and all(bm.is_cached(x) for x in a_blocks + b_blocks)
    c = seq(list(range(40, 48)))
    start(bm, c)
    assert sorted(c.block_table) == [4, 5]  # the two never-used blocks: no eviction
    d = seq(list(range(60, 68)))
    start(bm, d)
    assert d.block_table == a_blocks[::-1]  # LRU: a's tail, then a's head
    # b's blocks are still cached (and revived by the hit); a's entries are gone.
    again_b = seq(list(range(20, 28)) + [1])
    assert bm.reuse_prefix(again_b) == 8 and again_b.block_table == b_blocks
    assert bm.reuse_prefix(seq(list(range(0, 8)) + [1])) == 0


def test_a_revived_block_leaves_the_free_list() -> None:
    bm = BlockManager(num_blocks=2, block_size=BS)
    a = seq(list(range(4)))
    start(bm, a)
    bm.free(a)
    b = seq(list(range(4)) + [9])
    assert bm.reuse_prefix(b) == 4 and bm.num_free_blocks == 1
    assert bm.allocate_slots(b, 1) and bm.num_free_blocks == 0
    assert not bm.allocate_slots(seq([5, 6]), 2)  # the revived block is not evicted


def test_hash_collisions_never_return_wrong_kv() -> None:
    one, big = [1] * BS, [2**61] * BS  # different tokens, equal Python hashes
    assert hash((0, tuple(one))) == hash((0, tuple(big)))
    bm = BlockManager(num_blocks=8, block_size=BS)
    first = seq(one + [5])
    start(bm, first)
    other = seq(big + [5])
    assert bm.reuse_prefix(other) == 0  # same hash, other tokens: a miss
    compute(bm, other)
    hit_big, hit_one = seq(big + [6]), seq(one + [6])
    assert bm.reuse_prefix(hit_big) == 4 and bm.reuse_prefix(hit_one) == 4
    assert hit_big.block_table[0] == other.block_table[0] != hit_one.block_table[0]
    assert hit_one.block_table[0] == first.block_table[0]


def test_duplicate_prefix_computed_concurrently_chains_through_the_first() -> None:
    bm = BlockManager(num_blocks=16, block_size=BS)
    prompt = list(range(1, 9))
    a, b = seq(prompt + [50]), seq(prompt + [60, 61, 62, 63, 64])
    bm.reuse_prefix(a)
    bm.reuse_prefix(b)  # both miss: a has computed nothing yet
    compute(bm, a)
    compute(bm, b)
    assert b.block_chain_ids[:2] == a.block_chain_ids[:2]
    assert not bm.is_cached(b.block_table[0]) and bm.is_cached(b.block_table[2])
    c = seq(prompt + [60, 61, 62, 63, 70])
    assert bm.reuse_prefix(c) == 12
    assert c.block_table == a.block_table[:2] + b.block_table[2:3]


def test_without_prefix_caching_nothing_is_shared() -> None:
    bm = BlockManager(num_blocks=8, block_size=BS, enable_prefix_caching=False)
    a = seq(list(range(9)))
    start(bm, a)
    assert not any(bm.is_cached(b) for b in a.block_table)
    bm.free(a)
    assert bm.reuse_prefix(seq(list(range(9)))) == 0 and bm.num_free_blocks == 8


def test_shares_and_usage_by_project() -> None:
    bm = BlockManager(num_blocks=100, block_size=BS, project_shares={"a": 3, "b": 1})
    assert (bm.share_blocks("a"), bm.share_blocks("b")) == (75, 25)
    assert bm.share_blocks("c") == 20  # an unknown project: default weight 1 of 5
    system = list(range(200, 208))
    a1, a2, b1 = seq(system + [1], "a"), seq(system + [2], "a"), seq(system + [3], "b")
    for s in (a1, a2, b1):
        start(bm, s)
    # a's two sequences share 2 blocks: counted once for a; b shares them too: counted for b.
    assert bm.usage_by_project() == {"a": 4, "b": 3}
    assert bm.blocks_over_share("a") == 4 - 75 and bm.num_used_blocks == 5
    bm.register_project("c")
    assert bm.share_blocks("a") == 60 and bm.usage_by_project()["c"] == 0
    small = BlockManager(num_blocks=4, block_size=BS)  # equal shares among projects seen
    start(small, seq(list(range(12)), "x"))
    small.register_project("y")
    assert small.share_blocks("x") == 2 and small.blocks_over_share("x") == 1


def test_freeable_blocks_counts_only_sole_owners() -> None:
    bm = BlockManager(num_blocks=16, block_size=BS)
    system = list(range(8))
    a, b = seq(system + [1, 2, 3, 4, 5]), seq(system + [9])
    start(bm, a)
    start(bm, b)
    assert bm.freeable_blocks([a]) == 2 and bm.freeable_blocks([a, b]) == 5


def test_invalid_arguments() -> None:
    with pytest.raises(ValueError):
        BlockManager(0, 16)
    with pytest.raises(ValueError):
        BlockManager(8, 16, project_shares={"a": 0})
