"""Game states (``maze/state``): a rate limit of their own, and only the newest one waits.

A game publishes its state on every tick (the web maze game every 500 ms, 120 a minute),
and only the newest state matters to it. Under the chat limit (20 requests a minute per
session) a third of them got "Rate limit exceeded"; queued one behind another, the hint
for an old state came after the game had moved on. So a state is counted against
``--state_rate_limit`` (states per second per session) instead of the chat limit, and while
its session's last state is being answered it waits in its place; a newer state replaces a
waiting one. A replaced state gets no reply (the game only shows the newest hint; an error
for it would reach the game as one) and its PUBACK is sent at once.

Memory: an entry per session with a state being answered (a turn in the core's queue, so
at most ``--max_queue`` of them) and one waiting state each.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field

from agent.core.rate_limit import RateLimiter
from agent.mqtt.acks import Ack

log = logging.getLogger(__name__)

# Hands a state to the core, outside the chat rate limit (it was counted against
# --state_rate_limit), with the Ack its turn is to call after the reply (True: the turn
# holds it; False: answered or refused already, it will not be called).
Submit = Callable[[Ack], bool]


class _After(Ack):
    """A state turn's Ack: the received message's PUBACK, then the session's next state."""

    def __init__(self, ack: Ack, then: Callable[[], None]) -> None:  # noqa: D107
        self._ack, self._then, self._once = ack, then, threading.Lock()
        self.held = False

    def hold(self) -> Ack:
        self.held = True
        return self

    def __call__(self) -> None:
        if not self._once.acquire(blocking=False):
            return
        self._ack()
        self._then()


@dataclass
class _Waiting:
    submit: Submit
    ack: Ack


@dataclass
class _Lane:
    """A session with a state being answered (``turn``: a token of that submission)."""

    turn: object = field(default_factory=object)
    waiting: _Waiting | None = None


class StateGate:
    def __init__(self, per_second: int, max_sessions: int = 10_000,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._limiter = RateLimiter(per_second, 1.0, max_sessions, clock)
        self._lock = threading.Lock()
        self._lanes: dict[Hashable, _Lane] = {}
        self.superseded = 0  # states replaced before they were answered

    def allow(self, key: Hashable) -> bool:
        """Counts a state of session ``key`` against ``--state_rate_limit``."""
        return self._limiter.allow(key)

    def offer(self, key: Hashable, submit: Submit, ack: Ack) -> None:
        """Submits the state now, or after the one of its session being answered. Takes
        ``ack`` over (held): it is sent after the state's reply, or when a newer state
        replaces it."""
        state = _Waiting(submit, ack.hold())
        with self._lock:
            lane = self._lanes.get(key)
            queued = lane is not None
            if lane is None:
                lane = self._lanes[key] = _Lane()
                replaced = None
            else:
                replaced, lane.waiting = lane.waiting, state
        if not queued:
            self._start(key, lane, state)
        elif replaced is not None:
            self._supersede(key, replaced)

    def busy(self) -> int:
        """Sessions with a state being answered."""
        with self._lock:
            return len(self._lanes)

    def _supersede(self, key: Hashable, state: _Waiting) -> None:
        with self._lock:
            self.superseded += 1
        log.debug("a state of session %.200r replaced by a newer one before it was answered", key)
        state.ack()

    def _start(self, key: Hashable, lane: _Lane, state: _Waiting) -> None:
        """Submits ``state`` (outside the chat rate limit: see ``Submit``); its turn's end
        starts the next."""
        token = lane.turn
        after = _After(state.ack, lambda: self._next(key, token))
        try:
            held = state.submit(after)
        except BaseException:
            after()  # the session's lane must not stay busy
            raise
        if not held:  # refused (overloaded, shutting down) or answered already: over now
            after()

    def _next(self, key: Hashable, token: object) -> None:
        """The state ``token`` was answered: the waiting one goes next, or the lane closes."""
        with self._lock:
            lane = self._lanes.get(key)
            if lane is None or lane.turn is not token:
                return
            waiting, lane.waiting = lane.waiting, None
            if waiting is None:
                del self._lanes[key]
                return
            lane.turn = object()
        self._start(key, lane, waiting)
