"""Sliding-window rate limits (per session, per client)."""

from __future__ import annotations

import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Hashable

RATE_LIMITED = "Error: Rate limit exceeded. Please slow down your requests."


class RateLimiter:
    """At most ``max_requests`` accepted per key in any ``window`` seconds.

    Keys idle for a whole window are forgotten; beyond ``max_keys`` the least
    recently used go, so a flood of new session ids cannot grow memory.
    """

    def __init__(
        self,
        max_requests: int,
        window: float,
        max_keys: int = 10_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if max_requests < 1 or window <= 0 or max_keys < 1:
            raise ValueError("max_requests and max_keys must be >= 1, window > 0")
        self.max_requests = max_requests
        self.window = window
        self.max_keys = max_keys
        self._clock = clock
        self._lock = threading.Lock()
        self._hits: OrderedDict[Hashable, deque[float]] = OrderedDict()

    def allow(self, key: Hashable) -> bool:
        """Counts the request if allowed; a refused one does not count."""
        with self._lock:
            now = self._clock()
            self._forget_idle(now)
            hits = self._hits.get(key)
            if hits is None:
                hits = self._hits[key] = deque()
            self._hits.move_to_end(key)
            while hits and now - hits[0] >= self.window:
                hits.popleft()
            if len(hits) >= self.max_requests:
                return False
            hits.append(now)
            while len(self._hits) > self.max_keys:
                self._hits.popitem(last=False)
            return True

    def refund(self, key: Hashable) -> None:
        """Takes back the last request counted for ``key`` (it was refused after all: only
        admitted requests count)."""
        with self._lock:
            hits = self._hits.get(key)
            if hits:
                hits.pop()

    def _forget_idle(self, now: float) -> None:
        while self._hits:
            key, hits = next(iter(self._hits.items()))
            if hits and now - hits[-1] < self.window:
                break
            del self._hits[key]

    def __len__(self) -> int:
        with self._lock:
            return len(self._hits)
