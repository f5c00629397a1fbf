"""The agent over TLS to a real Mosquitto, with a CA and certificates made by openssl here."""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from agent.service.app import Agent, MqttConnectError
from agent.service.checks import check_agent_config
from agent.service.config import AgentConfig
from agent.service.settings import SettingsError, parse_settings
from tests.fake_engine import FakeEngine
from tests.mqtt_broker import Broker, mosquitto_available, start_broker

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(not mosquitto_available(), reason="mosquitto is not installed"),
    pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl is not installed"),
]
EC = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]


@dataclass(frozen=True)
class Pki:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    other_ca: Path  # a CA that signed nothing here


def _openssl(*args: str | Path, cwd: Path) -> None:
    subprocess.run(["openssl", *map(str, args)], cwd=cwd, check=True, capture_output=True)


def _make_ca(d: Path, name: str) -> tuple[Path, Path]:
    _openssl("req", "-x509", *EC, "-keyout", f"{name}.key", "-out", f"{name}.crt", "-days", "2",
             "-subj", f"/CN={name}", "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,keyCertSign,cRLSign", cwd=d)
    return d / f"{name}.crt", d / f"{name}.key"


def _make_cert(d: Path, name: str, ca: str, extensions: str) -> tuple[Path, Path]:
    (d / f"{name}.ext").write_text(
        "basicConstraints=CA:FALSE\nauthorityKeyIdentifier=keyid,issuer\n" + extensions + "\n")
    _openssl("req", *EC, "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={name}",
             cwd=d)
    _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.crt", "-CAkey", f"{ca}.key",
             "-CAcreateserial", "-out", f"{name}.crt", "-days", "2", "-extfile", f"{name}.ext",
             cwd=d)
    return d / f"{name}.crt", d / f"{name}.key"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    d = tmp_path_factory.mktemp("pki")
    ca, _ = _make_ca(d, "test-ca")
    other_ca, _ = _make_ca(d, "other-ca")
    server = _make_cert(d, "server", "test-ca",
                        "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth")
    client = _make_cert(d, "client", "test-ca", "extendedKeyUsage=clientAuth")
    return Pki(ca, *server, *client, other_ca)


def _tls_broker(pki: Pki, require_certificate: bool) -> Broker:
    return start_broker(listener_options=[
        f"cafile {pki.ca}", f"certfile {pki.server_cert}", f"keyfile {pki.server_key}",
        f"require_certificate {'true' if require_certificate else 'false'}",
    ])


@pytest.fixture(scope="module")
def tls_broker(pki: Pki) -> Iterator[Broker]:
    broker = _tls_broker(pki, require_certificate=False)
    yield broker
    broker.stop()


@pytest.fixture(scope="module")
def mutual_broker(pki: Pki) -> Iterator[Broker]:
    broker = _tls_broker(pki, require_certificate=True)
    yield broker
    broker.stop()


def _config(broker: Broker, **tls: object) -> AgentConfig:
    settings: dict = {"projects": ("general",), "mqtt_broker": broker.host,
                      "mqtt_port": broker.port, "connect_timeout": 5.0,
                      "reconnect_max_delay": 0.5, "mqtt_tls": True, **tls}
    return AgentConfig(**settings)


def _ask_over_tls(broker: Broker, pki: Pki, message: str) -> str:
    """One request from a TLS client with a client certificate; the reply's text."""
    replies: list[str] = []
    got = threading.Event()
    subscribed = threading.Event()
    client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv311)
    client.tls_set(ca_certs=str(pki.ca), certfile=str(pki.client_cert), keyfile=str(pki.client_key))
    client.on_message = lambda c, u, m: (replies.append(m.payload.decode()), got.set())
    client.on_subscribe = lambda *a: subscribed.set()
    client.connect(broker.host, broker.port)
    client.loop_start()
    try:
        client.subscribe("general/assistant_response/tls", qos=1)
        assert subscribed.wait(5)
        client.publish("general/user_input", json.dumps({"sessionId": "tls", "message": message}),
                       qos=1).wait_for_publish(5)
        assert got.wait(10), "no reply over TLS"
        return replies[0]
    finally:
        client.disconnect()
        client.loop_stop()


def test_request_answered_over_tls(tls_broker: Broker, pki: Pki) -> None:
    with Agent(_config(tls_broker, mqtt_ca_certs=str(pki.ca)), FakeEngine()):
        assert _ask_over_tls(tls_broker, pki, "over tls") == "echo: over tls"


def test_client_certificate(mutual_broker: Broker, pki: Pki) -> None:
    config = _config(mutual_broker, mqtt_ca_certs=str(pki.ca), mqtt_certfile=str(pki.client_cert),
                     mqtt_keyfile=str(pki.client_key))
    with Agent(config, FakeEngine()):
        assert _ask_over_tls(mutual_broker, pki, "mutual") == "echo: mutual"
    without = Agent(_config(mutual_broker, mqtt_ca_certs=str(pki.ca), connect_timeout=2.0),
                    FakeEngine())
    with pytest.raises(MqttConnectError, match="requires a client certificate"):
        without.start()


def test_wrong_ca_is_refused_at_once(tls_broker: Broker, pki: Pki) -> None:
    agent = Agent(_config(tls_broker, mqtt_ca_certs=str(pki.other_ca), connect_timeout=20.0),
                  FakeEngine())
    started = time.monotonic()
    with pytest.raises(MqttConnectError, match="certificate does not verify.*--mqtt_ca_certs"):
        agent.start()
    assert time.monotonic() - started < 10  # fatal: not retried until the timeout


