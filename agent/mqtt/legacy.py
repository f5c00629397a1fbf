"""The older game clients' plain-text topics (PROTOCOL.md part B, only with ``--legacy_topics``).

``llama/user_input/<sid>`` and ``llama/driving/user_input/<sid>``: the payload
is the user's text, the reply plain text on ``llama/assistant_response/<sid>``
or ``llama/driving/assistant_response/<sid>``; an empty payload resets the
session. The bare topics (``llama/user_input``, no session level) were the old
servers' session ``default``: answered on ``.../assistant_response/default``,
as the old server did. ``llama/session`` and the racing game's
``llama/driving/session``: any message gets a new session id on
``<that topic>/response``. ``--legacy_project`` and
``--legacy_driving_project`` name the projects (prompt, output rules,
sessions) that serve the two chat topics.
"""

from __future__ import annotations

import logging
import secrets
from typing import TYPE_CHECKING

from agent.core.metrics import BAD_REQUEST, RequestMetrics
from agent.core.session_access import SessionAccess
from agent.mqtt.acks import NO_ACK, Ack
from agent.mqtt.chat import DOOR, ChatDoor
from agent.mqtt.outbox import Outbox
from agent.mqtt.protocol import ChatRequest, session_id_problem
from agent.mqtt.topics import LEGACY_CHAT, LEGACY_SESSIONS, Topics

if TYPE_CHECKING:
    from agent.service.config import AgentConfig

log = logging.getLogger(__name__)

RESET_REPLY = "Dialog has been reset."
DEFAULT_SESSION = "default"  # a bare request topic's session (the old servers' fallback)


def legacy_projects(config: AgentConfig) -> dict[str, str]:
    """Request topic (unprefixed) -> the project that serves it."""
    first, driving = LEGACY_CHAT
    return {first: config.legacy_project, driving: config.legacy_driving_project}


class LegacyTopics:
    def __init__(self, config: AgentConfig, chat: ChatDoor, sessions: SessionAccess,
                 metrics: RequestMetrics, outbox: Outbox, topics: Topics) -> None:
        self.max_payload_bytes = config.max_payload_bytes
        self.chat = chat
        self.sessions = sessions
        self.metrics = metrics
        self.outbox = outbox
        # "<request topic>" -> ("<reply topic>/", project)
        self._chat = {
            topics.legacy(request): (topics.legacy(LEGACY_CHAT[request]) + "/", project)
            for request, project in legacy_projects(config).items()
        }
        # handshake topic -> its answer's topic
        self._sessions = {topics.legacy(t): topics.legacy(r) for t, r in LEGACY_SESSIONS.items()}

    def handle(self, topic: str, payload: bytes, ack: Ack = NO_ACK) -> bool:
        """True if ``topic`` is a legacy topic (then it is handled); a chat turn takes ``ack``
        with it (agent.mqtt.acks)."""
        session_reply = self._sessions.get(topic)
        if session_reply is not None:
            session_id = secrets.token_hex(5)
            log.info("legacy session handshake on %s: new session %s", topic, session_id)
            self.outbox.publish(session_reply, session_id)
            return True
        for request, (reply_prefix, project) in self._chat.items():
            if topic == request:  # no session level: the old servers' "default" session
                self._chat_turn(DEFAULT_SESSION, reply_prefix, project, payload, ack)
                return True
            if topic.startswith(request) and topic[len(request)] == "/":
                self._chat_turn(topic[len(request) + 1:], reply_prefix, project, payload, ack)
                return True
        return False

    def _chat_turn(self, sid: str, reply_prefix: str, project: str, payload: bytes,
                   ack: Ack) -> None:
        problem = "it is empty" if not sid else session_id_problem(sid)
        if problem:
            log.warning("legacy message with an unusable session id in its topic: %s", problem)
            return
        reply_topic = reply_prefix + sid
        if len(payload) > self.max_payload_bytes:
            self.metrics.rejected(project, BAD_REQUEST, door=DOOR)
            self.outbox.publish(reply_topic, f"Error: the request is too large ({len(payload)} "
                                f"bytes; the limit is {self.max_payload_bytes} bytes)")
            return
        text = payload.decode("utf-8", "replace").strip()
        if not text:
            with self.sessions.changing(project, sid) as store:
                store.delete((project, sid))
            log.info("legacy session %s/%s reset", project, sid)
            self.outbox.publish(reply_topic, RESET_REPLY)
            return
        self.chat.submit(ChatRequest(project, sid, text, reply_topic), ack=ack)
