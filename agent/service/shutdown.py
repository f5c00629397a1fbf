"""Graceful stop: SIGTERM or SIGINT drains the agent, a second signal ends it at once.

The first signal only sets a flag (``on_first``); the main thread then runs the
graceful stop (``Agent.stop_gracefully``): new requests answered with the
shutting-down error (``shutting_down`` in the JSON envelope), STOPPING=1, the ones
already accepted finish within ``--shutdown_timeout`` (``drain``), the rest get the
shutting-down error, then the offline status, a clean MQTT disconnect, engine
shutdown and exit code 0. A second SIGTERM/SIGINT meanwhile calls ``os._exit``
with ``128 + signal number`` (143 for SIGTERM, 130 for SIGINT, as a shell reports
a killed job): nothing more is answered; the broker publishes the Last Will
(offline) for the dropped connection.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from types import FrameType

log = logging.getLogger(__name__)

SIGNALS = (signal.SIGTERM, signal.SIGINT)
FORCED_EXIT_BASE = 128  # a second signal exits with 128 + its number


def forced_exit_code(signum: int) -> int:
    return FORCED_EXIT_BASE + signum


class ShutdownSignals:
    """SIGTERM/SIGINT handlers: the first calls ``on_first()`` (which must only set a flag:
    it runs inside a signal handler), a second one calls ``exit(128 + signum)``."""

    def __init__(self, on_first: Callable[[], None],
                 exit: Callable[[int], object] = os._exit) -> None:
        self._on_first = on_first
        self._exit = exit
        self.received: int | None = None  # the first signal's number

    @contextlib.contextmanager
    def installed(self) -> Iterator[ShutdownSignals]:
        """Installs the handlers for the block (in the main thread only: elsewhere Python
        cannot install them, and the block runs without), then restores the previous ones."""
        previous: dict[int, object] = {}
        if threading.current_thread() is threading.main_thread():
            for sig in SIGNALS:
                previous[sig] = signal.signal(sig, self.handle)
        try:
            yield self
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)  # type: ignore[arg-type]

    def handle(self, signum: int, frame: FrameType | None = None) -> None:
        name = signal.Signals(signum).name
        if self.received is None:
            self.received = signum
            log.info("signal %s received: stopping gracefully (send it again to exit at once)", name)
            self._on_first()
            return
        code = forced_exit_code(signum)
        # os.write, not logging: the main thread may be inside a logging call right now
        with contextlib.suppress(OSError):
            os.write(2, f"second signal {name}: exiting at once with code {code}\n".encode())
        self._exit(code)


def drain(pending: Callable[[], int], timeout: float, poll: float = 0.05,
          clock: Callable[[], float] = time.monotonic) -> int:
    """Waits up to ``timeout`` s until the ``pending()`` accepted requests are all answered
    (the caller has made new ones get the shutting-down reply); returns how many are left."""
    deadline = clock() + timeout
    left = pending()
    if left:
        log.info("waiting up to %g s for %d requests in flight", timeout, left)
    while left and clock() < deadline:
        time.sleep(poll)
        left = pending()
    if left:
        log.warning("%d requests not finished within --shutdown_timeout %g s: answering them "
                    "with the shutting-down error", left, timeout)
    return left
