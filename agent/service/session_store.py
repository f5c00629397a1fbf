"""The session store ``--session_store`` names: this process's memory, or a Redis shared by boxes."""

from __future__ import annotations

from agent.core.session_store_redis import KEY_PREFIX, RedisSessionStore
from agent.core.sessions import MemorySessionStore, SessionStore
from agent.mqtt.topics import normalize_prefix
from agent.service.config import AgentConfig


def open_store(config: AgentConfig) -> SessionStore:
    """The store ``config.session_store`` names; raises SessionStoreError if it cannot be used.
    Agents share a Redis only with those of the same ``topic_prefix``."""
    url = config.session_store.strip()
    if url == "memory":
        return MemorySessionStore(config.max_concurrent_sessions, config.session_timeout)
    return RedisSessionStore(url, config.max_concurrent_sessions, config.session_timeout,
                             prefix=KEY_PREFIX + normalize_prefix(config.topic_prefix))
