"""The engine loop's requests in flight: admit, stream deltas, finish with a result.

Loop thread only (and ``LLMEngine.shutdown`` before the loop ever started). Every
admitted request ends in exactly one ``finish``, which frees its KV blocks and calls
its ``on_done``; callbacks go through ``call_safely`` so a raising one cannot stop
the loop.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from engine.api import GenerationRequest
from engine.detokenizer import IncrementalDetokenizer
from engine.engine_stats import EngineStats
from engine.model_runner import ModelRunner
from engine.scheduler import Scheduler
from engine.sequence import Sequence
from engine.tokenizer import Tokenizer
from engine.validation import empty_result, validate_request

log = logging.getLogger(__name__)


def call_safely(fn: Callable[[Any], None], arg: Any) -> None:
    """Call a request callback; log what it raises and carry on."""
    try:
        fn(arg)
    except Exception:
        log.exception("a request callback raised; the engine carries on")


@dataclass
class _Active:
    request: GenerationRequest
    seq: Sequence
    detok: IncrementalDetokenizer


@dataclass
class RequestTracker:
    """Requests the loop has admitted, by request id, with their sequence and detokenizer."""

    tokenizer: Tokenizer
    scheduler: Scheduler
    runner: ModelRunner
    stats: EngineStats
    max_model_len: int
    vocab_size: int
    _active: dict[str, _Active] = field(default_factory=dict, init=False)

    def add(self, request: GenerationRequest, arrival: float) -> None:
        """Validate and schedule ``request``; an invalid one is answered with an error."""
        error = validate_request(request, self.max_model_len, self.vocab_size)
        if error is None and request.request_id in self._active:
            error = f"request id {request.request_id!r} is already in flight"
        if error is not None:
            log.info("rejected request %s: %s", request.request_id, error)
            self.stats.add(processed=1, errors=1)
            call_safely(request.on_done, empty_result(request, "error", error, arrival))
            return
        ids, sampling = request.prompt_token_ids, request.sampling
        seq = Sequence(request.request_id, ids, sampling, request.project, arrival_time=arrival)
        eos = () if sampling.ignore_eos else self.tokenizer.eos_token_ids
        detok = IncrementalDetokenizer(self.tokenizer, ids, sampling.stop, eos)
        self._active[request.request_id] = _Active(request, seq, detok)
        self.scheduler.add(seq)
        self.update_sizes()

    def postprocess(self, seq: Sequence) -> None:
        """Detokenize ``seq``'s new token, stream the delta, finish on stop or length."""
        act = self._active[seq.request_id]
        delta = act.detok.add_token(seq.last_token_id)
        reason = "stop" if act.detok.stopped else None
        if reason is None and (
            seq.num_completion_tokens >= seq.sampling.max_tokens
            or seq.num_tokens >= self.max_model_len
        ):
            delta += act.detok.flush()  # may still find a stop string in held-back text
            reason = "stop" if act.detok.stopped else "length"
        if delta and act.request.on_delta is not None:
            call_safely(act.request.on_delta, delta)
        if reason is not None:
            self.finish(seq, reason)

    def finish(self, seq: Sequence, reason: str, error: str | None = None) -> None:
        """Free ``seq``'s blocks and answer its ``on_done``; a no-op once it has finished."""
        act = self._active.pop(seq.request_id, None)
        if act is None or act.seq is not seq:
            return
        seq.finish(reason, error)
        self.scheduler.remove(seq)
        self.runner.free(seq)
        result = seq.to_result(act.detok.text)
        self.stats.add(processed=1, errors=reason == "error", cancelled=reason == "cancelled")
        log.debug("request %s finished (%s) after %.3f s", seq.request_id, reason, result.total_s)
        call_safely(act.request.on_done, result)

    def cancel(self, request_id: str) -> None:
        """Finish ``request_id`` with ``"cancelled"`` if it is still in flight."""
        act = self._active.get(request_id)
        if act is not None:
            self.finish(act.seq, "cancelled")

    def cancel_all(self) -> None:
        for act in list(self._active.values()):
            self.finish(act.seq, "cancelled", "the engine shut down")
        self.update_sizes()

    def update_sizes(self) -> None:
        self.stats.set(running=self.scheduler.num_running, waiting=self.scheduler.num_waiting)
