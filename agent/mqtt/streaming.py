"""Streamed replies (PROTOCOL.md part C, ``"stream": true``).

The engine's text deltas go to ``<reply topic>/stream`` as JSON
``{"requestId", "seq", "delta", "done"}`` at QoS 0, ``seq`` from 0; the last
message has ``done: true`` (its ``delta`` holds what was still held back,
often ""). The full reply still follows on the reply topic and is the
authoritative answer: stream messages are best effort, and a request refused
before it starts (rate limit, overload, bad request) gets only its reply.

What is streamed is the raw model text: a project's output rules (driving's
state tags) change the final reply only. Should the rules make the agent
generate the reply once more, a message ``{"restart": true}`` (with the same
four fields, ``delta`` "") says that the deltas start over.

With ``--skip_thinking`` the reasoning is not streamed: for a prompt that
opens ``<think>`` (``Tokenizer.opens_reasoning``) nothing is sent until
``</think>`` was seen; otherwise text is sent as it comes, except what lies
inside ``<think>...</think>`` (the tags included; a tag split across deltas is
held back until it is known). Whitespace before the answer's first character
is dropped, so the deltas joined and stripped are the reply's text (before
output rules). One case differs: a completion that closes a ``</think>`` it
never opened, for a prompt not known to open it, has its text before the tag
streamed, though the final reply drops it. Without ``--skip_thinking`` the
deltas are exactly the model's text.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable

from agent.core.reasoning import AnswerFilter
from agent.mqtt.protocol import ChatRequest
from agent.mqtt.topics import Topics

log = logging.getLogger(__name__)

# (topic, payload, qos=..., correlation=...): the door's Outbox
Publish = Callable[..., None]
STREAM_QOS = 0


class Stream:
    """The stream messages of one request; thread-safe (deltas come on the engine thread)."""

    def __init__(self, topic: str, request: ChatRequest, publish: Publish,
                 skip_thinking: bool, prompt_opened: bool) -> None:
        self.topic = topic
        self._request_id = request.request_id
        self._correlation = request.correlation_data
        self._publish = publish
        self._filter_args = (skip_thinking, prompt_opened)
        self._filter = AnswerFilter(*self._filter_args)
        self._lock = threading.Lock()
        self._seq = 0
        self._closed = False

    def feed(self, delta: str) -> None:
        with self._lock:
            if self._closed:  # answered already (timed out, shut down)
                return
            text = self._filter.feed(delta)
            if text:
                self._send(text, False)

    def restart(self) -> None:
        """The reply is generated once more (output rules): its deltas start over."""
        with self._lock:
            if not self._closed:
                self._filter = AnswerFilter(*self._filter_args)
                self._send("", False, restart=True)

    def close(self) -> None:
        """The last message (``done``); later deltas are dropped."""
        with self._lock:
            if not self._closed:
                self._closed = True
                self._send(self._filter.flush(), True)

    def _send(self, delta: str, done: bool, **extra: bool) -> None:
        message = {"requestId": self._request_id, "seq": self._seq, "delta": delta, "done": done}
        self._seq += 1
        payload = json.dumps({**message, **extra}, ensure_ascii=False)
        self._publish(self.topic, payload, qos=STREAM_QOS, correlation=self._correlation)


def open_stream(request: ChatRequest, topics: Topics, publish: Publish,
                skip_thinking: bool, prompt_opened: bool) -> Stream | None:
    """The stream of ``request`` if it asked for one and its stream topic may be published to."""
    if not request.options.stream:
        return None
    topic = topics.stream_of(request.reply_topic)
    if topic is None:
        log.warning("no stream for session %s/%s: %.200r/stream may not be published to",
                    request.project, request.session_id, request.reply_topic)
        return None
    return Stream(topic, request, publish, skip_thinking, prompt_opened)
