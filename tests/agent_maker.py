"""Agents started on a test's broker and stopped after it: what the ``make_agent`` fixtures
of the MQTT tests share."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from agent.service.app import Agent
from agent.service.config import AgentConfig
from engine.api import EngineProtocol
from projects import ProjectSpec
from tests.fake_engine import FakeEngine
from tests.mqtt_broker import Broker

MakeAgent = Callable[..., Agent]


@contextmanager
def started_agents(broker: Broker, new_engine: Callable[[], EngineProtocol] = FakeEngine,
                   specs: dict[str, ProjectSpec] | None = None,
                   **defaults: Any) -> Iterator[MakeAgent]:
    """``make(engine=None, **overrides)``: a started agent on ``broker`` with ``defaults``
    and ``overrides`` as settings (``new_engine()`` when no engine is given; ``specs``: the
    projects' specs, else their files); every agent made is stopped when the block ends."""
    agents: list[Agent] = []

    def make(engine: EngineProtocol | None = None, **overrides: Any) -> Agent:
        settings = {"mqtt_broker": broker.host, "mqtt_port": broker.port,
                    "connect_timeout": 5.0, **defaults, **overrides}
        agent = Agent(AgentConfig(**settings), engine or new_engine(), specs)
        agents.append(agent)
        agent.start()
        return agent

    try:
        yield make
    finally:
        for agent in agents:
            agent.stop()
