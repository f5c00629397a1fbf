"""Which sequences go into the next forward pass (continuous batching, first version).

Plain Python (no torch). Every step decodes one token of each running sequence
and admits waiting sequences (whole-prompt prefills) while the step stays within
``max_num_batched_tokens`` and the batch within ``max_num_seqs``; so a step may
mix prefills of new sequences with decodes of running ones, and a request that
arrives while others decode joins them at the next step.

Admission is first come, first served inside a project and round-robin between
projects, so one busy project cannot hold the others back.

The seam for the serving-core issue: ``ScheduledBatch.num_new_tokens`` says how
many tokens of each sequence this step feeds, so chunked prefill only changes
the numbers chosen here, and a block manager (KV budget, preemption) plugs into
``_can_admit`` / ``schedule`` without touching the model runner.
"""

from __future__ import annotations

import logging
from collections import deque
from dataclasses import dataclass, field

from engine.sequence import Sequence, SequenceStatus

log = logging.getLogger(__name__)


@dataclass
class ScheduledBatch:
    """One step's work: ``seqs[i]`` feeds ``num_new_tokens[i]`` tokens, decodes first."""

    seqs: list[Sequence] = field(default_factory=list)
    num_new_tokens: list[int] = field(default_factory=list)
    num_prefills: int = 0

    def __len__(self) -> int:
        return len(self.seqs)

    @property
    def is_empty(self) -> bool:
        return not self.seqs

    @property
    def num_tokens(self) -> int:
        return sum(self.num_new_tokens)

    def add(self, seq: Sequence, n: int, prefill: bool) -> None:
        self.seqs.append(seq)
        self.num_new_tokens.append(n)
        self.num_prefills += int(prefill)


class Scheduler:
    """Waiting queues (one per project) and the running list."""

    def __init__(self, max_num_seqs: int, max_num_batched_tokens: int) -> None:
        if max_num_seqs < 1 or max_num_batched_tokens < 1:
            raise ValueError("max_num_seqs and max_num_batched_tokens must be >= 1")
        # Every running sequence decodes every step, so it must fit the token budget.
        self.max_num_seqs = min(max_num_seqs, max_num_batched_tokens)
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: dict[str, deque[Sequence]] = {}  # project -> FCFS queue, in first-seen order
        self.running: list[Sequence] = []
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

    # -- changes ----------------------------------------------------------------------------

    def add(self, seq: Sequence) -> None:
        seq.status = SequenceStatus.WAITING
        self.waiting.setdefault(seq.project, deque()).append(seq)

    def remove(self, seq: Sequence) -> None:
        """Take a sequence out of the queues (finished, cancelled or failed)."""
        if seq in self.running:
            self.running.remove(seq)
            return
        queue = self.waiting.get(seq.project)
        if queue is not None and seq in queue:
            queue.remove(seq)
            if not queue:
                self._drop_project(seq.project)

    def schedule(self) -> ScheduledBatch:
        """Decode every running sequence, then admit waiting ones while they fit."""
        batch = ScheduledBatch()
        for seq in self.running:
            batch.add(seq, seq.num_uncomputed_tokens, prefill=False)
        budget = self.max_num_batched_tokens - batch.num_tokens
        while self.waiting and len(self.running) < self.max_num_seqs:
            project = self._project_order()[0]
            seq = self.waiting[project][0]
            n = seq.num_uncomputed_tokens
            # No chunked prefill yet: a prompt larger than the whole budget would never fit,
            # so it is admitted when it is the step's first prefill (the step runs over budget).
            if n > budget and not (batch.num_prefills == 0 and n > self.max_num_batched_tokens):
                break
            self._pop_waiting(project)
            seq.status = SequenceStatus.RUNNING
            seq.mark_scheduled()
            self.running.append(seq)
            batch.add(seq, n, prefill=True)
            budget -= n
        return batch

    def update(self, batch: ScheduledBatch, token_ids: list[int | None]) -> None:
        """Record a finished step: the fed tokens are cached; append each sampled token.

        ``None`` means no token was sampled for that sequence (a partial prefill, later).
        """
        assert len(token_ids) == len(batch.seqs)
        for seq, n, tok in zip(batch.seqs, batch.num_new_tokens, token_ids, strict=True):
            seq.num_computed_tokens += n
            if tok is not None:
                seq.append_token(tok)

    # -- round robin between projects ---------------------------------------------------------

    def _project_order(self) -> list[str]:
        names = list(self.waiting)
        k = self._next_project % len(names)
        return names[k:] + names[:k]

    def _pop_waiting(self, project: str) -> None:
        names = list(self.waiting)
        idx = names.index(project)
        self.waiting[project].popleft()
        if self.waiting[project]:
            self._next_project = idx + 1  # the next admission starts with the next project
        else:
            self._drop_project(project)

    def _drop_project(self, project: str) -> None:
        names = list(self.waiting)
        idx = names.index(project)
        del self.waiting[project]
        if idx < self._next_project:
            self._next_project -= 1
