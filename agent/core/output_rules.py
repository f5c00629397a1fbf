"""Applies a project's output rules (``projects.OutputRules``) to a finished reply, and counts.

The core stays generic: it asks ``review`` what to send. A reply that breaks
its project's ``check`` is generated once more; the second one goes out
through ``finalize`` whatever it holds (the project repairs what it can). Both
events are counted per project (``Conversation.stats()``) and logged.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import replace

from engine.api import GenerationRequest, SamplingParams
from projects import OutputRules

log = logging.getLogger(__name__)

# A greedy retry would repeat the reply it replaces: the retry samples at least this warm.
RETRY_MIN_TEMPERATURE = 0.7


def retry_sampling(sampling: SamplingParams) -> SamplingParams:
    return replace(sampling, temperature=max(sampling.temperature, RETRY_MIN_TEMPERATURE), seed=None)


def retry_request(generation: GenerationRequest) -> GenerationRequest:
    """The same prompt once more, under a new engine request id."""
    return replace(generation, request_id=generation.request_id + "-retry",
                   sampling=retry_sampling(generation.sampling))


class RuleReviewer:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts: dict[str, dict[str, int]] = {}

    def _count(self, project: str, event: str) -> int:
        with self._lock:
            counts = self._counts.setdefault(project, {"regenerated": 0, "repaired": 0})
            counts[event] += 1
            return counts[event]

    def counts(self) -> dict[str, dict[str, int]]:
        with self._lock:
            return {p: dict(c) for p, c in self._counts.items()}

    def review(self, project: str, rules: OutputRules, text: str, seq: int, can_retry: bool) -> str | None:
        """The text to send, or None: generate the reply once more."""
        problem = _safely(rules.check, text, None, seq)
        if problem and can_retry:
            n = self._count(project, "regenerated")
            log.info("request %d: the %s reply breaks its rules (%s): generating it once more "
                     "(%d regenerated so far)", seq, project, problem, n)
            return None
        final = _safely(rules.finalize, text, text, seq) or text
        if problem or final.strip() != text.strip():
            n = self._count(project, "repaired")
            log.warning("request %d: the %s reply was repaired by %s (%s; %d repaired so far)",
                        seq, project, rules.module, problem or "finalize changed it", n)
        return final


def _safely(fn: object, text: str, default: str | None, seq: int) -> str | None:
    if fn is None:
        return default
    try:
        return fn(text)  # type: ignore[operator]
    except Exception:  # a bug in a project's rules must not cost the reply
        log.exception("request %d: output rule %r failed", seq, fn)
        return default
