"""The agent's MQTT connection (paho-mqtt 2.x): connect, subscribe, hand messages off, publish.

paho's network thread reconnects on its own, with a capped exponential
backoff, also when the broker is down at start; every (re)connect subscribes
again. ``on_message`` only hands the payload to the router, which never blocks.
"""

from __future__ import annotations

import logging
import os
import secrets
import socket
import threading
import time
from collections.abc import Callable, Sequence

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from agent.config import AgentConfig

log = logging.getLogger(__name__)

QOS = 1
# MQTT 5 session expiry: a named client's session (and its queued QoS 1 requests) outlives a
# restart; a generated one only bridges a reconnect.
NAMED_SESSION_EXPIRY_S = 24 * 3600
GENERATED_SESSION_EXPIRY_S = 300
_AUTH_FAILURES = {134, 135}  # bad user name or password, not authorized

Handler = Callable[[str, bytes, Properties | None], None]  # topic, payload, v5 properties
Subscription = str | tuple[str, int]  # a topic (QoS 1) or (topic, QoS)


class MqttConnectError(ConnectionError):
    """The broker could not be reached, or refused us, in time."""


def generated_client_id() -> str:
    return f"vllm-deploy-{socket.gethostname()[:20]}-{os.getpid()}-{secrets.token_hex(3)}"


