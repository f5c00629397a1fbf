"""Conversation history per (project, sessionId), behind a small store interface.

The in-memory store is the default; a shared (Redis) store for several boxes
implements the same four methods. Stores hand out copies: a caller changes a
session by ``put`` only, so one shared by boxes behaves the same.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

SessionKey = tuple[str, str]  # (project, session_id)


@dataclass
class Session:
    system_prompt: str
    turns: list[tuple[str, str]] = field(default_factory=list)  # (user, assistant), oldest first

    def copy(self) -> Session:
        return Session(self.system_prompt, list(self.turns))


class SessionStore(Protocol):
    def get(self, key: SessionKey) -> Session | None:
        """A copy of the session, or None; counts as a use (LRU, idle time)."""
        ...

    def put(self, key: SessionKey, session: Session) -> None: ...

    def delete(self, key: SessionKey) -> bool: ...

    def keys(self, project: str | None = None) -> list[SessionKey]: ...


def resolve_system_prompt(requested: str | None, session: Session | None, default: str) -> str:
    """The request's prompt replaces the session's; a session without one keeps its own."""
    if requested:
        return requested
    if session is not None:
        return session.system_prompt
    return default


class MemorySessionStore:
    """Sessions in this process: idle ones expire, the least recently used go beyond a cap."""

    def __init__(
        self,
        max_sessions: int,
        idle_timeout: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if max_sessions < 1 or idle_timeout <= 0:
            raise ValueError("max_sessions must be >= 1 and idle_timeout > 0")
        self.max_sessions = max_sessions
        self.idle_timeout = idle_timeout
        self._clock = clock
        self._lock = threading.Lock()
        # key -> (last use, session); ordered from least to most recently used
        self._items: OrderedDict[SessionKey, tuple[float, Session]] = OrderedDict()

    def _expire(self, now: float) -> None:
        while self._items:
            key, (used, _) = next(iter(self._items.items()))
            if now - used < self.idle_timeout:
                break
            del self._items[key]

    def get(self, key: SessionKey) -> Session | None:
        with self._lock:
            now = self._clock()
            self._expire(now)
            item = self._items.get(key)
            if item is None:
                return None
            self._items[key] = (now, item[1])
            self._items.move_to_end(key)
            return item[1].copy()

    def put(self, key: SessionKey, session: Session) -> None:
        with self._lock:
            now = self._clock()
            self._expire(now)
            self._items[key] = (now, session.copy())
            self._items.move_to_end(key)
            while len(self._items) > self.max_sessions:
                self._items.popitem(last=False)

    def delete(self, key: SessionKey) -> bool:
        with self._lock:
            return self._items.pop(key, None) is not None

    def keys(self, project: str | None = None) -> list[SessionKey]:
        with self._lock:
            self._expire(self._clock())
            return [k for k in self._items if project is None or k[0] == project]

    def __len__(self) -> int:
        with self._lock:
            self._expire(self._clock())
            return len(self._items)
