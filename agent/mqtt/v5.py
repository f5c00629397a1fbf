"""MQTT v5 reply target of a chat request: the Response Topic and Correlation Data properties.

A v5 request may name its reply topic twice: in the payload (``replyTopic``)
and as the v5 Response Topic property. The Response Topic wins when it is
allowed (it obeys the same rules as ``replyTopic``): v5 request/response
clients set it, with Correlation Data, and wait on it. A disallowed one is
ignored with a warning, and ``replyTopic`` (or the default) is used. The
Correlation Data is echoed as a v5 property on the reply and on stream
messages, wherever they go. An MQTT 3.1.1 agent gets no properties: nothing
here applies.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from typing import Any

from agent.mqtt.protocol import ChatRequest, ProtocolError
from agent.mqtt.topics import Topics

log = logging.getLogger(__name__)


def _v5_target(project: str, properties: Any, topics: Topics) -> tuple[str | None, bytes | None]:
    """The allowed Response Topic (or None) and the Correlation Data of a v5 request."""
    if properties is None:
        return None, None
    topic = getattr(properties, "ResponseTopic", None)
    correlation = getattr(properties, "CorrelationData", None)
    if topic is not None:
        topic = topic.rstrip("/") if isinstance(topic, str) else ""
        problem = topics.reply_problem(project, topic)
        if problem:
            log.warning("MQTT v5 Response Topic %.200r not allowed (%s); ignored", topic, problem)
            topic = None
    return topic, correlation if isinstance(correlation, (bytes, bytearray)) else None


def apply_v5(request: ChatRequest, properties: Any, topics: Topics) -> ChatRequest:
    """``request`` answered on its allowed Response Topic, with its Correlation Data."""
    topic, correlation = _v5_target(request.project, properties, topics)
    if topic is None and correlation is None:
        return request
    return replace(request, reply_topic=topic or request.reply_topic,
                   correlation_data=None if correlation is None else bytes(correlation))


def apply_v5_to_error(err: ProtocolError, properties: Any, topics: Topics) -> ProtocolError:
    """Likewise for a request that failed validation."""
    topic, correlation = _v5_target(err.project, properties, topics)
    err.reply_topic = topic or err.reply_topic
    err.correlation_data = None if correlation is None else bytes(correlation)
    return err
