"""Start a private Mosquitto on a free local port for a test (never the system one on 1883),
and a ``Recorder``: a test client that keeps every message on its topic filters."""

from __future__ import annotations

import getpass
import secrets
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

MOSQUITTO = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
MOSQUITTO_PASSWD = shutil.which("mosquitto_passwd")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def mosquitto_available() -> bool:
    return Path(MOSQUITTO).is_file()


@dataclass
class Broker:
    host: str
    port: int
    process: subprocess.Popen
    workdir: Path
    users: dict[str, str] = field(default_factory=dict)

    @property
    def log(self) -> str:
        path = self.workdir / "mosquitto.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=5)
        shutil.rmtree(self.workdir, ignore_errors=True)

    def restart(self) -> None:
        """Stops and starts the same broker (same port, same config), e.g. to test reconnects."""
        if self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=5)
        self.process = _launch(self.workdir, self.port)


def _launch(workdir: Path, port: int) -> subprocess.Popen:
    process = subprocess.Popen(
        [MOSQUITTO, "-c", str(workdir / "mosquitto.conf")],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"mosquitto exited with {process.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return process
        except OSError:
            time.sleep(0.02)
    process.kill()
    raise RuntimeError("mosquitto did not accept connections within 10 s")


def start_broker(
    users: dict[str, str] | None = None, port: int | None = None, attempts: int = 3,
    listener_options: Sequence[str] = (),
    persistence: bool = False,
    acl: str | None = None,
) -> Broker:
    """A running broker; with ``users``, anonymous access is off and a password file is used.

    ``port`` picks the port (a test that starts the agent before its broker); else a free one.
    ``listener_options``: lines for the listener, e.g. ``certfile ...`` for TLS.
    ``persistence``: sessions, queued messages and retained ones survive ``restart()``
    (saved when mosquitto stops on SIGTERM).
    ``acl``: the text of an ACL file (``acl_file``), e.g. agent.service.mosquitto_acl's.
    """
    if users and not MOSQUITTO_PASSWD:
        raise RuntimeError("mosquitto_passwd is not installed")
    workdir = Path(tempfile.mkdtemp(prefix="mosquitto-test-"))
    last: Exception | None = None
    for _ in range(attempts):  # a free port may be taken before mosquitto binds it
        listen_port = port or free_port()
        lines = [
            f"listener {listen_port} 127.0.0.1",
            *listener_options,
            *(["persistence true", f"persistence_location {workdir}/"] if persistence
              else ["persistence false"]),
            f"user {getpass.getuser()}",  # as root, mosquitto would drop to a user that cannot read our files
            f"log_dest file {workdir / 'mosquitto.log'}",
            "log_type error",
            "log_type warning",
            "log_type notice",
        ]
        if users:
            passwd = workdir / "passwd"
            passwd.touch(mode=0o600)
            for user, password in users.items():
                subprocess.run([MOSQUITTO_PASSWD, "-b", str(passwd), user, password], check=True,
                               capture_output=True)
            lines += ["allow_anonymous false", f"password_file {passwd}"]
        else:
            lines.append("allow_anonymous true")
        if acl is not None:
            (workdir / "acl").write_text(acl)
            lines.append(f"acl_file {workdir / 'acl'}")
        (workdir / "mosquitto.conf").write_text("\n".join(lines) + "\n")
        try:
            process = _launch(workdir, listen_port)
        except RuntimeError as exc:
            last = exc
            continue
        return Broker("127.0.0.1", listen_port, process, workdir, dict(users or {}))
    shutil.rmtree(workdir, ignore_errors=True)
    raise RuntimeError(f"could not start mosquitto: {last}")


Message = tuple[str, bytes]  # (topic, payload)


class Recorder:
    """A client that records every message on ``filters`` (QoS 1), in arrival order.

    It subscribes on every connect, so a reconnect after ``Broker.restart()`` subscribes again;
    ``persistent``: the broker keeps its session (and the messages queued for it) while it is
    away, across a restart too with ``start_broker(persistence=True)``. The constructor returns
    once the first SUBACK granted every filter.
    """

    def __init__(self, broker: Broker, *filters: str, protocol: str = "5",
                 client_id: str | None = None, persistent: bool = False,
                 timeout: float = 5.0) -> None:
        if not filters:
            raise ValueError("a Recorder needs at least one topic filter")
        self.filters = filters
        self.client_id = client_id or f"recorder-{secrets.token_hex(3)}"
        self._cond = threading.Condition()
        self._messages: list[Message] = []
        self._suback: list[ReasonCode] | None = None
        v5 = protocol == "5"
        self._client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=self.client_id,
                                   protocol=mqtt.MQTTv5 if v5 else mqtt.MQTTv311,
                                   clean_session=None if v5 else not persistent)
        self._client.reconnect_delay_set(0.1, 0.5)
        self._client.on_connect = self._on_connect
        self._client.on_subscribe = self._on_subscribe
        self._client.on_message = self._on_message
        if v5 and persistent:
            self._client.connect(broker.host, broker.port, keepalive=10, clean_start=False,
                                 properties=_session_kept())
        else:
            self._client.connect(broker.host, broker.port, keepalive=10)
        self._client.loop_start()
        self._wait_for_suback(timeout)

    def _wait_for_suback(self, timeout: float) -> None:
        with self._cond:
            acked = self._cond.wait_for(lambda: self._suback is not None, timeout)
        if not acked:
            self.close()
        assert acked, f"{self.client_id}: no SUBACK for {self.filters} within {timeout} s"
        refused = [f for f, code in zip(self.filters, self._suback or [], strict=True)
                   if code.is_failure]
        assert not refused, f"{self.client_id}: the broker refused {refused}: {self._suback}"

    def _on_connect(self, client: mqtt.Client, userdata: object, flags: object,
                    reason_code: ReasonCode, properties: object) -> None:
        if not reason_code.is_failure:
            client.subscribe([(f, 1) for f in self.filters])

    def _on_subscribe(self, client: mqtt.Client, userdata: object, mid: int,
                      reason_codes: list[ReasonCode], properties: object) -> None:
        with self._cond:
            if self._suback is None:
                self._suback = list(reason_codes)
                self._cond.notify_all()

    def _on_message(self, client: mqtt.Client, userdata: object, message: mqtt.MQTTMessage) -> None:
        with self._cond:
            self._messages.append((message.topic, message.payload))
            self._cond.notify_all()

    def messages(self) -> list[Message]:
        """Everything received so far, in arrival order."""
        with self._cond:
            return list(self._messages)

    def payloads(self, topic: str | None = None) -> list[bytes]:
        """The payloads received on ``topic`` (on any topic if None), in arrival order."""
        return [p for t, p in self.messages() if topic is None or t == topic]

    def holds_within(self, condition: Callable[[], bool], timeout: float) -> bool:
        """Whether ``condition`` (which may read this recorder) holds within ``timeout`` s;
        checked at each arrival."""
        with self._cond:
            return self._cond.wait_for(condition, timeout)

    def wait_for(self, n: int, topic: str | None = None, timeout: float = 10.0) -> list[bytes]:
        """The payloads on ``topic`` (any topic if None) once there are ``n``; asserts they come
        within ``timeout`` s."""
        if not self.holds_within(lambda: len(self.payloads(topic)) >= n, timeout):
            got = len(self.payloads(topic))
            raise AssertionError(f"{got} of {n} messages on {topic or 'any topic'} within "
                                 f"{timeout} s; all received: {self.messages()}")
        return self.payloads(topic)

    def publish(self, topic: str, payload: bytes | str, response_topic: str | None = None,
                wait: bool = True, timeout: float = 5.0) -> None:
        """QoS 1, with ``response_topic`` as the MQTT v5 Response Topic if given. ``wait``:
        asserts the PUBACK within ``timeout`` s; without it, a message published while the
        broker is away is sent when the client is back."""
        properties = None
        if response_topic is not None:
            properties = Properties(PacketTypes.PUBLISH)
            properties.ResponseTopic = response_topic
        info = self._client.publish(topic, payload, qos=1, properties=properties)
        if wait:
            info.wait_for_publish(timeout)
            assert info.is_published(), f"{self.client_id}: no PUBACK for {topic} in {timeout} s"

    def close(self) -> None:
        self._client.disconnect()
        self._client.loop_stop()

    def __enter__(self) -> Recorder:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self.close()


def _session_kept() -> Properties:
    """MQTT v5 CONNECT properties: the broker keeps the session after a disconnect."""
    properties = Properties(PacketTypes.CONNECT)
    properties.SessionExpiryInterval = 0xFFFFFFFF
    return properties
