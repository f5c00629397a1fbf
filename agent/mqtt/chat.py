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
from agent.mqtt.protocol import ChatRequest, ProtocolError, RequestParser
from agent.mqtt.streaming import Stream, open_stream
from agent.mqtt.topics import Topics
from agent.mqtt.v5 import apply_v5, apply_v5_to_error

log = logging.getLogger(__name__)

Shape = Callable[[Outcome], str]  # a request's outcome -> the payload to publish
DOOR = "mqtt"  # this front door's name in the metrics


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
                 max_payload_bytes: int) -> None:
        self.core = core
        self.topics = topics
        self.outbox = outbox
        self.parser = RequestParser(topics, max_payload_bytes, core.settings.max_tokens)

    def handle_message(self, topic: str, payload: bytes, properties: Any = None,
                       ack: Ack = NO_ACK) -> None:
        """``properties``: an MQTT v5 request's (Response Topic, Correlation Data), or None.
        ``ack``: held by the turn if one is accepted (sent after its reply), else left to the
        caller, who sends it once this returns (every other path has replied by then)."""
        project = self.topics.project_of(topic)
        if project is None:
            log.warning("ignoring a message on unexpected topic %.200r", topic)
            return
        try:
            request = self.parser.parse(project, payload)
        except ProtocolError as err:
            self.reject(apply_v5_to_error(err, properties, self.topics))
            return
        self.submit(apply_v5(request, properties, self.topics), ack=ack)

    def submit(self, request: ChatRequest, shape: Shape | None = None, ack: Ack = NO_ACK) -> None:
        """Hands a request (also one from another topic) to the core; ``shape`` makes the
        payload of its reply or error (None: the text itself, or the envelope if asked for).
        ``ack``: see handle_message."""
        core, options = self.core, request.options
        if shape is None and options.json:
            shape = Envelope(request, core.settings.skip_thinking, core.prompt_opens_reasoning)
        stream = open_stream(request, self.topics, self.outbox, core.settings.skip_thinking,
                             core.prompt_opens_reasoning) if options.stream else None
        if core.submit(request, partial(self._deliver, request, shape, stream), stream, ack,
                       door=DOOR):
            ack.hold()  # the turn acknowledges the request after its reply

    def reject(self, err: ProtocolError) -> None:
        """Answers a request that did not parse (once per requestId)."""
        if err.session_id and err.request_id and self.core.is_repeat(
                err.project, err.session_id, err.request_id):
            return
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
