"""The agent's MQTT connection (paho-mqtt 2.x): connect, subscribe, hand messages off, publish.

paho's network thread reconnects on its own, also when the broker is down at
start, after waits that agent.mqtt.backoff draws (capped, exponential, jittered);
every (re)connect subscribes again. The session is persistent: a stable client
id (from ``--agent_id`` unless ``--client_id``), ``clean_start=False`` and
``--session_expiry``, so QoS 1 requests published while the agent is away wait
at the broker. Replies published while disconnected wait in paho's queue
(unbounded) and go out on reconnect. ``on_message`` only hands the payload to
the door, which never blocks.

Requests are acknowledged by hand (``manual_ack``, agent.mqtt.acks): the PUBACK goes
after the reply was handed to paho, so a request the agent had received but not
answered when it was killed is delivered again to the next process. The broker
sends at most its limit of unacknowledged messages at a time, the rest wait at the
broker (backpressure, not a flood of overload errors after an outage): on MQTT 5
the Receive Maximum we send, ``--max_queue`` (what the agent holds); on 3.1.1
Mosquitto's ``max_inflight_messages``. Mosquitto 2.0 does not always keep to it
(a resumed session's backlog comes at once), so with its queue full the MQTT door
also stops reading requests until there is room (agent.mqtt.door). A request delivered
again after a reconnect is served once (agent.mqtt.redelivery).
"""

from __future__ import annotations

import contextlib
import logging
import math
import socket
import threading
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from agent.mqtt.acks import NO_ACK, Ack
from agent.mqtt.backoff import Backoff, DropCounter
from agent.mqtt.loop_clock import LoopClient
from agent.mqtt.redelivery import Redeliveries
from agent.mqtt.tls import PLAIN_TO_TLS, answers_tls, configure_tls, handshake_message

if TYPE_CHECKING:
    from agent.service.config import AgentConfig

log = logging.getLogger(__name__)

QOS = 1
_AUTH_FAILURES = {134, 135}  # bad user name or password, not authorized
_TAKEN_OVER = 142  # MQTT 5 DISCONNECT: another client connected with our client id
# Connections lost in a row within DropCounter's window: said once at ERROR, since it may be a
# takeover that mosquitto signals by closing the socket, without MQTT 5's reason code 142.
_FLAPPING = 3
# The most unacknowledged messages MQTT 5 lets a client ask for (Receive Maximum).
RECEIVE_MAXIMUM = 65535


def receive_maximum(max_queue: int) -> int:
    """How many unacknowledged requests the broker may send us at once: as many as the agent
    holds (``--max_queue``), so the rest wait at the broker instead of being refused."""
    return max(1, min(RECEIVE_MAXIMUM, max_queue))

Handler = Callable[[str, bytes, Properties | None, Ack], None]  # topic, payload, v5 props, ack
Subscription = str | tuple[str, int]  # a topic (QoS 1) or (topic, QoS)


class MqttConnectError(ConnectionError):
    """The broker could not be reached, or refused us, in time."""


def stable_client_id(agent_id: str) -> str:
    """The default client id: the same after a restart, so the broker's session is resumed."""
    return f"vllm-deploy-{agent_id}"


def _no_delay(client: mqtt.Client, userdata: object, sock: object) -> None:
    """TCP_NODELAY: a reply written right after the request's PUBACK would otherwise wait for
    the broker's delayed ACK (Nagle), ~40 ms per request."""
    with contextlib.suppress(OSError, AttributeError):  # a unix socket, a websocket wrapper
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # type: ignore[attr-defined]


