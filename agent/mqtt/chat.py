"""Chat requests on ``P/user_input`` (PROTOCOL.md part A, with part C's options): parsed here,
answered by the core, published on the request's reply topic.

``handle_message`` runs on the MQTT thread: parse, MQTT v5 properties, then
``Conversation.submit`` (which may run the whole turn there, see agent.core.conversation).
The reply's payload is the core's text, a part C JSON envelope, or what another topic's
``Shape`` makes of it (maze hints are JSON); a streamed request's deltas go to
``<reply topic>/stream``. The request's ``Ack`` (PUBACK) goes after its reply.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from functools import partial
from typing import Any

from agent.core.conversation import Conversation
from agent.core.metrics import BAD_REQUEST
from agent.core.outcome import INTERNAL, Outcome
from agent.mqtt.acks import NO_ACK, Ack
from agent.mqtt.envelope import Envelope, error_envelope
from agent.mqtt.outbox import Outbox
from agent.mqtt.owned import confine_error, confine_request
from agent.mqtt.protocol import ChatRequest, ProtocolError, RequestParser
from agent.mqtt.streaming import Stream, open_stream
from agent.mqtt.topics import Topics
from agent.mqtt.v5 import apply_v5, apply_v5_to_error

log = logging.getLogger(__name__)

Shape = Callable[[Outcome], str]  # a request's outcome -> the payload to publish
DOOR = "mqtt"  # this front door's name in the metrics
# MQTT 5 User Properties that name the sender (a broker plug-in may set them from the
# connection), in order of preference.
SENDER_PROPERTIES = ("user", "clientId")
MAX_CLIENT_KEY_CHARS = 256  # a client key kept by the rate limit: bounded


def sender_of(request: ChatRequest, properties: Any, topics: Topics, owner: str | None) -> str:
    """Who sent ``request``, for the per-client rate limit: the owner of the request topic
    (``P/user_input/<owner>``, which the broker's ACL confines), else an MQTT 5 User Property
    (above), else the client level of its reply topic (``P/assistant_response/<sessionId>/
    <client>``), else its ``clientId``; "" if none (such requests share one allowance)."""
    if owner:
        return "o:" + owner[:MAX_CLIENT_KEY_CHARS]
    for name, value in getattr(properties, "UserProperty", None) or ():
        if name in SENDER_PROPERTIES and value:
            return "u:" + value[:MAX_CLIENT_KEY_CHARS]
    root = topics.reply_root(request.project)
    if request.reply_topic.startswith(root):
        levels = request.reply_topic[len(root):].split("/", 2)
        if len(levels) > 1 and levels[1]:
            return "t:" + levels[1][:MAX_CLIENT_KEY_CHARS]
    return "c:" + request.client_id[:MAX_CLIENT_KEY_CHARS] if request.client_id else ""


def shaped(shape: Shape | None, outcome: Outcome) -> str:
    """The payload for ``outcome``: its text, or what ``shape`` makes of it."""
    if shape is None:
        return outcome.text
    try:
        return shape(outcome)
    except Exception:
        log.exception("shaping a reply failed")
    try:
        return shape(outcome._replace(text=INTERNAL, ok=False))
    except Exception:
        return INTERNAL


class ChatDoor:
    def __init__(self, core: Conversation, topics: Topics, outbox: Outbox,
                 max_payload_bytes: int, redelivery: bool = False) -> None:
        self.core = core
        self.topics = topics
        self.outbox = outbox
        # The broker keeps an unacknowledged request for the next process (a persistent
        # session): what the core has not started when it stops is left to it.
        self.redelivery = redelivery
        self.parser = RequestParser(topics, max_payload_bytes, core.settings.token_limit)

    def handle_message(self, topic: str, payload: bytes, properties: Any = None,
                       ack: Ack = NO_ACK) -> None:
        """``properties``: an MQTT v5 request's (Response Topic, Correlation Data), or None.
        ``ack``: held by the turn if one is accepted (sent after its reply), else left to the
        caller, who sends it once this returns (every other path has replied by then)."""
        project, owner = self.topics.project_of(topic), None
        if project is None:  # a client's own P/user_input/<owner> (agent.mqtt.owned)?
            project, owner = self.topics.owned_request(topic) or (None, None)
        if project is None:
            log.warning("ignoring a message on unexpected topic %.200r", topic)
            return
        try:
            request = apply_v5(self.parser.parse(project, payload), properties, self.topics)
            if owner is not None:
                request = confine_request(request, owner, self.topics)
        except ProtocolError as err:
            err = apply_v5_to_error(err, properties, self.topics)
            self.reject(err if owner is None else confine_error(err, owner, self.topics))
            return
        self.submit(request, ack=ack, sender=sender_of(request, properties, self.topics, owner))

    def submit(self, request: ChatRequest, shape: Shape | None = None, ack: Ack = NO_ACK,
               sender: str | None = None, session_limit: bool = True) -> None:
        """Hands a request (also one from another topic) to the core; ``shape`` makes the
        payload of its reply or error (None: the text itself, or the envelope if asked for).
        ``ack``: see handle_message. ``sender``: for the per-client rate limit (None: only
        the session's applies). ``session_limit``: False for requests a door limits by a
        rule of its own (game states)."""
        core, options = self.core, request.options
        if shape is None and options.json:
            shape = Envelope(request, core.settings.skip_thinking, core.prompt_opens_reasoning)
        stream = open_stream(request, self.topics, self.outbox, core.settings.skip_thinking,
                             core.prompt_opens_reasoning) if options.stream else None
        if core.submit(request, partial(self._deliver, request, shape, stream), stream, ack,
                       door=DOOR, redelivery=self.redelivery and ack is not NO_ACK,
                       client=sender, session_limit=session_limit):
            ack.hold()  # the turn acknowledges the request after its reply

    def reject(self, err: ProtocolError) -> None:
        """Answers a request that did not parse (every copy: nothing of it is remembered, so
        the fixed request may come with the same requestId)."""
        self.core.metrics.rejected(err.project, BAD_REQUEST, door=DOOR)
        if err.reply_topic is None:
            log.warning("bad request for project %s and no reply topic: %s", err.project, err.reply)
            return
        log.warning("bad request for project %s session %s: %s", err.project, err.session_id, err.reply)
        self.outbox.publish(err.reply_topic, error_envelope(err) or err.reply,
                            correlation=err.correlation_data)

    def _deliver(self, request: ChatRequest, shape: Shape | None, stream: Stream | None,
                 outcome: Outcome) -> None:
        """The core's delivery: the stream's last message, then the reply."""
        if stream is not None and outcome.admitted:
            stream.close()
        self.outbox.publish(request.reply_topic, shaped(shape, outcome),
                            correlation=request.correlation_data)
