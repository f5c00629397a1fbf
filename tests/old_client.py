"""A test client written the way the deployments' old clients are (paho, JSON in, text out)."""

from __future__ import annotations

import json
import secrets
import threading

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from tests.mqtt_broker import Broker


class OldClient:
    def __init__(
        self, broker: Broker, protocol: str = "3.1.1", client_id: str | None = None,
        username: str | None = None, password: str | None = None,
    ) -> None:
        self.client_id = client_id or f"old-client-{secrets.token_hex(3)}"
        v5 = protocol == "5"
        self._client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=self.client_id,
            protocol=mqtt.MQTTv5 if v5 else mqtt.MQTTv311,
            clean_session=None if v5 else True,
        )
        self._cond = threading.Condition()
        self._received: list[tuple[str, bytes]] = []
        self._acks: set[int] = set()
        if username is not None:
            self._client.username_pw_set(username, password)
        self._client.on_message = self._on_message
        self._client.on_subscribe = self._on_subscribe
        self._client.connect(broker.host, broker.port, keepalive=30)
        self._client.loop_start()

    def _on_message(self, client: mqtt.Client, userdata: object, message: mqtt.MQTTMessage) -> None:
        with self._cond:
            self._received.append((message.topic, message.payload))
            self._cond.notify_all()

    def _on_subscribe(self, client: mqtt.Client, userdata: object, mid: int, *rest: object) -> None:
        with self._cond:
            self._acks.add(mid)
            self._cond.notify_all()

    def subscribe(self, topic: str, timeout: float = 5.0) -> None:
        _, mid = self._client.subscribe(topic, qos=1)
        with self._cond:
            assert self._cond.wait_for(lambda: mid in self._acks, timeout), f"no SUBACK for {topic}"

    def publish(self, topic: str, payload: bytes | str, retain: bool = False, qos: int = 1) -> None:
        self._client.publish(topic, payload, qos=qos, retain=retain).wait_for_publish(5)

    def request(
        self, project: str, session: str, message: object, subscribe: bool = True, qos: int = 1,
        **fields: object,
    ) -> str:
        """Publishes like the old clients (deep reply topic); returns the topic it listens on."""
        reply_topic = fields.pop("replyTopic", f"{project}/assistant_response/{session}/{self.client_id}")
        if subscribe:
            self.subscribe(str(reply_topic))
        payload = {"sessionId": session, "message": message, "replyTopic": reply_topic,
                   "clientId": self.client_id, **fields}
        self.publish(f"{project}/user_input", json.dumps(payload), qos=qos)
        return str(reply_topic)

    def ask(self, project: str, session: str, message: object, timeout: float = 10.0, **fields: object) -> str:
        """The reply to this request: the next message on its reply topic."""
        topic = fields.get("replyTopic", f"{project}/assistant_response/{session}/{self.client_id}")
        before = len(self.messages(str(topic)))
        return self.wait(self.request(project, session, message, **fields), before + 1, timeout)[-1]

    def messages(self, topic: str | None = None, prefix: str | None = None) -> list[tuple[str, str]]:
        with self._cond:
            return [(t, p.decode("utf-8")) for t, p in self._received
                    if (topic is None or t == topic) and (prefix is None or t.startswith(prefix))]

    def wait(self, topic: str, n: int = 1, timeout: float = 10.0) -> list[str]:
        with self._cond:
            ok = self._cond.wait_for(lambda: len(self.messages(topic)) >= n, timeout)
        got = [p for _, p in self.messages(topic)]
        assert ok, f"{len(got)} of {n} replies on {topic} within {timeout} s: {got}"
        return got

    def wait_prefix(self, prefix: str, n: int = 1, timeout: float = 10.0) -> list[tuple[str, str]]:
        with self._cond:
            ok = self._cond.wait_for(lambda: len(self.messages(prefix=prefix)) >= n, timeout)
        got = self.messages(prefix=prefix)
        assert ok, f"{len(got)} of {n} replies under {prefix} within {timeout} s: {got}"
        return got

    def close(self) -> None:
        self._client.disconnect()
        self._client.loop_stop()
