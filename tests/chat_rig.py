"""The core and the MQTT chat door wired as an agent wires them, without a broker: what the
request-path tests drive (``handle_message``), with the parts they look into."""

from __future__ import annotations

import time
from collections.abc import Callable

from agent.core.conversation import build_conversation
from agent.core.sessions import MemorySessionStore, SessionStore
from agent.mqtt.chat import ChatDoor
from agent.mqtt.outbox import Outbox, Publish
from agent.mqtt.topics import Topics
from agent.service.config import AgentConfig
from engine.api import EngineProtocol
from projects import ProjectSpec


class ChatRig:
    def __init__(self, config: AgentConfig, engine: EngineProtocol,
                 projects: dict[str, ProjectSpec], topics: Topics, publish: Publish,
                 store: SessionStore | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        store = store if store is not None else MemorySessionStore(
            config.max_concurrent_sessions, config.session_timeout, clock)
        self.core = build_conversation(config.core_settings(), engine, projects, store, clock)
        self.chat = ChatDoor(self.core, topics, Outbox(topics, publish), config.max_payload_bytes)
        self.handle_message = self.chat.handle_message
        self.publish = self.chat.outbox.publish
        self.lanes, self.metrics, self.store = self.core.lanes, self.core.metrics, store

    def start(self) -> None:
        self.core.start()

    def stop(self) -> None:
        self.core.stop()

    def stats(self) -> dict:
        return self.core.stats()
