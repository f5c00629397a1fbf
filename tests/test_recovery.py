"""Nothing lost (issue 5, item 3) against a real Mosquitto with persistence on: the broker
restarted during a burst and while requests are being answered, the agent SIGKILLed while
requests wait at the broker and while it is answering them (acknowledged only after the
reply: agent.mqtt.acks), a session takeover, and the jittered reconnect back-off."""

from __future__ import annotations

import json
import logging
import os
import random
import secrets
import select
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from agent.mqtt.backoff import Backoff
from agent.service.app import Agent
from agent.service.config import AgentConfig
from tests.ack_counter import counting_acks
from tests.fake_engine import FakeEngine, user_turns
from tests.mqtt_broker import Broker, Recorder, mosquitto_available, start_broker

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(not mosquitto_available(), reason="mosquitto is not installed"),
]
ROOT = Path(__file__).resolve().parent.parent
PROTOCOLS = ["3.1.1", "5"]


@pytest.fixture(scope="module")
def broker() -> Iterator[Broker]:
    """Persistence on: sessions and queued messages survive a restart."""
    broker = start_broker(persistence=True)
    yield broker
    broker.stop()


class Requester:
    """A client with a persistent session of its own (replies queued for it survive a broker
    restart, like the agent's requests) that counts every reply it is delivered."""

    def __init__(self, broker: Broker, project: str = "general") -> None:
        self.id = f"requester-{secrets.token_hex(3)}"
        self.project = project
        self.root = f"{project}/assistant_response/{self.id}"
        self._recorder = Recorder(broker, self.root + "/#", protocol="3.1.1", client_id=self.id,
                                  persistent=True)

    @property
    def replies(self) -> list[str]:
        return [p.decode() for p in self._recorder.payloads()]

    def send(self, i: int, wait: bool = False, request_id: bool = True) -> None:
        """Request ``m<i>`` (session ``s<i % 10>``, requestId ``r<i>`` unless not
        ``request_id``), QoS 1; ``wait`` for the PUBACK (without it, a request sent while the
        broker is down goes once it is back)."""
        payload = {"sessionId": f"s{i % 10}", "message": f"m{i}",
                   "replyTopic": f"{self.root}/s{i % 10}",
                   **({"requestId": f"r{i}"} if request_id else {})}
        self._recorder.publish(f"{self.project}/user_input", json.dumps(payload), wait=wait)

    def wait_for(self, n: int, timeout: float) -> Counter:
        """Replies per request index once ``n`` distinct requests are answered (or ``timeout``
        s have passed: the caller asserts on what came)."""
        def answered() -> Counter:
            return Counter(int(r.removeprefix("echo: m")) for r in self.replies)

        self._recorder.holds_within(lambda: len(answered()) >= n, timeout)
        return answered()

    def close(self) -> None:
        self._recorder.close()


@pytest.fixture
def requester(broker: Broker) -> Iterator[Requester]:
    requester = Requester(broker)
    yield requester
    requester.close()


def config(broker: Broker, **overrides: Any) -> dict[str, Any]:
    return {"projects": ["general"], "mqtt_broker": broker.host, "mqtt_port": broker.port,
            "connect_timeout": 10.0, "reconnect_max_delay": 0.5, "max_requests_per_session": 1000,
            "agent_id": f"recovery-{secrets.token_hex(3)}", "stats_interval": 0, **overrides}


