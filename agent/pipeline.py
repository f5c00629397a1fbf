"""What the parts of the request path (admission, turn runner, results) share."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from agent.config import AgentConfig
from agent.lanes import SessionLanes
from agent.metrics import RequestMetrics
from agent.protocol import ChatRequest
from agent.sessions import SessionStore
from agent.topics import Topics
from engine.api import EngineProtocol
from projects import ProjectSpec

Publish = Callable[..., None]  # (topic, payload); part C adds qos= and correlation=


@dataclass(frozen=True, eq=False)
class Pipeline:
    config: AgentConfig
    engine: EngineProtocol
    projects: dict[str, ProjectSpec]
    topics: Topics
    store: SessionStore
    lanes: SessionLanes
    metrics: RequestMetrics
    clock: Callable[[], float]
    publish: Publish  # Router.publish: refuses request, control and invalid topics
    default_prompts: dict[str, str] = field(default_factory=dict)  # set by P/template without a session
    # Held while a turn reads its session and while anything changes one.
    store_lock: threading.Lock = field(default_factory=threading.Lock)

    def default_prompt(self, project: str) -> str:
        """The system prompt of new sessions of ``project``."""
        return self.default_prompts.get(project) or self.projects[project].system_prompt

    @contextlib.contextmanager
    def changing_sessions(self, project: str, session_id: str | None = None) -> Iterator[SessionStore]:
        """The store, to change a session (every session of ``project`` for None) so that no
        turn in flight writes its older copy back over the change."""
        with self.store_lock:
            yield self.store
            self.lanes.mark_stale(project, session_id)

    def reply(self, request: ChatRequest, payload: str) -> None:
        self.publish(request.reply_topic, payload, correlation=request.correlation_data)
