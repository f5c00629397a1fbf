"""A deterministic fake model over a simulated paged KV memory (no torch), for scheduler tests.

Each step writes what every fed token's K/V would depend on (its whole prefix)
into its block slot, and for each sequence that samples reads its context back
through its block table: the next token is a function of that context. A wrong
block (a bad prefix hit, a block reused while still owned, a stale slot) gives a
wrong context, and the model asserts.
"""

from __future__ import annotations

from engine.api import SamplingParams
from engine.block_manager import BlockManager
from engine.scheduler import ScheduledBatch, Scheduler
from engine.sequence import Sequence, SequenceStatus

VOCAB = 97


def next_token(context: list[int]) -> int:
    return (context[-1] * 31 + len(context) * 7 + sum(context[-5:])) % VOCAB


class FakeModel:
    def __init__(self, bm: BlockManager) -> None:
        self.bm = bm
        self.memory: dict[tuple[int, int], tuple[int, ...]] = {}  # (block, offset) -> prefix

    def run(self, batch: ScheduledBatch) -> list[int | None]:
        bs = self.bm.block_size
        out: list[int | None] = []
        rows = zip(batch.seqs, batch.num_new_tokens, batch.produces_token, strict=True)
        for seq, n, produces in rows:
            start = seq.num_computed_tokens
            assert n > 0 and start + n <= seq.num_tokens
            assert len(seq.block_table) * bs >= start + n, "block table must cover the chunk"
            for pos in range(start, start + n):
                block = seq.block_table[pos // bs]
                # A block being written is owned by this sequence only and not cached.
                assert self.bm.ref_count(block) == 1 and not self.bm.is_cached(block)
                self.memory[(block, pos % bs)] = tuple(seq.token_ids[: pos + 1])
            for pos in range(start + n):  # the attention reads the whole context
                slot = (seq.block_table[pos // bs], pos % bs)
                assert self.memory.get(slot) == tuple(seq.token_ids[: pos + 1]), (seq, pos)
            out.append(next_token(seq.token_ids) if produces else None)
        return out


def greedy(max_tokens: int) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=max_tokens)


def step(sched: Scheduler, model: FakeModel) -> ScheduledBatch:
    """One engine step: schedule, run, update, finish what is done or failed."""
    batch = sched.schedule()
    sched.update(batch, model.run(batch))
    for seq in batch.seqs:
        if seq.status is SequenceStatus.RUNNING and (
            seq.num_completion_tokens >= seq.sampling.max_tokens
        ):
            seq.finish("length")
            sched.remove(seq)
    for seq in batch.failed:
        seq.finish("error", seq.error)
    return batch


def expected_completion(prompt: list[int], max_tokens: int) -> list[int]:
    tokens = list(prompt)
    for _ in range(max_tokens):
        tokens.append(next_token(tokens))
    return tokens[len(prompt) :]


def make_seq(prompt: list[int], project: str = "p", max_tokens: int = 4, rid: str = "") -> Sequence:
    return Sequence(rid or f"r{len(prompt)}", prompt, greedy(max_tokens), project)
