"""Accepted turns per session, in arrival order: the head of a lane is the one in flight."""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from agent.core.outcome import Deliver, DeltaSink, TurnRequest
from agent.core.sessions import Session, SessionKey
from engine.api import GenerationRequest, GenerationResult

OnSent = Callable[[], None]  # called once the turn's result was delivered (MQTT: the PUBACK)


@dataclass(eq=False)
class Turn:
    request: TurnRequest
    seq: int
    accepted_at: float
    deliver: Deliver  # the front door's: called once, with the turn's Outcome
    door: str  # the front door's name (metrics)
    stream: DeltaSink | None = None  # text deltas, if the front door asked for them
    timeout: float = 0.0  # seconds from accepted_at until the timeout error
    engine_id: str | None = None
    answered: bool = False
    history: Session | None = None  # the session, trimmed, before this turn's reply is added
    generation: GenerationRequest | None = None  # what went to the engine (for one retry)
    result: GenerationResult | None = None  # the engine's result of the last generation
    retried: bool = False
    # The session was reset, swapped, cleared or deleted after this turn read it:
    # it is answered, but its exchange is not recorded over the new state.
    stale: bool = False
    # Called after its result was delivered: its own, and those of copies of the request
    # delivered again meanwhile (same requestId); None once taken.
    on_sent: list[OnSent] | None = field(default_factory=list)
    # Its transport delivers the request again until on_sent is called (Conversation.submit).
    redelivery: bool = False

    key: SessionKey = field(init=False)  # (project, session id), asked for many times

    def __post_init__(self) -> None:
        self.key = (self.request.project, self.request.session_id)


class SessionLanes:
    """Bounded: at most ``max_pending`` accepted turns not yet answered, over all sessions."""

    def __init__(self, max_pending: int) -> None:
        self.max_pending = max_pending
        self._lock = threading.Lock()
        self._room = threading.Condition(self._lock)  # notified when a turn is answered
        self._lanes: dict[SessionKey, deque[Turn]] = {}
        self._pending = 0

    @property
    def pending(self) -> int:
        return self._pending

    def add(self, turn: Turn) -> bool | None:
        """None: full (the turn is not taken); True: it heads its lane (start it); False: queued."""
        with self._lock:
            if self._pending >= self.max_pending:
                return None
            self._pending += 1
            lane = self._lanes.setdefault(turn.key, deque())
            lane.append(turn)
            return len(lane) == 1

    def claim(self, turn: Turn) -> bool:
        """Marks ``turn`` answered; False if it was already (exactly one reply per turn)."""
        with self._lock:
            if turn.answered:
                return False
            turn.answered = True
            self._pending -= 1
            self._room.notify()
            return True

    def wait_for_room(self, timeout: float) -> bool:
        """Waits up to ``timeout`` s until a turn may be added; False if none may."""
        with self._room:
            return self._room.wait_for(lambda: self._pending < self.max_pending, timeout)

    def advance(self, turn: Turn) -> Turn | None:
        """Takes an answered ``turn`` off its lane; if it was in flight, returns the next to start."""
        with self._lock:
            lane = self._lanes.get(turn.key)
            if lane is None or turn not in lane:
                return None
            was_head = lane[0] is turn
            lane.remove(turn)
            if not lane:
                del self._lanes[turn.key]
                return None
            return lane[0] if was_head else None

    def attach(self, copy: TurnRequest, on_sent: OnSent | None) -> bool:
        """Gives ``on_sent`` (of a ``copy`` of a request delivered again; None: nothing to
        give) to the turn of the same requestId and message if its result is not out yet;
        False if there is no such turn."""
        with self._lock:
            for turn in self._lanes.get((copy.project, copy.session_id), ()):
                if (turn.request.request_id == copy.request_id and turn.on_sent is not None
                        and turn.request.message == copy.message):
                    if on_sent is not None:
                        turn.on_sent.append(on_sent)
                    return True
            return False

    def take_on_sent(self, turn: Turn) -> list[OnSent]:
        """The callbacks to call now that ``turn``'s result was delivered."""
        with self._lock:
            callbacks, turn.on_sent = turn.on_sent, None
            return callbacks or []

    def mark_stale(self, project: str, session_id: str | None = None) -> None:
        """Every unanswered turn of the session (of every session of ``project`` for None)."""
        with self._lock:
            for (p, sid), lane in self._lanes.items():
                if p == project and session_id in (None, sid):
                    for turn in lane:
                        turn.stale = True

    def unanswered(self) -> list[Turn]:
        with self._lock:
            return [t for lane in self._lanes.values() for t in lane if not t.answered]