def test_plain_port_is_a_clear_error(broker: Broker, pki: Pki) -> None:
    agent = Agent(_config(broker, mqtt_ca_certs=str(pki.ca)), FakeEngine())
    with pytest.raises(MqttConnectError, match="TLS listener"):
        agent.start()


@pytest.mark.parametrize("protocol", ["3.1.1", "5"])
def test_plain_connection_to_a_tls_port_fails_at_start_with_a_hint(
    tls_broker: Broker, protocol: str
) -> None:
    """Was: "disconnected (Unspecified error); reconnecting" for ever. Now the start fails at
    once, as run_forever (the launcher's path) and start() both see it."""
    config = _config(tls_broker, mqtt_tls=False, mqtt_protocol=protocol, connect_timeout=10.0)
    agent = Agent(config, FakeEngine())
    stopper = threading.Timer(20.0, agent.request_stop)  # before the fix: it would retry on
    stopper.start()
    started = time.monotonic()
    try:
        with pytest.raises(MqttConnectError, match=r"TLS listener\? use --mqtt_tls"):
            agent.run_forever()
    finally:
        stopper.cancel()
    assert time.monotonic() - started < config.connect_timeout
    with pytest.raises(MqttConnectError, match=r"TLS listener\? use --mqtt_tls"):
        Agent(config, FakeEngine()).start()


def test_lost_connection_is_retried_even_when_the_port_turns_tls(pki: Pki) -> None:
    """Only the start-up connect is judged: once connected, the broker's port may answer TLS
    for a while (a reconfigured broker) and the agent still reconnects when it is plain again."""
    plain = start_broker()
    port = plain.port
    config = AgentConfig(projects=("general",), mqtt_broker=plain.host, mqtt_port=port,
                         connect_timeout=5.0, reconnect_max_delay=0.3)
    agent = Agent(config, FakeEngine())
    agent.start()
    try:
        plain.stop()
        tls = _tls_broker_on(pki, port)
        try:
            # several plain connects are hung up on by the TLS listener: not fatal
            assert agent.mqtt.wait_ready(2.0) is False
        finally:
            tls.stop()
        plain = start_broker(port=port)
        assert agent.mqtt.wait_ready(10.0)
    finally:
        agent.stop()
        plain.stop()


def _tls_broker_on(pki: Pki, port: int) -> Broker:
    return start_broker(port=port, listener_options=[
        f"cafile {pki.ca}", f"certfile {pki.server_cert}", f"keyfile {pki.server_key}"])


def test_insecure_connects_with_a_wrong_ca_and_warns(
    tls_broker: Broker, pki: Pki, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    config = _config(tls_broker, mqtt_ca_certs=str(pki.other_ca), mqtt_tls_insecure=True)
    with Agent(config, FakeEngine()):
        assert _ask_over_tls(tls_broker, pki, "insecure") == "echo: insecure"
    warnings = [r for r in caplog.records if "--mqtt_tls_insecure" in r.getMessage()]
    assert len(warnings) == 1 and warnings[0].levelno == logging.WARNING


def test_file_errors_name_the_flag_and_file(pki: Pki, tmp_path: Path) -> None:
    missing = tmp_path / "nowhere.pem"
    with pytest.raises(ValueError, match=f"--mqtt_ca_certs {missing}: .*cannot be read"):
        check_agent_config(AgentConfig(mqtt_tls=True, mqtt_ca_certs=str(missing)))
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate\n")
    with pytest.raises(ValueError, match=f"--mqtt_ca_certs {garbage}: not a PEM"):
        check_agent_config(AgentConfig(mqtt_tls=True, mqtt_ca_certs=str(garbage)))
    with pytest.raises(ValueError, match="--mqtt_certfile .*--mqtt_keyfile .*not a PEM"):
        check_agent_config(AgentConfig(mqtt_tls=True, mqtt_certfile=str(pki.client_cert), mqtt_keyfile=str(garbage)))
    with pytest.raises(ValueError, match=f"--mqtt_keyfile {missing}: the private key"):
        check_agent_config(AgentConfig(mqtt_tls=True, mqtt_certfile=str(pki.client_cert), mqtt_keyfile=str(missing)))
    with pytest.raises(ValueError, match="--mqtt_keyfile needs --mqtt_certfile"):
        check_agent_config(AgentConfig(mqtt_tls=True, mqtt_keyfile=str(pki.client_key)))


@pytest.mark.parametrize("flags", [["--mqtt_certfile", "C", "--mqtt_keyfile", "K"],
                                   ["--mqtt_ca_certs", "A"], ["--mqtt_tls_insecure"]])
def test_tls_flags_without_mqtt_tls(flags: list[str], pki: Pki) -> None:
    files = {"C": pki.client_cert, "K": pki.client_key, "A": pki.ca}
    flags = [str(files[f]) if f in files else f for f in flags]
    with pytest.raises(SettingsError, match=f"{flags[0]}.* only apply with --mqtt_tls"):
        parse_settings(flags, environ={})
    assert parse_settings([*flags, "--mqtt_tls"], environ={}).agent_config().mqtt_tls
