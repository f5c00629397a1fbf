"""The agent as a systemd ``Type=notify`` service: READY, STATUS, WATCHDOG and STOPPING.

- ``READY=1`` once the model is loaded (the launcher builds the engine first) and
  the broker confirmed the subscriptions (SUBACK): from then on requests are served.
- ``STATUS=`` a one-line summary (``serving maze, driving: 12 answered, ...``),
  refreshed every ``status_every`` seconds while it changes; ``systemctl status``
  shows it.
- ``WATCHDOG=1`` every half ``WatchdogSec`` from a thread of its own, but only while
  every watched loop makes progress: the engine loop (``engine.last_progress()``, a
  monotonic time it updates each iteration, idle ones too) and the MQTT network loop
  (``MqttClient.loop_age``: paho's thread is alive and comes round; a reconnect wait
  while the broker is down is not a stall). A hung engine, or an MQTT thread that
  died or is stuck in a callback, stops the pings and systemd restarts the service.
  The engine may be busy in one forward pass for a while, so a loop counts as hung
  only after ``max(WatchdogSec, MIN_STALL_S)`` without progress.
- ``STOPPING=1`` when a stop begins.

Everything is a no-op outside systemd (no ``$NOTIFY_SOCKET``).
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

from agent.service.sd_notify import SdNotify

log = logging.getLogger(__name__)

MIN_STALL_S = 5.0  # the engine and MQTT loops tick every second when idle: allow a few misses
STATUS_EVERY_S = 10.0
ENGINE_LOOP = "engine loop"

LoopAge = Callable[[], float | None]  # seconds a loop went without progress; None: not watched now


def status_text(projects: Iterable[str], summary: dict[str, Any]) -> str:
    """``serving maze, driving: 12 answered, 0 errors, 1 rejected, queue 0, 35.2 tokens/s``."""
    return (f"serving {', '.join(projects)}: {summary.get('processed', 0)} answered, "
            f"{summary.get('errors', 0)} errors, {summary.get('rejected', 0)} rejected, "
            f"queue {summary.get('queueSize', 0)}, {summary.get('tokensPerS', 0):g} tokens/s")


class ServiceNotifier:
    """Tells systemd how the agent is doing; safe to call from any thread, never raises."""

    def __init__(self, sd: SdNotify | None = None, status_every: float = STATUS_EVERY_S,
                 clock: Callable[[], float] = time.monotonic, min_stall: float = MIN_STALL_S) -> None:
        self.sd = sd or SdNotify()
        self.status_every = status_every
        self.min_stall = min_stall
        self._clock = clock
        self._loops: dict[str, LoopAge] = {}  # empty: nothing to watch yet
        self._summary: Callable[[], str] | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._ready = self._stopping = False
        self._stalled: set[str] = set()
        self._last_status = ""

    @property
    def stall_limit(self) -> float:
        """Seconds without progress of a watched loop after which the watchdog pings stop."""
        return max(self.sd.watchdog_limit or 0.0, self.min_stall)

    def start(self) -> None:
        """Starts pinging (unconditionally until ``watch``); idempotent, no thread outside systemd."""
        with self._lock:
            if self._thread is not None or not self.sd.enabled:
                return
            self._thread = threading.Thread(target=self._loop, name="sd-notify", daemon=True)
            self._thread.start()
        if self.sd.watchdog_interval is not None:
            log.info("systemd watchdog: a ping every %.3g s while the engine and MQTT loops progress",
                     self.sd.watchdog_interval)

    def watch(self, engine: object, summary: Callable[[], str]) -> None:
        """From now on ping only while ``engine`` progresses (if it has ``last_progress``);
        ``summary``: the STATUS= text."""
        last_progress = getattr(engine, "last_progress", None)
        if last_progress is not None:
            self.watch_loop(ENGINE_LOOP, lambda: self._clock() - last_progress())
        self._summary = summary

    def watch_loop(self, name: str, age: LoopAge) -> None:
        """Ping only while ``age()`` (seconds the loop ``name`` went without progress; None while
        it is not to be watched) stays within ``stall_limit``, as for the engine loop."""
        self._loops[name] = age

    def loading(self, text: str) -> None:
        self.sd.status(text)

    def subscribed(self) -> None:
        """After each SUBACK (MQTT network thread: quick): READY=1 the first time, else STATUS."""
        with self._lock:
            if self._stopping:
                return
            first, self._ready = not self._ready, True
        text = self._status() or "serving"
        if first:
            if self.sd.ready(status=text):
                log.info("systemd notified: ready")
        else:
            self.sd.status(text)

    def stopping(self, text: str = "stopping: finishing the requests in flight") -> None:
        """STOPPING=1, once."""
        with self._lock:
            if self._stopping:
                return
            self._stopping = True
        self.sd.stopping(status=text)

    def stop(self) -> None:
        self._stop.set()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(5.0)
        self.sd.close()

    def engine_alive(self) -> bool:
        """False once the watched engine went ``stall_limit`` s without progress (/health)."""
        return self._loop_alive(ENGINE_LOOP)

    def alive(self) -> bool:
        """Every watched loop progresses: the condition of each WATCHDOG=1."""
        return all([self._loop_alive(name) for name in list(self._loops)])  # each one logs its change

    def _loop_alive(self, name: str) -> bool:
        age_of = self._loops.get(name)
        if age_of is None:
            return True
        try:
            age = age_of()
        except Exception:
            log.exception("reading the progress of the %s failed", name)
            age = math.inf
        alive = age is None or age <= self.stall_limit
        with self._lock:
            changed = alive == (name in self._stalled)  # log the changes only
            if changed and alive:
                self._stalled.discard(name)
            elif changed:
                self._stalled.add(name)
        if changed and alive:
            log.warning("the %s progresses again: systemd watchdog pings resume", name)
        elif changed and age is not None:
            what = "has stopped" if age == math.inf else f"made no progress for {age:.0f} s"
            log.error("the %s %s: no more systemd watchdog pings, systemd will restart the service",
                      name, what)
        return alive

    def _status(self) -> str | None:
        if self._summary is None:
            return None
        try:
            return self._summary()
        except Exception:
            log.exception("building the systemd status line failed")
            return None

    def _loop(self) -> None:
        ping_every = self.sd.watchdog_interval or math.inf
        tick = min(ping_every, self.status_every, 1.0)
        next_ping = next_status = self._clock()
        while not self._stop.is_set():
            now = self._clock()
            if now >= next_ping:
                next_ping = now + ping_every
                if self.alive():
                    self.sd.watchdog()
            if now >= next_status:
                next_status = now + self.status_every
                self._refresh_status()
            self._stop.wait(max(0.0, min(next_ping, next_status, now + tick) - self._clock()))

    def _refresh_status(self) -> None:
        if not self._ready or self._stopping:
            return
        text = self._status()
        if text is not None and text != self._last_status:
            self._last_status = text
            self.sd.status(text)
