"""The MQTT door as a project plug-in's host (``projects.plugins.PluginHost``): its topics
under the project's base, its turns through the chat door (a game's states through its
``StateGate`` first), its payloads published."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from agent.core.metrics import BAD_REQUEST, RequestMetrics
from agent.core.metrics import RATE_LIMITED as RATE_LIMITED_REASON
from agent.core.outcome import Outcome
from agent.core.rate_limit import RATE_LIMITED
from agent.core.reasoning import EMPTY_ANSWER
from agent.mqtt.acks import NO_ACK, Ack
from agent.mqtt.chat import DOOR, ChatDoor, shaped
from agent.mqtt.outbox import Outbox
from agent.mqtt.protocol import ChatRequest, session_id_problem
from agent.mqtt.state_gate import StateGate
from agent.mqtt.topics import Topics
from projects.plugins import Answer, Shape


class PluginHost:
    def __init__(self, project: str, chat: ChatDoor, topics: Topics, outbox: Outbox,
                 metrics: RequestMetrics, max_payload_bytes: int, max_sessions: int,
                 session_timeout: float, state_rate_limit: int) -> None:
        self.project = project
        self.max_payload_bytes = max_payload_bytes
        self.max_sessions = max_sessions
        self.session_timeout = session_timeout
        self._chat = chat
        self._topics = topics
        self._outbox = outbox
        self._metrics = metrics
        self.states = StateGate(state_rate_limit)

    def topic(self, name: str) -> str:
        return self._topics.base(self.project) + name

    def session_problem(self, session_id: str) -> str | None:
        return session_id_problem(session_id)

    def confine(self, root: str, requested: object, default: str) -> str:
        return self._topics.confine(root, requested, default)

    def ask(self, *, session_id: str, message: str, reply_topic: str, shape: Shape,
            system_prompt: str | None = None, client_id: str | None = None,
            request_id: str | None = None, ack: Any = None) -> None:
        request = ChatRequest(project=self.project, session_id=session_id, message=message,
                              reply_topic=reply_topic, system_prompt=system_prompt,
                              client_id=client_id, request_id=request_id)
        self._chat.submit(request, _shape_outcome(shape), ack or NO_ACK)

    def ask_state(self, *, session_id: str, message: str, reply_topic: str, shape: Shape,
                  system_prompt: str | None = None, client_id: str | None = None,
                  request_id: str | None = None, ack: Any = None) -> None:
        ack = ack or NO_ACK
        if not self.states.allow(session_id):
            self._metrics.rejected(self.project, RATE_LIMITED_REASON, door=DOOR)
            self.publish(reply_topic, shaped(_shape_outcome(shape),
                                             Outcome(RATE_LIMITED, False, admitted=False)))
            return
        request = ChatRequest(project=self.project, session_id=session_id, message=message,
                              reply_topic=reply_topic, system_prompt=system_prompt,
                              client_id=client_id, request_id=request_id)

        def submit(after: Ack) -> bool:
            self._chat.submit(request, _shape_outcome(shape), after, session_limit=False)
            return after.held

        self.states.offer(session_id, submit, ack)

    def publish(self, topic: str, payload: str) -> None:
        self._outbox.publish(topic, payload)

    def rejected(self) -> None:
        self._metrics.rejected(self.project, BAD_REQUEST, door=DOOR)


def _shape_outcome(shape: Shape) -> Callable[[Outcome], str]:
    return lambda outcome: shape(_answer(outcome))


def _answer(outcome: Outcome) -> Answer:
    return Answer(outcome.text, outcome.ok, empty=not outcome.ok and outcome.text == EMPTY_ANSWER)
