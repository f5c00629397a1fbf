"""Which sequences go into the next forward pass: continuous batching over paged KV blocks.

Plain Python (no torch). Each step spends at most ``max_num_batched_tokens``
tokens on at most ``max_num_seqs`` sequences, in this order:

1. one token for each running sequence that decodes;
2. the next chunk of prefills in progress (CHUNKED PREFILL: a prompt longer than
   what is left of the budget is split across steps, so it never stalls the
   decodes of others);
3. new admissions (``engine.admission``): FCFS inside a project, round-robin
   between projects, projects within their share first. An admission first
   reuses the longest cached prefix of its tokens (``BlockManager.reuse_prefix``).

A chunk that ends a sequence's known tokens samples a token
(``ScheduledBatch.produces_token``); a partial prefill chunk samples none.

PREEMPTION by recompute. When a running sequence needs a block and none is free,
a victim's blocks are freed, its ``num_computed_tokens`` drops to 0 and it goes
back to the FRONT of its project's waiting queue; its generated tokens stay and
are recomputed as a longer prefill (prefix caching makes that cheap). The victim
is the latest arrival of the project most over its block share; when no project
is over its share, the latest arrival of the needing sequence's own project (it
may be the sequence itself). A sequence that could not fit even in the empty
cache fails (``ScheduledBatch.failed``, ``seq.error`` set) instead of looping.

Shares, the admission order and the fairness bound: ``engine.admission``.
"""

from __future__ import annotations

import logging
from collections import deque
from dataclasses import dataclass, field

from engine.admission import admit
from engine.block_manager import BlockManager
from engine.sequence import Sequence, SequenceStatus

log = logging.getLogger(__name__)

# The contiguous-cache runner has no block budget: a manager too big to run out.
_UNBOUNDED_BLOCKS = 1 << 40


@dataclass
class ScheduledBatch:
    """One step's work: ``seqs[i]`` feeds ``num_new_tokens[i]`` tokens, decodes first.

    ``produces_token[i]``: the chunk reaches the sequence's last token, so the step
    samples one for it. ``preempted``: sent back to waiting during this schedule
    (their KV is gone). ``failed``: can never fit in the cache; already out of the
    scheduler, the engine finishes them with ``seq.error``.
    """

    seqs: list[Sequence] = field(default_factory=list)
    num_new_tokens: list[int] = field(default_factory=list)
    produces_token: list[bool] = field(default_factory=list)
    is_prefill: list[bool] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)
    failed: list[Sequence] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.seqs)

    @property
    def is_empty(self) -> bool:
        return not self.seqs

    @property
    def num_tokens(self) -> int:
        return sum(self.num_new_tokens)

    @property
    def num_prefills(self) -> int:
        return sum(self.is_prefill)

    def add(self, seq: Sequence, n: int, prefill: bool) -> None:
        self.seqs.append(seq)
        self.num_new_tokens.append(n)
        self.produces_token.append(seq.num_computed_tokens + n == seq.num_tokens)
        self.is_prefill.append(prefill)

    def drop(self, seq: Sequence) -> None:
        """Take a preempted sequence back out of this step (no-op if not in it)."""
        i = next((i for i, s in enumerate(self.seqs) if s is seq), None)
        if i is not None:
            for column in (self.seqs, self.num_new_tokens, self.produces_token, self.is_prefill):
                del column[i]


