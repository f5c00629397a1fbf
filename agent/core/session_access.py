"""The one way to read and change sessions while turns are in flight.

A turn reads its session when it starts and writes it back when answered. A change from
elsewhere (a new template, a cleared history, a reset) goes through ``changing``, which
marks the turns in flight of that session stale: they are answered, but do not write
their older copy back over the change.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

from agent.core.sessions import Session, SessionKey, SessionStore
from agent.core.turns import SessionLanes, Turn
from projects import ProjectSpec


class SessionAccess:
    def __init__(self, store: SessionStore, lanes: SessionLanes,
                 projects: dict[str, ProjectSpec]) -> None:
        self.store = store
        self._lanes = lanes
        self._projects = projects
        self._default_prompts: dict[str, str] = {}  # set by a template without a session
        self._lock = threading.Lock()  # held while a turn reads its session, and by changes

    def default_prompt(self, project: str) -> str:
        """The system prompt of new sessions of ``project``."""
        return self._default_prompts.get(project) or self._projects[project].system_prompt

    def set_default_prompt(self, project: str, prompt: str) -> None:
        self._default_prompts[project] = prompt

    def read(self, turn: Turn) -> Session | None:
        """``turn``'s session as it starts; only changes after this make the turn stale."""
        with self._lock:
            turn.stale = False
            return self.store.get(turn.key)

    def record(self, turn: Turn, history: Session) -> None:
        """``turn``'s exchange, unless its session changed since it was read."""
        with self._lock:
            if not turn.stale:
                self.store.put(turn.key, history)

    @contextlib.contextmanager
    def changing(self, project: str, session_id: str | None = None) -> Iterator[SessionStore]:
        """The store, to change a session (every session of ``project`` for None) so that no
        turn in flight writes its older copy back over the change."""
        with self._lock:
            yield self.store
            self._lanes.mark_stale(project, session_id)

    def keys(self, project: str) -> list[SessionKey]:
        return self.store.keys(project)
