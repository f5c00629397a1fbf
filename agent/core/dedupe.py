"""Answer a (project, session, requestId) once, also when QoS 1 delivers it again."""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable


class Deduper:
    """Remembers keys for ``ttl`` seconds, at most ``max_keys`` of them (oldest go first)."""

    def __init__(
        self, ttl: float, max_keys: int = 10_000, clock: Callable[[], float] = time.monotonic
    ) -> None:
        if ttl <= 0 or max_keys < 1:
            raise ValueError("ttl must be > 0 and max_keys >= 1")
        self.ttl = ttl
        self.max_keys = max_keys
        self._clock = clock
        self._lock = threading.Lock()
        self._seen: OrderedDict[Hashable, float] = OrderedDict()

    def seen(self, key: Hashable) -> bool:
        """True if ``key`` came before (and is remembered); else remember it and return False."""
        with self._lock:
            now = self._clock()
            while self._seen:
                oldest, at = next(iter(self._seen.items()))
                if now - at < self.ttl:
                    break
                del self._seen[oldest]
            if key in self._seen:
                return True
            self._seen[key] = now
            while len(self._seen) > self.max_keys:
                self._seen.popitem(last=False)
            return False

    def __len__(self) -> int:
        with self._lock:
            return len(self._seen)
