"""Every publish of the MQTT door goes through here: never on a request, control or invalid
topic, and a failure is logged, never raised into the thread that answers."""

from __future__ import annotations

import logging
from collections.abc import Callable

from agent.mqtt.topics import Topics

log = logging.getLogger(__name__)

Publish = Callable[..., None]  # (topic, payload); qos= and correlation= where not the default


class Outbox:
    def __init__(self, topics: Topics, publish: Publish) -> None:
        self._topics = topics
        self._publish = publish  # MqttClient.publish

    def publish(self, topic: str, payload: str, *, qos: int = 1,
                correlation: bytes | None = None) -> None:
        """Publishes unless ``topic`` is a request, control or invalid topic; ``qos`` 0 for
        stream messages, ``correlation``: MQTT v5 Correlation Data to echo (part C)."""
        if not self._topics.publishable(topic):
            log.error("refusing to publish on %.200r (a request, control or invalid topic)", topic)
            return
        try:
            if qos == 1 and correlation is None:
                self._publish(topic, payload)
            else:
                self._publish(topic, payload, qos=qos, correlation=correlation)
        except Exception:
            log.exception("publishing on %.200r failed", topic)

    __call__ = publish