class MqttClient:
    def __init__(
        self, config: AgentConfig, subscriptions: Sequence[Subscription], on_message: Handler
    ) -> None:
        self.config = config
        self.subscriptions = [(s, QOS) if isinstance(s, str) else s for s in subscriptions]
        self._handler = on_message
        self.v5 = config.mqtt_protocol == "5"
        from agent.mqtt.status import default_agent_id

        self.client_id = config.client_id or stable_client_id(config.agent_id or default_agent_id())
        self._client = LoopClient(
            CallbackAPIVersion.VERSION2,
            client_id=self.client_id,
            protocol=mqtt.MQTTv5 if self.v5 else mqtt.MQTTv311,
            clean_session=None if self.v5 else False,  # v5: clean_start=False in start()
            manual_ack=True,  # agent.mqtt.acks: a request is acknowledged once answered
        )
        self._client.max_queued_messages_set(0)  # unbounded: no reply dropped while disconnected
        if config.mqtt_username is not None:
            self._client.username_pw_set(config.mqtt_username, config.mqtt_password)
        configure_tls(self._client, config, self._on_tls_error)
        max_delay = config.reconnect_max_delay
        self._backoff = Backoff(min(1.0, max_delay), max_delay)  # drawn before each retry
        self._drops = DropCounter(max(60.0, 4 * max_delay))
        self._client.on_connect = self._on_connect
        self._client.on_connect_fail = self._on_connect_fail
        self._client.on_disconnect = self._on_disconnect
        self._client.on_subscribe = self._on_subscribe
        self._client.on_message = self._on_message
        self._client.on_publish = self._on_publish
        self._client.on_socket_open = _no_delay
        self._subscribed = threading.Event()
        self._fatal: str | None = None
        self._tls_probed = False  # _plain_port_is_tls: asked once per process
        self._last_error = "no answer from the broker"
        self._sub_mid: int | None = None
        self._connection = 0  # counts successful connects: an Ack belongs to one of them
        self._unacked = 0
        self._acks = threading.Condition()
        self._qos0_mids: set[int] = set()  # stream messages in flight: not waited for
        self._started = False
        self._stopping = False
        self._connected = False
        self.on_ready: Callable[[], None] | None = None  # each (re)connect, once subscribed
        # After a dropped connection: why this agent must stop (agent.mqtt.rival), or None.
        self.rival_check: Callable[[], str | None] | None = None
        self.gave_up: str | None = None  # why the connection ended for good (run_forever exits)
        self._redeliveries = Redeliveries()

    @property
    def where(self) -> str:
        return f"{self.config.mqtt_broker}:{self.config.mqtt_port}"

    @property
    def ready(self) -> bool:
        """Connected and subscribed."""
        return self._subscribed.is_set()

    def loop_age(self) -> float | None:
        """Seconds paho's network loop has not come round (the systemd watchdog's view): infinite
        once its thread ended; a reconnect wait (at most ``--reconnect_max_delay``) does not count,
        so a broker that is down is no stall. None before ``start()`` and once stopping."""
        if not self._started or self._stopping:
            return None
        if self._client.loop_ended:
            return math.inf
        age = time.monotonic() - self._client.last_tick
        if not self._connected:
            age -= self.config.reconnect_max_delay
        return max(0.0, age)

    def start(self, wait: bool = True, timeout: float | None = None) -> None:
        """Connects in the background; with ``wait``, returns once subscribed or raises."""
        if not self._started:
            self._started = True
            kwargs: dict = {}
            if self.v5:
                props = Properties(PacketTypes.CONNECT)
                props.SessionExpiryInterval = self.config.session_expiry
                props.ReceiveMaximum = receive_maximum(self.config.max_queue)
                kwargs = {"properties": props, "clean_start": False}
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
        self._client.disconnect()  # the session stays: requests sent meanwhile wait for us
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
        self._connected = True
        self._connection += 1
        self._backoff.reset()
        resumed = getattr(flags, "session_present", False)
        if not resumed:
            self._redeliveries.new_session()
        log.info("connected to MQTT broker %s as %s (MQTT %s, %s session)", self.where,
                 self.client_id, self.config.mqtt_protocol, "resumed" if resumed else "new")
        result, self._sub_mid = client.subscribe(self.subscriptions)
        if result != mqtt.MQTT_ERR_SUCCESS:
            log.error("subscribing failed: %s", mqtt.error_string(result))

    def _on_tls_error(self, exc: OSError) -> None:
        """A failed TLS handshake; a certificate that does not verify fails start-up."""
        message, fatal = handshake_message(exc)
        if fatal:
            self._fatal = message
        log.error("MQTT broker %s: %s", self.where, message)

    def _plain_port_is_tls(self) -> bool:
        """At start-up, once: the broker closed our plain connection before its CONNACK. If
        the port answers TLS, that is fatal with the hint (retrying cannot help); later, the
        loss of a working connection is an outage and is retried for ever."""
        if self.config.mqtt_tls or self._tls_probed:
            return False
        self._tls_probed = True
        timeout = min(2.0, self.config.connect_timeout)
        if not answers_tls(self.config.mqtt_broker, self.config.mqtt_port, timeout):
            return False
        self._last_error = self._fatal = PLAIN_TO_TLS
        log.error("MQTT broker %s: %s", self.where, PLAIN_TO_TLS)
        return True

    def _on_connect_fail(self, client: mqtt.Client, userdata: object) -> None:
        self._last_error = "cannot reach the broker"
        wait = self._next_wait()
        log.warning("cannot reach MQTT broker %s; retrying in %.1f s", self.where, wait)

    def _on_disconnect(
        self, client: mqtt.Client, userdata: object, flags: object, reason_code: ReasonCode,
        properties: Properties | None,
    ) -> None:
        self._subscribed.clear()
        with self._acks:
            self._qos0_mids.clear()  # lost with the connection
            self._acks.notify_all()
        was_connected, self._connected = self._connected, False
        if self._stopping:
            return
        if not was_connected and self._connection == 0 and self._plain_port_is_tls():
            return  # fatal: start() or wait_ready() raises, and stops us
        if was_connected and self.rival_check is not None and self._second_agent():
            return
        wait = self._next_wait()
        drops = self._drops.record() if was_connected else 0
        if reason_code.value == _TAKEN_OVER or drops == _FLAPPING:
            why = ("another client connected with our client id" if drops < _FLAPPING else
                   f"connection lost {drops} times in {self._drops.window:g} s: another client "
                   "may be connecting with our client id")
            log.error("MQTT broker %s dropped us: %s %s (two agents with the same --agent_id or "
                      "--client_id take each other's session over; else see the broker's log); "
                      "reconnecting in %.1f s", self.where, why, self.client_id, wait)
            return
        log.warning("disconnected from MQTT broker %s (%s); reconnecting in %.1f s",
                    self.where, reason_code, wait)

    def _second_agent(self) -> bool:
        """Whether another agent with our client id took the session over and was first:
        then this one stops reconnecting (fatal: ``run_forever`` raises) instead of flapping."""
        problem = self.rival_check() if self.rival_check is not None else None
        if problem is None:
            return False
        self._last_error = self._fatal = self.gave_up = problem
        log.error("MQTT broker %s: %s", self.where, problem)
        self._client.disconnect()  # disconnected already: paho's loop ends, no reconnect
        return True

    def _next_wait(self) -> float:
        """Draws the wait before paho's next reconnect attempt and hands it to paho."""
        wait = self._backoff.next()
        self._client.reconnect_delay_set(min_delay=wait, max_delay=wait)  # type: ignore[arg-type]
        return wait

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
            try:
                self.on_ready()  # before ready: start() returns with the online status sent
            except Exception:  # raised here, it would end paho's network thread
                log.exception("the on-connect work failed")
        self._subscribed.set()

    def _on_message(self, client: mqtt.Client, userdata: object, message: mqtt.MQTTMessage) -> None:
        ack = NO_ACK if message.qos == 0 else Ack(
            client.ack, message.mid, message.qos, self._connection, self._current_connection)
        try:
            if message.retain:
                # A retained request would be served again at every (re)subscribe.
                log.warning("ignoring a retained message on %.200r", message.topic)
                return
            if ack is not NO_ACK and self._redeliveries.copy_handled(
                    ack, bool(message.dup), self._connection):
                return  # delivered again after a reconnect: served once (agent.mqtt.redelivery)
            self._handler(message.topic, message.payload, message.properties if self.v5 else None,
                          ack)
        except Exception:  # an exception here would end paho's network thread
            log.exception("handling a message failed")  # acknowledged: it would fail again
        finally:
            if not ack.held:  # answered (or dropped) here; else its turn acknowledges it
                ack()

    def _current_connection(self) -> int:
        return self._connection

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
