"""A broker-less harness for part B: the agent's real topic wiring (``Agent._on_message``)
with a fake engine and a recording publisher."""

from __future__ import annotations

import json
from collections.abc import Callable
from itertools import count

from agent.core.sessions import Session
from agent.service.app import Agent
from agent.service.config import AgentConfig
from engine.api import GenerationRequest
from tests.fake_engine import FakeEngine
from tests.maze_game import hint_of
from tests.test_router import Replies, wait_until

PROJECTS = ("maze", "driving", "bloodcell", "general")


class Game:
    """An agent that is never connected: messages go in through its dispatcher, the
    payloads it would publish are recorded (``replies``)."""

    def __init__(self, engine: FakeEngine, **overrides: object) -> None:
        settings: dict = {"projects": PROJECTS, "legacy_topics": True, **overrides}
        self.agent = Agent(AgentConfig(**settings), engine)
        self.engine = engine
        self.replies = Replies()
        self.agent.door.outbox._publish = self.replies  # no broker: record what would go out
        self.agent.core.start()

    def send(self, topic: str, payload: object) -> None:
        data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        self.agent._on_message(topic, data)

    def hints(self, sid: str, n: int, timeout: float = 5.0) -> list[dict]:
        topic = f"maze/hint/{sid}"
        wait_until(lambda: len(self.replies.on(topic)) >= n, timeout)
        return [hint_of(p) for p in self.replies.on(topic)]

    def session(self, project: str, sid: str) -> Session | None:
        return self.agent.core.sessions.store.get((project, sid))


def system_prompt(engine: FakeEngine, index: int = -1) -> str:
    """The system prompt of the ``index``-th prompt the engine saw."""
    prompt = engine.prompts[index]
    return prompt.split("<|im_start|>system\n", 1)[1].split("<|im_end|>", 1)[0]


def scripted(*texts: str) -> Callable[[str, GenerationRequest], str]:
    """A fake model that answers ``texts`` in turn, then repeats the last one."""
    turn = count()
    return lambda prompt, request: texts[min(next(turn), len(texts) - 1)]