@pytest.mark.parametrize("request_id", [True, False], ids=["requestId", "no-requestId"])
@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_broker_restart_during_a_burst_loses_no_request(
    broker: Broker, requester: Requester, protocol: str, request_id: bool,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """200 requests; the broker stops (SIGTERM, it saves its state) after the first 100 are
    sent, the other 100 are sent while it is down, then it starts again on the same port.
    Asserted: every request is answered; the agent ran each prompt once (with a requestId
    or without: a copy the broker delivers again is told by its packet id, agent.mqtt.
    redelivery) and counted one answer per request; the requester got every reply. A reply
    can still come twice (QoS 1: the broker got it, our PUBACK of it was lost), and only
    for requests that reached the agent before the broker went."""
    caplog.set_level(logging.INFO)
    c = config(broker, mqtt_protocol=protocol)
    c["projects"] = tuple(c["projects"])
    engine = FakeEngine(delay=0.01)  # a backlog in the agent when the broker goes
    agent = Agent(AgentConfig(**c), engine)
    agent.start()
    try:
        for i in range(100):
            requester.send(i, request_id=request_id)
        requester.wait_for(20, timeout=10)  # some answered, others queued or in flight
        broker.process.terminate()
        broker.process.wait(5)
        for i in range(100, 200):
            requester.send(i, request_id=request_id)  # queued by the requester's client until the broker is back
        time.sleep(0.5)  # replies finished meanwhile queue in the agent
        broker.restart()
        got = requester.wait_for(200, timeout=30)
        assert sorted(got) == list(range(200)), f"unanswered: {set(range(200)) - set(got)}"
        time.sleep(0.5)  # late duplicates, if any, would land now
        got = requester.wait_for(200, timeout=0)
        generated = Counter(user_turns(p)[-1] for p in engine.prompts)
        assert generated == Counter(f"m{i}" for i in range(200))  # each prompt once
        summary = agent.metrics_summary()
        assert (summary["processed"], summary["errors"], summary["rejected"]) == (200, 0, 0)
        assert set(got.values()) <= {1, 2, 3} and all(got[i] == 1 for i in range(100, 200)), got
        assert agent.ready and "publishing on" not in caplog.text  # publish never raised
        assert "disconnected from MQTT broker" in caplog.text
    finally:
        agent.stop()


AGENT = ("import json, logging, sys, threading\n"
         "logging.basicConfig(level=logging.INFO)\n"
         "from agent.service.app import Agent\nfrom agent.service.config import AgentConfig\n"
         "from tests.fake_engine import FakeEngine\n"
         "c = json.loads(sys.argv[1]); c['projects'] = tuple(c['projects'])\n"
         "delay = c.pop('engine_delay', 0.0)\n"
         "logging.getLogger('agent.core.conversation').setLevel(c.pop('router_log_level', 'INFO'))\n"
         "Agent(AgentConfig(**c), FakeEngine(delay=delay)).start()\n"
         "print('ready', flush=True)\nthreading.Event().wait()\n")


def spawn(c: dict[str, Any], log_path: Path) -> subprocess.Popen:
    log_file = log_path.open("a")
    proc = subprocess.Popen([sys.executable, "-c", AGENT, json.dumps(c)], cwd=ROOT,
                            env={**os.environ, "PYTHONPATH": str(ROOT)},
                            stdout=subprocess.PIPE, stderr=log_file, text=True)
    ready, _, _ = select.select([proc.stdout], [], [], 30)
    assert ready and proc.stdout.readline().strip() == "ready", log_path.read_text()  # type: ignore[union-attr]
    return proc


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_requests_sent_while_the_agent_is_dead_are_answered_after_its_restart(
    broker: Broker, requester: Requester, protocol: str, tmp_path: Path,
) -> None:
    """The agent (a subprocess with a fixed agent_id) is SIGKILLed; 50 QoS 1 requests are
    published (the broker acknowledges them) while it is dead; a new process with the same
    agent_id resumes the session. Asserted: each of the 50 answered exactly once."""
    c = config(broker, mqtt_protocol=protocol)
    log_path = tmp_path / "agent.log"
    first = spawn(c, log_path)
    try:
        requester.send(1000, wait=True)
        assert requester.wait_for(1, timeout=10) == Counter({1000: 1})
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait(5)
    for i in range(50):
        requester.send(i, wait=True)  # the broker holds them for the agent's session
    time.sleep(0.3)
    assert len(requester.replies) == 1  # nobody answered meanwhile
    second = spawn(c, log_path)
    try:
        got = requester.wait_for(51, timeout=20)
        time.sleep(0.3)
        got = requester.wait_for(51, timeout=0)
        # r1000 may come twice: a kill that lands between its reply and its PUBACK (which
        # follows the reply, agent.mqtt.acks) has the broker deliver it again: at least once.
        assert got[1000] in (1, 2), got
        assert got - Counter({1000: got[1000]}) == Counter(range(50)), got
        assert "resumed session" in log_path.read_text()
    finally:
        second.send_signal(signal.SIGKILL)
        second.wait(5)


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_requests_in_flight_when_the_agent_is_killed_are_answered_after_its_restart(
    broker: Broker, requester: Requester, protocol: str, tmp_path: Path,
) -> None:
    """20 QoS 1 requests are delivered to the agent (a subprocess with a fixed agent_id and an
    engine that takes 60 s: all 20 accepted, none answered), then it is SIGKILLed and a new
    process with the same agent_id (a quick engine) resumes the session. The first process
    acknowledged none of them (agent.mqtt.acks: PUBACK only after the reply), so the broker
    delivers all 20 again. Asserted: each of the 20 answered, and exactly once (the first
    process published no reply, the second got each request once). 20 is also Mosquitto's
    default max_inflight_messages, the most it sends an MQTT 3.1.1 client unacknowledged."""
    c = config(broker, mqtt_protocol=protocol, engine_delay=60.0, request_timeout=300.0,
               router_log_level="DEBUG")
    log_path = tmp_path / "agent.log"
    first = spawn(c, log_path)
    try:
        for i in range(20):
            requester.send(i, wait=True)
        deadline = time.monotonic() + 10
        while log_path.read_text().count(" accepted: session ") < 20:
            assert time.monotonic() < deadline, log_path.read_text()
            time.sleep(0.05)
        assert requester.replies == []
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait(5)
    second = spawn({**c, "engine_delay": 0.01}, log_path)
    try:
        got = requester.wait_for(20, timeout=20)
        time.sleep(0.3)  # a second reply to any of them would land now
        got = requester.wait_for(20, timeout=0)
        assert got == Counter(range(20)), got
    finally:
        second.send_signal(signal.SIGKILL)
        second.wait(5)


def test_requests_delivered_again_after_a_reconnect_are_answered_once(
    broker: Broker, requester: Requester,
) -> None:
    """Five requests are being answered (an engine that takes 1.5 s) when the broker restarts;
    the broker delivers the five again (DUP set, the same requestIds) on the new connection.
    Asserted: one reply each, each prompt generated once (the deduper), and nothing left
    unacknowledged at the broker: a new agent with the same agent_id answers nothing more."""
    c = config(broker, mqtt_protocol="5")
    c["projects"] = tuple(c["projects"])
    engine = FakeEngine(delay=1.5)
    with counting_acks() as acks:
        agent = Agent(AgentConfig(**c), engine)
        agent.start()
        try:
            for i in range(5):
                requester.send(i, wait=True)
            deadline = time.monotonic() + 5
            while agent.core.lanes.pending < 5:
                assert time.monotonic() < deadline
                time.sleep(0.02)
            broker.restart()
            assert agent.mqtt.wait_ready(10)
            got = requester.wait_for(5, timeout=10)
            time.sleep(0.5)
            assert requester.wait_for(5, timeout=0) == Counter(range(5)), got
            assert sorted(user_turns(p)[-1] for p in engine.prompts) == [f"m{i}" for i in range(5)]
        finally:
            agent.stop()
    # Each request came twice; only the copies on the live connection were acknowledged.
    assert (sum(acks.delivered.values()), acks.redelivered, sum(acks.acked.values())) == (10, 5, 5)
    again = Agent(AgentConfig(**c), FakeEngine())
    again.start()
    try:
        time.sleep(1.0)
        assert requester.wait_for(5, timeout=0) == Counter(range(5))
    finally:
        again.stop()


def test_a_session_takeover_is_logged_and_the_agent_serves_again(
    broker: Broker, requester: Requester, caplog: pytest.LogCaptureFixture,
) -> None:
    """A second client with the agent's client id that reconnects like an agent (clean start:
    the agent's session and subscriptions are wiped) keeps taking the session over; the agent
    says so at ERROR (mosquitto closes the connection without MQTT 5's reason code 142, so the
    agent counts the drops), and once the intruder is gone it reconnects, subscribes again and
    answers."""
    c = config(broker, mqtt_protocol="5")
    c["projects"] = tuple(c["projects"])
    agent = Agent(AgentConfig(**c), FakeEngine())
    agent.start()
    try:
        intruder = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=agent.mqtt.client_id,
                               protocol=mqtt.MQTTv5)
        intruder.reconnect_delay_set(0.1, 0.3)
        intruder.connect(broker.host, broker.port, clean_start=True)
        intruder.loop_start()
        deadline = time.monotonic() + 15
        while f"client id {agent.mqtt.client_id} (two agents" not in caplog.text:
            assert time.monotonic() < deadline, caplog.text
            time.sleep(0.05)
        intruder.disconnect()
        intruder.loop_stop()
        assert agent.mqtt.wait_ready(10)
        requester.send(7, wait=True)
        assert requester.wait_for(1, timeout=10) == Counter({7: 1})
    finally:
        agent.stop()


