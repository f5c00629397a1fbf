"""One request's state inside the engine: token ids, progress, status, timings.

Plain Python (no torch), so the scheduler and its tests stay fast. The KV of a
sequence lives in fixed-size cache blocks; the sequence holds only their ids
(``block_table``, filled by ``engine.block_manager.BlockManager``) and counts how
many of its tokens are already in them (``num_computed_tokens``).
"""

from __future__ import annotations

import itertools
import time
from enum import Enum

from engine.api import GenerationResult, SamplingParams

_seq_counter = itertools.count()


class SequenceStatus(Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class Sequence:
    """Prompt + completion of one request, and where the engine is with it."""

    def __init__(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        sampling: SamplingParams,
        project: str = "general",
        arrival_time: float | None = None,
    ) -> None:
        if not prompt_token_ids:
            raise ValueError("a sequence needs at least one prompt token")
        self.seq_id = next(_seq_counter)
        self.request_id = request_id
        self.project = project
        self.sampling = sampling
        self.token_ids: list[int] = list(prompt_token_ids)
        self.num_prompt_tokens = len(prompt_token_ids)
        self.num_computed_tokens = 0  # tokens whose K/V are in the cache
        self.num_cached_prompt_tokens = 0  # prompt tokens reused from the prefix cache
        self.block_table: list[int] = []  # KV block ids, in token order (block manager)
        # Chain id of each full, computed block of the table (prefix caching, block manager).
        self.block_chain_ids: list[int] = []
        self.num_preemptions = 0  # times its KV was dropped to make room (recomputed later)
        self.status = SequenceStatus.WAITING
        self.finish_reason: str | None = None
        self.error: str | None = None
        self.arrival_time = time.monotonic() if arrival_time is None else arrival_time
        self.first_scheduled_time: float | None = None
        self.first_token_time: float | None = None
        self.finish_time: float | None = None

    def __repr__(self) -> str:
        return (
            f"Sequence(id={self.seq_id}, request={self.request_id!r}, status={self.status.value}, "
            f"prompt={self.num_prompt_tokens}, completion={self.num_completion_tokens})"
        )

    # -- sizes ------------------------------------------------------------------------------

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_completion_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def completion_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def prompt_token_ids(self) -> list[int]:
        return self.token_ids[: self.num_prompt_tokens]

    @property
    def last_token_id(self) -> int:
        return self.token_ids[-1]

    @property
    def num_uncomputed_tokens(self) -> int:
        """Tokens still to feed the model: the whole prompt before prefill, then 1 per decode."""
        return len(self.token_ids) - self.num_computed_tokens

    @property
    def is_prefill(self) -> bool:
        return self.num_computed_tokens < self.num_prompt_tokens

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    # -- updates ----------------------------------------------------------------------------

    def append_token(self, token_id: int, now: float | None = None) -> None:
        if self.first_token_time is None:
            self.first_token_time = time.monotonic() if now is None else now
        self.token_ids.append(token_id)

    def mark_scheduled(self, now: float | None = None) -> None:
        if self.first_scheduled_time is None:
            self.first_scheduled_time = time.monotonic() if now is None else now

    def finish(self, reason: str, error: str | None = None, now: float | None = None) -> None:
        self.status = SequenceStatus.FINISHED
        self.finish_reason = reason
        self.error = error
        self.finish_time = time.monotonic() if now is None else now

    # -- timings (seconds) ------------------------------------------------------------------

    def timings(self) -> tuple[float, float, float]:
        """``(queue_s, ttft_s, total_s)`` measured from arrival; 0 for what never happened."""
        end = self.finish_time if self.finish_time is not None else time.monotonic()
        queue = (self.first_scheduled_time or end) - self.arrival_time
        ttft = (self.first_token_time - self.arrival_time) if self.first_token_time else 0.0
        return max(queue, 0.0), max(ttft, 0.0), max(end - self.arrival_time, 0.0)

    def to_result(self, text: str) -> GenerationResult:
        """The request's result once finished: completion ids, usage and timings."""
        queue_s, ttft_s, total_s = self.timings()
        return GenerationResult(
            request_id=self.request_id,
            text=text,
            token_ids=self.completion_token_ids,
            finish_reason=self.finish_reason or "error",
            prompt_tokens=self.num_prompt_tokens,
            cached_prompt_tokens=self.num_cached_prompt_tokens,
            error=self.error,
            queue_s=queue_s,
            ttft_s=ttft_s,
            total_s=total_s,
        )