class Scheduler:
    """Waiting queues (one per project), the running list and the block manager."""

    def __init__(
        self,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        block_manager: BlockManager | None = None,
    ) -> None:
        if max_num_seqs < 1 or max_num_batched_tokens < 1:
            raise ValueError("max_num_seqs and max_num_batched_tokens must be >= 1")
        # Every running sequence may decode in the same step, so they must fit the budget,
        # with a token to spare for an admission (see the fairness bound).
        self.max_num_seqs = min(max_num_seqs, max(max_num_batched_tokens - 1, 1))
        self.max_num_batched_tokens = max_num_batched_tokens
        self.block_manager = block_manager or BlockManager(
            _UNBOUNDED_BLOCKS, 16, enable_prefix_caching=False
        )
        self.waiting: dict[str, deque[Sequence]] = {}  # project -> FCFS queue, in first-seen order
        self.running: list[Sequence] = []  # in admission order
        self.num_preemptions = 0  # since start (engine stats)
        self._next_project = 0  # round-robin pointer into the waiting projects

    # -- queries ----------------------------------------------------------------------------

    @property
    def num_waiting(self) -> int:
        return sum(len(q) for q in self.waiting.values())

    @property
    def num_running(self) -> int:
        return len(self.running)

    def has_unfinished(self) -> bool:
        return bool(self.running) or self.num_waiting > 0

    def all_sequences(self) -> list[Sequence]:
        return [*self.running, *(s for q in self.waiting.values() for s in q)]

    def num_running_of(self, project: str) -> int:
        return sum(1 for s in self.running if s.project == project)

    def slots_over_share(self, project: str) -> float:
        """Running sequences minus the project's slot share: > 0 over, < 0 within."""
        share = self.max_num_seqs * self.block_manager.share(project)
        return self.num_running_of(project) - share

    def within_share(self, project: str) -> bool:
        """Fewer blocks than its share, and room for one more sequence in its slot share."""
        bm = self.block_manager
        return bm.blocks_over_share(project) < 0 and self.slots_over_share(project) + 1 <= 0

    # -- changes ----------------------------------------------------------------------------

    def add(self, seq: Sequence) -> None:
        seq.status = SequenceStatus.WAITING
        self.block_manager.register_project(seq.project)
        self.waiting.setdefault(seq.project, deque()).append(seq)

    def remove(self, seq: Sequence) -> None:
        """Take a sequence out (finished, cancelled or failed) and free its blocks."""
        self.block_manager.free(seq)
        if seq in self.running:
            self.running.remove(seq)
            return
        queue = self.waiting.get(seq.project)
        if queue is not None and seq in queue:
            queue.remove(seq)
            if not queue:
                self._drop_project(seq.project)

    def schedule(self) -> ScheduledBatch:
        """Decodes, then prefills in progress, then admissions, within the token budget."""
        batch = ScheduledBatch()
        in_order = sorted(self.running, key=lambda s: s.num_uncomputed_tokens > 1)  # stable
        for seq in in_order:
            budget = self.max_num_batched_tokens - batch.num_tokens
            if seq.status is not SequenceStatus.RUNNING or budget <= 0:
                continue  # preempted by an earlier one; or only prefill chunks are left
            n = min(seq.num_uncomputed_tokens, budget)
            if self._reserve(seq, n, batch):
                batch.add(seq, n, prefill=n > 1 or seq.is_prefill)
        admit(self, batch)
        return batch

    def update(self, batch: ScheduledBatch, token_ids: list[int | None]) -> None:
        """Record a finished step: the fed tokens are computed (full blocks become cached);
        append each sampled token. Tokens of chunks that produce none are ignored."""
        assert len(token_ids) == len(batch.seqs)
        rows = zip(batch.seqs, batch.num_new_tokens, batch.produces_token, token_ids, strict=True)
        for seq, n, produces, tok in rows:
            if seq.status is not SequenceStatus.RUNNING:
                continue  # removed since the schedule
            seq.num_computed_tokens += n
            if produces and tok is not None:
                seq.append_token(tok)
            self.block_manager.mark_computed(seq)

    # -- blocks for running sequences ---------------------------------------------------------

    def _reserve(self, seq: Sequence, n: int, batch: ScheduledBatch) -> bool:
        """Blocks for the next ``n`` tokens of a running sequence, preempting if needed."""
        bm = self.block_manager
        if bm.blocks_for(seq.num_computed_tokens + n) > bm.num_blocks:
            self.fail(seq, batch)
            return False
        while not bm.allocate_slots(seq, n):
            victim = self._victim_for(seq)
            self.preempt(victim, batch)
            if victim is seq:
                return False
        return True

    def _victim_for(self, seq: Sequence) -> Sequence:
        """Latest arrival of the project most over its block share, else of seq's project."""
        over = {
            p: self.block_manager.blocks_over_share(p) for p in {s.project for s in self.running}
        }
        pool = [s for s in self.running if over[s.project] > 0]
        if not pool:
            pool = [s for s in self.running if s.project == seq.project]
        return max(pool, key=lambda s: (over[s.project], s.arrival_time, s.seq_id))

    def preempt(self, seq: Sequence, batch: ScheduledBatch) -> None:
        """Free a running sequence's blocks; it waits again, first in its project's queue."""
        log.debug("preempting %s", seq)
        self.block_manager.free(seq)
        self.running.remove(seq)
        seq.status = SequenceStatus.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.setdefault(seq.project, deque()).appendleft(seq)
        batch.drop(seq)
        batch.preempted.append(seq)

    def fail(self, seq: Sequence, batch: ScheduledBatch) -> None:
        """A sequence the whole cache cannot hold: out of the scheduler, into ``batch.failed``."""
        bm = self.block_manager
        seq.error = (
            f"the sequence needs more than the {bm.num_blocks} KV cache blocks "
            f"of {bm.block_size} tokens ({bm.num_blocks * bm.block_size} tokens)"
        )
        log.warning("request %s failed: %s", seq.request_id, seq.error)
        self.remove(seq)
        batch.failed.append(seq)

    # -- round robin between projects ---------------------------------------------------------

    def project_order(self) -> list[str]:
        names = list(self.waiting)
        if not names:
            return []
        k = self._next_project % len(names)
        return names[k:] + names[:k]

    def pop_waiting(self, project: str) -> Sequence:
        """Admit the head of a project's queue and move the round-robin pointer past it."""
        names = list(self.waiting)
        idx = names.index(project)
        seq = self.waiting[project].popleft()
        if self.waiting[project]:
            self._next_project = idx + 1  # the next admission starts with the next project
        else:
            self._drop_project(project)
        seq.status = SequenceStatus.RUNNING
        seq.mark_scheduled()
        self.running.append(seq)
        return seq

    def _drop_project(self, project: str) -> None:
        names = list(self.waiting)
        idx = names.index(project)
        del self.waiting[project]
        if idx < self._next_project:
            self._next_project -= 1
