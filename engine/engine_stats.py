"""Counters the engine loop updates and any thread may read (``LLMEngine.stats``)."""

from __future__ import annotations

import threading
import time
from collections import deque

RATE_WINDOW_S = 10.0  # tokens/s is measured over the steps of this last window


class EngineStats:
    """Thread-safe counters plus a sliding window of steps for tokens/s."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts: dict[str, int] = dict.fromkeys(
            ("running", "waiting", "processed", "errors", "cancelled", "steps",
             "prompt_tokens", "tokens_generated"),
            0,
        )  # fmt: skip
        self._steps: deque[tuple[float, float, int]] = deque()  # (start, end, tokens sampled)

    def add(self, **deltas: int) -> None:
        with self._lock:
            for key, value in deltas.items():
                self._counts[key] += value

    def set(self, **values: int) -> None:
        with self._lock:
            self._counts.update(values)

    def record_step(self, start: float, end: float, prompt_tokens: int, tokens: int) -> None:
        with self._lock:
            self._counts["steps"] += 1
            self._counts["prompt_tokens"] += prompt_tokens
            self._counts["tokens_generated"] += tokens
            self._steps.append((start, end, tokens))
            self._forget_steps_before(end - RATE_WINDOW_S)  # also when nobody reads the rate

    def snapshot(self) -> dict[str, float]:
        now = time.monotonic()
        with self._lock:
            out: dict[str, float] = dict(self._counts)
            self._forget_steps_before(now - RATE_WINDOW_S)
            tokens = sum(n for _, _, n in self._steps)
            span = now - self._steps[0][0] if self._steps else 0.0
        out["tokens_per_s"] = tokens / span if span > 0 else 0.0
        return out

    def _forget_steps_before(self, cutoff: float) -> None:
        while self._steps and self._steps[0][1] < cutoff:
            self._steps.popleft()
