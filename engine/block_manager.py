"""Which KV cache blocks each sequence owns: reference counts, prefix caching, project shares.

Plain Python (no torch): the cache tensors live elsewhere; this module only hands
out block ids. A sequence's ``block_table[i]`` holds its tokens
``[i * block_size, (i + 1) * block_size)``.

Prefix caching. Once a block is full and computed, it is registered under the key
``(parent chain id, its token ids)``, where the parent chain id identifies the
block before it (``ROOT`` for the first) and the block gets a chain id of its own.
A dict lookup compares keys in full, token ids included, and chain ids are never
reused, so a hit means "the same tokens after the same prefix": a hash collision
can never hand out wrong KV, and a block whose parent was evicted can never be
reached again. A new sequence (``reuse_prefix``) shares the longest chain of
cached blocks of its tokens, capped so that its last token is always computed
(the model needs that token's logits).

Freed blocks. A block whose reference count drops to 0 keeps its content: a
cached one joins an LRU free list (a later hit revives it), any other becomes
clean. Allocation takes clean / never-used blocks first, then evicts the least
recently freed cached block. A sequence's blocks are freed tail first, so its
prefix, the part most likely shared by a next turn, stays longest.

Shares. Project ``p`` owns ``num_blocks * w_p / sum(w)`` blocks (weights from
``project_shares``; projects seen later get ``default_share``). Shares are not
limits: a project may use idle blocks beyond its share; the scheduler uses them
to pick whom to preempt. A project's usage is the number of distinct blocks in
its sequences' tables (a block shared across projects counts for each).
"""

from __future__ import annotations

import itertools
from collections import Counter, OrderedDict

from engine.sequence import Sequence

ROOT = 0  # chain id of the empty prefix
_Key = tuple[int, tuple[int, ...]]  # (parent chain id, token ids of the block)


