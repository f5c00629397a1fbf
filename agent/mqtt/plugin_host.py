"""The MQTT door as a project plug-in's host (``projects.plugins.PluginHost``): its topics
under the project's base, its turns through the chat door, its payloads published."""

from __future__ import annotations

from typing import Any

from agent.core.metrics import BAD_REQUEST, RequestMetrics
from agent.core.outcome import Outcome
from agent.core.reasoning import EMPTY_ANSWER
from agent.mqtt.acks import NO_ACK
from agent.mqtt.chat import DOOR, ChatDoor
from agent.mqtt.outbox import Outbox
from agent.mqtt.protocol import ChatRequest, session_id_problem
from agent.mqtt.topics import Topics
from projects.plugins import Answer, Shape


class PluginHost:
    def __init__(self, project: str, chat: ChatDoor, topics: Topics, outbox: Outbox,
                 metrics: RequestMetrics, max_payload_bytes: int, max_sessions: int,
                 session_timeout: float) -> None:
        self.project = project
        self.max_payload_bytes = max_payload_bytes
        self.max_sessions = max_sessions
        self.session_timeout = session_timeout
        self._chat = chat
        self._topics = topics
        self._outbox = outbox
        self._metrics = metrics

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
        self._chat.submit(request, lambda outcome: shape(_answer(outcome)), ack or NO_ACK)

    def publish(self, topic: str, payload: str) -> None:
        self._outbox.publish(topic, payload)

    def rejected(self) -> None:
        self._metrics.rejected(self.project, BAD_REQUEST, door=DOOR)


def _answer(outcome: Outcome) -> Answer:
    return Answer(outcome.text, outcome.ok, empty=not outcome.ok and outcome.text == EMPTY_ANSWER)