def test_backoff_is_capped_exponential_and_jittered() -> None:
    rng = random.Random()
    first, cap = rng.uniform(0.1, 1.0), rng.uniform(5.0, 20.0)
    backoff = Backoff(first, cap, rng)
    waits = [backoff.next() for _ in range(40)]
    for n, wait in enumerate(waits):
        step = min(cap, first * 2 ** n)
        assert step / 2 <= wait <= step
    assert len(set(waits)) == len(waits)  # jittered: no two boxes knock in step
    backoff.reset()
    assert first / 2 <= backoff.next() <= first
    with pytest.raises(ValueError, match="first <= cap"):
        Backoff(2.0, 1.0)


def test_a_failing_on_connect_hook_does_not_end_the_network_loop(broker: Broker) -> None:
    """An exception out of a paho callback ends paho's thread for good (then only the
    watchdog would notice): the client's own on-connect work is guarded."""
    from agent.mqtt.client import MqttClient

    c = AgentConfig(**{**config(broker), "projects": ("general",)})
    client = MqttClient(c, ["general/user_input"], lambda *a: None)
    client.on_ready = lambda: 1 / 0
    try:
        client.start(wait=True, timeout=10)
        assert client.ready and client.loop_age() is not None and client.loop_age() < 5
    finally:
        client.stop(flush_timeout=0)