class BlockManager:
    """Allocator of ``num_blocks`` KV blocks of ``block_size`` tokens."""

    def __init__(
        self,
        num_blocks: int,
        block_size: int,
        project_shares: dict[str, float] | None = None,
        enable_prefix_caching: bool = True,
        default_share: float = 1.0,
    ) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError(
                f"num_blocks and block_size must be >= 1, got {num_blocks}, {block_size}"
            )
        shares = dict(project_shares or {})
        if any(w <= 0 for w in shares.values()) or default_share <= 0:
            raise ValueError(f"project shares must be > 0, got {shares}, default {default_share}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.default_share = default_share
        self._weights = shares
        self._ref: dict[int, int] = {}  # block -> reference count, blocks in use only
        self._next_unused = 0  # blocks >= this were never handed out (lazy: no big list)
        self._clean: list[int] = []  # free blocks without cached content
        self._evictable: OrderedDict[int, None] = OrderedDict()  # free cached blocks, LRU first
        self._cache: dict[_Key, int] = {}  # key -> block
        self._cached: dict[int, tuple[_Key, int]] = {}  # block -> (key, chain id)
        self._chain_ids = itertools.count(ROOT + 1)
        self._project_blocks: dict[str, Counter[int]] = {}  # project -> block -> references

    # -- sizes ------------------------------------------------------------------------------

    @property
    def num_free_blocks(self) -> int:
        """Blocks an allocation may take: never used, clean, or cached with no owner."""
        return self.num_blocks - self._next_unused + len(self._clean) + len(self._evictable)

    @property
    def num_used_blocks(self) -> int:
        return len(self._ref)

    def ref_count(self, block: int) -> int:
        return self._ref.get(block, 0)

    def is_cached(self, block: int) -> bool:
        return block in self._cached

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def num_blocks_needed(self, seq: Sequence, num_new_tokens: int) -> int:
        """Free blocks ``allocate_slots(seq, num_new_tokens)`` would take."""
        total = self.blocks_for(seq.num_computed_tokens + num_new_tokens)
        return max(0, total - len(seq.block_table))

    def can_allocate(self, seq: Sequence, num_new_tokens: int) -> bool:
        return self.num_blocks_needed(seq, num_new_tokens) <= self.num_free_blocks

    def freeable_blocks(self, seqs: list[Sequence]) -> int:
        """Blocks that would become free if all of ``seqs`` were freed."""
        refs = Counter(b for s in seqs for b in s.block_table)
        return sum(1 for b, n in refs.items() if self._ref[b] == n)

    # -- allocation -------------------------------------------------------------------------

    def reuse_prefix(self, seq: Sequence) -> int:
        """Give a sequence without blocks its longest cached prefix; the tokens reused.

        Sets ``num_computed_tokens`` to them (and ``num_cached_prompt_tokens`` on a
        first admission). Revived blocks leave the free list, so this may lower
        ``num_free_blocks``; ``free(seq)`` undoes it.
        """
        assert not seq.block_table and seq.num_computed_tokens == 0, seq
        self.register_project(seq.project)
        if not self.enable_prefix_caching:
            return 0
        bs, parent = self.block_size, ROOT
        for i in range((seq.num_tokens - 1) // bs):  # never the block of the last token
            block = self._cache.get((parent, tuple(seq.token_ids[i * bs : (i + 1) * bs])))
            if block is None:
                break
            if block not in self._ref:
                del self._evictable[block]
            self._take(seq, block)
            parent = self._cached[block][1]
            seq.block_chain_ids.append(parent)
        seq.num_computed_tokens = len(seq.block_table) * bs
        if seq.num_preemptions == 0:
            seq.num_cached_prompt_tokens = min(seq.num_computed_tokens, seq.num_prompt_tokens)
        return seq.num_computed_tokens

    def allocate_slots(self, seq: Sequence, num_new_tokens: int) -> bool:
        """Make the block table cover ``num_computed_tokens + num_new_tokens`` tokens.

        False (and nothing changed) when there are not enough free blocks.
        """
        need = self.num_blocks_needed(seq, num_new_tokens)
        if need > self.num_free_blocks:
            return False
        self.register_project(seq.project)
        for _ in range(need):
            self._take(seq, self._pop_free())
        return True

    def mark_computed(self, seq: Sequence) -> None:
        """Register the sequence's full, computed blocks in the prefix cache (after a step)."""
        if not self.enable_prefix_caching:
            return
        bs = self.block_size
        full = min(seq.num_computed_tokens // bs, len(seq.block_table))
        parent = seq.block_chain_ids[-1] if seq.block_chain_ids else ROOT
        for i in range(len(seq.block_chain_ids), full):
            key = (parent, tuple(seq.token_ids[i * bs : (i + 1) * bs]))
            block = seq.block_table[i]
            assert block not in self._cached, (block, seq)
            existing = self._cache.get(key)
            if existing is None:
                parent = next(self._chain_ids)
                self._cache[key] = block
                self._cached[block] = (key, parent)
            else:  # another sequence computed the same tokens first: chain through its block
                parent = self._cached[existing][1]
            seq.block_chain_ids.append(parent)

    def free(self, seq: Sequence) -> None:
        """Release the sequence's blocks (tail first); its KV is gone: ``num_computed_tokens = 0``."""
        counts = self._project_blocks.get(seq.project)
        for block in reversed(seq.block_table):
            if counts is not None:
                counts[block] -= 1
                if counts[block] == 0:
                    del counts[block]
            self._ref[block] -= 1
            if self._ref[block] == 0:
                del self._ref[block]
                if block in self._cached:
                    self._evictable[block] = None  # most recently freed: evicted last
                else:
                    self._clean.append(block)
        seq.block_table = []
        seq.block_chain_ids = []
        seq.num_computed_tokens = 0

    def _take(self, seq: Sequence, block: int) -> None:
        self._ref[block] = self._ref.get(block, 0) + 1
        seq.block_table.append(block)
        self._project_blocks.setdefault(seq.project, Counter())[block] += 1

    def _pop_free(self) -> int:
        if self._clean:
            return self._clean.pop()
        if self._next_unused < self.num_blocks:
            self._next_unused += 1
            return self._next_unused - 1
        block, _ = self._evictable.popitem(last=False)  # least recently freed
        key, _ = self._cached.pop(block)
        del self._cache[key]
        return block

    # -- project shares ---------------------------------------------------------------------

    def register_project(self, project: str) -> None:
        """Count a project in the shares from now on (done on its first allocation)."""
        self._weights.setdefault(project, self.default_share)

    def share(self, project: str) -> float:
        """The project's fraction of the cache (and of the batch slots), in (0, 1]."""
        weight = self._weights.get(project, self.default_share)
        total = sum(self._weights.values()) + (0.0 if project in self._weights else weight)
        return weight / total

    def share_blocks(self, project: str) -> int:
        return int(self.num_blocks * self.share(project))

    def usage(self, project: str) -> int:
        return len(self._project_blocks.get(project, ()))

    def usage_by_project(self) -> dict[str, int]:
        """Blocks in use by each known project (distinct blocks of its sequences)."""
        return {p: self.usage(p) for p in {**self._weights, **self._project_blocks}}

    def blocks_over_share(self, project: str) -> int:
        """Usage minus share: > 0 over its share, <= 0 within it."""
        return self.usage(project) - self.share_blocks(project)
