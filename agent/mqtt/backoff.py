"""Capped exponential back-off with jitter, for reconnecting to the broker.

paho doubles its reconnect delay up to a cap but adds no jitter: boxes that lost
the same broker would all knock again at the same instants. This draws each
wait uniformly from the upper half of the exponential step ("equal jitter").
"""

from __future__ import annotations

import random
import time
from collections import deque
from collections.abc import Callable


class Backoff:
    """``next()``: the wait before attempt n (0, 1, ...): in [d/2, d] with
    d = min(cap, first * 2**n); ``reset()`` after a success."""

    def __init__(self, first: float, cap: float, rng: random.Random | None = None) -> None:
        if first <= 0 or cap < first:
            raise ValueError(f"back-off needs 0 < first <= cap, got first={first}, cap={cap}")
        self.first = first
        self.cap = cap
        self._rng = rng or random.Random()
        self.attempt = 0

    def next(self) -> float:
        step = min(self.cap, self.first * 2 ** min(self.attempt, 32))
        self.attempt += 1
        return self._rng.uniform(step / 2, step)

    def reset(self) -> None:
        self.attempt = 0


class DropCounter:
    """Connection drops within the last ``window`` seconds: several in a row mean flapping,
    e.g. two agents with one client id, each taking the other's session over."""

    def __init__(self, window: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.window = window
        self._clock = clock
        self._times: deque[float] = deque()

    def record(self) -> int:
        """Counts a drop now; returns how many fell within the window."""
        now = self._clock()
        self._times.append(now)
        while now - self._times[0] > self.window:
            self._times.popleft()
        return len(self._times)