class MqttClient:
    def __init__(
        self, config: AgentConfig, subscriptions: Sequence[Subscription], on_message: Handler
    ) -> None:
        self.config = config
        self.subscriptions = [(s, QOS) if isinstance(s, str) else s for s in subscriptions]
        self._handler = on_message
        self.v5 = config.mqtt_protocol == "5"
        self.named = config.client_id is not None
        self.client_id = config.client_id or generated_client_id()
        self._client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=self.client_id,
            protocol=mqtt.MQTTv5 if self.v5 else mqtt.MQTTv311,
            clean_session=None if self.v5 else not self.named,
        )
        if config.mqtt_username is not None:
            self._client.username_pw_set(config.mqtt_username, config.mqtt_password)
        max_delay = config.reconnect_max_delay
        self._client.reconnect_delay_set(min_delay=min(1.0, max_delay), max_delay=max_delay)  # type: ignore[arg-type]
        self._client.on_connect = self._on_connect
        self._client.on_connect_fail = self._on_connect_fail
        self._client.on_disconnect = self._on_disconnect
        self._client.on_subscribe = self._on_subscribe
        self._client.on_message = self._on_message
        self._client.on_publish = self._on_publish
        self._subscribed = threading.Event()
        self._fatal: str | None = None
        self._last_error = "no answer from the broker"
        self._sub_mid: int | None = None
        self._unacked = 0
        self._acks = threading.Condition()
        self._qos0_mids: set[int] = set()  # stream messages in flight: not waited for
        self._started = False
        self._stopping = False
        self.on_ready: Callable[[], None] | None = None  # each (re)connect, once subscribed

    @property
    def where(self) -> str:
        return f"{self.config.mqtt_broker}:{self.config.mqtt_port}"

    @property
    def ready(self) -> bool:
        """Connected and subscribed."""
        return self._subscribed.is_set()

    def start(self, wait: bool = True, timeout: float | None = None) -> None:
        """Connects in the background; with ``wait``, returns once subscribed or raises."""
        if not self._started:
            self._started = True
            kwargs: dict = {}
            if self.v5:
                props = Properties(PacketTypes.CONNECT)
                props.SessionExpiryInterval = (
                    NAMED_SESSION_EXPIRY_S if self.named else GENERATED_SESSION_EXPIRY_S
                )
                clean_start = False if self.named else mqtt.MQTT_CLEAN_START_FIRST_ONLY
                kwargs = {"properties": props, "clean_start": clean_start}
            self._client.connect_async(
                self.config.mqtt_broker, self.config.mqtt_port, self.config.mqtt_keepalive, **kwargs
            )
            self._client.loop_start()
        if not wait:
            return
        timeout = self.config.connect_timeout if timeout is None else timeout
        try:
            ready = self.wait_ready(timeout)
        except MqttConnectError:
            self.stop(flush_timeout=0)
            raise
        if not ready:
            self.stop(flush_timeout=0)
            raise MqttConnectError(
                f"MQTT broker {self.where}: not connected within {timeout:g} s ({self._last_error})"
            )

    def wait_ready(self, timeout: float, cancel: threading.Event | None = None) -> bool:
        """True once subscribed, False after ``timeout`` s or when ``cancel`` is set;
        raises MqttConnectError if the broker refused us (bad credentials, subscription)."""
        deadline = time.monotonic() + timeout
        while not self._subscribed.wait(0.05):
            if self._fatal:
                raise MqttConnectError(f"MQTT broker {self.where}: {self._fatal}")
            if time.monotonic() > deadline or (cancel is not None and cancel.is_set()):
                return False
        return True

    def set_will(self, topic: str, payload: str) -> None:
        """The retained QoS 1 Last Will (the offline status); before ``start()``."""
        self._client.will_set(topic, payload.encode("utf-8"), qos=QOS, retain=True)

    def publish(self, topic: str, payload: str | bytes, retain: bool = False, qos: int = QOS,
                correlation: bytes | None = None) -> None:
        """QoS 1, retained only with ``retain`` (the status); queued by paho while disconnected
        and sent on reconnect. ``qos`` 0 (stream messages): best effort, dropped while
        disconnected. ``correlation``: MQTT v5 Correlation Data (part C; none on 3.1.1)."""
        data = payload.encode("utf-8") if isinstance(payload, str) else payload
        props = None
        if correlation is not None and self.v5:
            props = Properties(PacketTypes.PUBLISH)
            props.CorrelationData = correlation
        if qos == 0:
            with self._acks:  # its on_publish (network thread) must find its mid
                info = self._client.publish(topic, data, qos=0, retain=retain, properties=props)
                if info.rc == mqtt.MQTT_ERR_SUCCESS:
                    self._qos0_mids.add(info.mid)
            return
        with self._acks:
            self._unacked += 1
        try:
            info = self._client.publish(topic, data, qos=QOS, retain=retain, properties=props)
        except Exception:
            self._acked()
            raise
        if info.rc not in (mqtt.MQTT_ERR_SUCCESS, mqtt.MQTT_ERR_NO_CONN):
            self._acked()
            raise RuntimeError(f"publish on {topic!r} failed: {mqtt.error_string(info.rc)}")

    def stop(self, flush_timeout: float = 5.0) -> None:
        """Waits up to ``flush_timeout`` s for unacknowledged replies, then disconnects."""
        if not self._started or self._stopping:
            return
        with self._acks:
            self._acks.wait_for(lambda: self._unacked <= 0 or not self.ready, flush_timeout)
            if self._unacked > 0:
                log.warning("%d replies not acknowledged by the broker at shutdown", self._unacked)
        self._stopping = True
        props = None
        if self.v5 and not self.named:  # nobody will resume a generated id's session
            props = Properties(PacketTypes.DISCONNECT)
            props.SessionExpiryInterval = 0
        self._client.disconnect(properties=props)
        self._client.loop_stop()

    # ---- paho callbacks (network thread) ----

    def _on_connect(
        self, client: mqtt.Client, userdata: object, flags: object, reason_code: ReasonCode,
        properties: Properties | None,
    ) -> None:
        if reason_code.is_failure:
            self._last_error = f"connection refused: {reason_code}"
            if reason_code.value in _AUTH_FAILURES:
                self._fatal = self._last_error
            log.error("MQTT broker %s refused the connection: %s", self.where, reason_code)
            return
        log.info("connected to MQTT broker %s as %s (MQTT %s)", self.where, self.client_id,
                 self.config.mqtt_protocol)
        result, self._sub_mid = client.subscribe(self.subscriptions)
        if result != mqtt.MQTT_ERR_SUCCESS:
            log.error("subscribing failed: %s", mqtt.error_string(result))

    def _on_connect_fail(self, client: mqtt.Client, userdata: object) -> None:
        self._last_error = "cannot reach the broker"
        log.warning("cannot reach MQTT broker %s; retrying", self.where)

    def _on_disconnect(
        self, client: mqtt.Client, userdata: object, flags: object, reason_code: ReasonCode,
        properties: Properties | None,
    ) -> None:
        self._subscribed.clear()
        with self._acks:
            self._qos0_mids.clear()  # lost with the connection
            self._acks.notify_all()
        if not self._stopping:
            log.warning("disconnected from MQTT broker %s (%s); reconnecting", self.where, reason_code)

    def _on_subscribe(
        self, client: mqtt.Client, userdata: object, mid: int, reason_codes: list[ReasonCode],
        properties: Properties | None,
    ) -> None:
        if mid != self._sub_mid:
            return
        refused = [t for (t, _), rc in zip(self.subscriptions, reason_codes, strict=False)
                   if rc.is_failure]
        if refused:
            self._fatal = f"subscription refused for {refused}"
            log.error("MQTT broker %s refused the subscription to %s", self.where, refused)
            return
        log.info("subscribed to %s", ", ".join(t for t, _ in self.subscriptions))
        if self.on_ready is not None:
            self.on_ready()  # before ready: start() returns with the online status sent
        self._subscribed.set()

    def _on_message(self, client: mqtt.Client, userdata: object, message: mqtt.MQTTMessage) -> None:
        try:
            if message.retain:
                # A retained request would be served again at every (re)subscribe.
                log.warning("ignoring a retained message on %.200r", message.topic)
                return
            self._handler(message.topic, message.payload, message.properties if self.v5 else None)
        except Exception:  # an exception here would end paho's network thread
            log.exception("handling a message failed")

    def _on_publish(
        self, client: mqtt.Client, userdata: object, mid: int, reason_code: ReasonCode,
        properties: Properties | None,
    ) -> None:
        self._acked(mid)

    def _acked(self, mid: int | None = None) -> None:
        with self._acks:
            if mid in self._qos0_mids:
                self._qos0_mids.discard(mid)
                return
            self._unacked -= 1
            self._acks.notify_all()
