"""One thread that fires a callback when an item's deadline has passed."""

from __future__ import annotations

import heapq
import itertools
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)


class DeadlineWatcher:
    def __init__(self, on_expire: Callable[[Any], None], clock: Callable[[], float] = time.monotonic) -> None:
        self._on_expire = on_expire
        self._clock = clock
        self._heap: list[tuple[float, int, Any]] = []
        self._order = itertools.count()
        self._cond = threading.Condition()
        self._stopped = False
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="agent-deadlines", daemon=True)
        self._thread.start()

    def add(self, deadline: float, item: Any) -> None:
        with self._cond:
            heapq.heappush(self._heap, (deadline, next(self._order), item))
            if self._heap[0][2] is item:
                self._cond.notify()

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
                    wait = self._heap[0][0] - self._clock() if self._heap else None
                    if wait is not None and wait <= 0:
                        break
                    self._cond.wait(wait)
                if self._stopped:
                    return
                item = heapq.heappop(self._heap)[2]
            try:
                self._on_expire(item)
            except Exception:
                log.exception("deadline callback failed")
