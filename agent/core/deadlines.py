"""One thread that fires a callback when an item's deadline has passed."""

from __future__ import annotations

import heapq
import itertools
import logging
import math
import threading
import time
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)


class DeadlineWatcher:
    """``done(item)``: the item needs no deadline any more; such items at the head are dropped
    as new ones come, so that a busy agent does not hold every answered request until its
    deadline (with one timeout for all, the head is always the oldest)."""

    def __init__(self, on_expire: Callable[[Any], None], clock: Callable[[], float] = time.monotonic,
                 done: Callable[[Any], bool] | None = None) -> None:
        self._on_expire = on_expire
        self._done = done
        self._clock = clock
        self._heap: list[tuple[float, int, Any]] = []
        self._order = itertools.count()
        self._cond = threading.Condition()
        self._stopped = False
        self._sleeping_until = math.inf  # the deadline the loop waits for
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="agent-deadlines", daemon=True)
        self._thread.start()

    def add(self, deadline: float, item: Any) -> None:
        with self._cond:
            if self._done is not None:
                while self._heap and self._done(self._heap[0][2]):
                    heapq.heappop(self._heap)
            heapq.heappush(self._heap, (deadline, next(self._order), item))
            if deadline < self._sleeping_until:  # else the loop wakes in time on its own
                self._cond.notify()

    def __len__(self) -> int:
        """Items held: unexpired ones, and answered ones not dropped yet."""
        with self._cond:
            return len(self._heap)

    def stop(self) -> None:
        with self._cond:
            self._stopped = True
            self._cond.notify()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._stopped:
                    self._sleeping_until = self._heap[0][0] if self._heap else math.inf
                    wait = self._sleeping_until - self._clock()
                    if wait <= 0:
                        break
                    self._cond.wait(None if wait == math.inf else wait)
                self._sleeping_until = -math.inf  # busy: add() need not wake it
                if self._stopped:
                    return
                item = heapq.heappop(self._heap)[2]
            try:
                self._on_expire(item)
            except Exception:
                log.exception("deadline callback failed")
