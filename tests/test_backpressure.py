"""Backpressure instead of a flood of errors (issue 15, item 2), against a real Mosquitto.

After an outage the broker holds a backlog of requests for the agent. The agent lets the
broker send only as many unacknowledged ones as it can hold (MQTT 5 Receive Maximum =
``--max_queue``; on 3.1.1 Mosquitto's ``max_inflight_messages``, 20), so the rest wait at the
broker and none is answered "overloaded". What the broker itself queues is bounded by its
``max_queued_messages`` (default 1000): beyond it Mosquitto drops requests, which the agent
cannot see. On SIGTERM, requests not started and those arriving while the agent drains stay
at the broker, unacknowledged, for the next process.
"""

from __future__ import annotations

import json
import os
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

import pytest

from agent.core.outcome import OVERLOADED, SHUTTING_DOWN
from agent.service.app import Agent
from agent.service.config import AgentConfig
from tests.fake_engine import FakeEngine
from tests.mqtt_broker import Broker, Recorder, mosquitto_available, start_broker
from tests.test_recovery import ROOT, Requester

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(not mosquitto_available(), reason="mosquitto is not installed"),
]
BACKLOG = 1200
# An agent process that stops as vLLMDeploy.py does: gracefully on SIGTERM (run_forever).
AGENT = ("import json, logging, sys\n"
         "logging.basicConfig(level=logging.INFO)\n"
         "from agent.service.app import Agent\nfrom agent.service.config import AgentConfig\n"
         "from tests.fake_engine import FakeEngine\n"
         "c = json.loads(sys.argv[1]); c['projects'] = tuple(c['projects'])\n"
         "delay = c.pop('engine_delay', 0.0)\n"
         "agent = Agent(AgentConfig(**c), FakeEngine(delay=delay))\n"
         "agent.start()\nprint('ready', flush=True)\nagent.run_forever()\n")


def spawn(c: dict[str, Any], log_path: Path) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", AGENT, json.dumps(c)], cwd=ROOT,
                            env={**os.environ, "PYTHONPATH": str(ROOT)},
                            stdout=subprocess.PIPE, stderr=log_path.open("a"), text=True)
    ready, _, _ = select.select([proc.stdout], [], [], 30)
    assert ready and proc.stdout.readline().strip() == "ready", log_path.read_text()  # type: ignore[union-attr]
    return proc


@pytest.fixture(scope="module")
def roomy_broker() -> Iterator[Broker]:
    """Queues up to 2000 messages per client (Mosquitto's default: 1000)."""
    broker = start_broker(listener_options=["max_queued_messages 2000"])
    yield broker
    broker.stop()


def config(broker: Broker, protocol: str, **overrides: Any) -> dict[str, Any]:
    return {"projects": ("general",), "mqtt_broker": broker.host, "mqtt_port": broker.port,
            "mqtt_protocol": protocol, "connect_timeout": 10.0, "reconnect_max_delay": 0.5,
            "max_requests_per_session": 10_000, "max_requests_per_client": 10_000,
            "agent_id": f"backlog-{secrets.token_hex(3)}", "stats_interval": 0, **overrides}


def replies(recorder: Recorder) -> Counter:
    return Counter(p.decode() for p in recorder.payloads())


@pytest.fixture(scope="module")
def default_broker() -> Iterator[Broker]:
    """Mosquitto's defaults: max_queued_messages 1000."""
    broker = start_broker()
    yield broker
    broker.stop()


@pytest.mark.parametrize(("protocol", "roomy", "answered"),
                         [("3.1.1", True, BACKLOG), ("5", True, BACKLOG), ("3.1.1", False, 1000)])
def test_a_backlog_after_an_outage_is_answered_without_overload(
    request: pytest.FixtureRequest, protocol: str, roomy: bool, answered: int,
) -> None:
    """1,200 requests queued at the broker while the agent was away, then an agent that holds
    32 at a time: each is answered once, none overloaded (before, 1,052 to 1,072 of them got
    "overloaded": docs/RELIABILITY.md). With Mosquitto's default max_queued_messages (1000)
    the broker drops 200 before the agent could see them (README, "The broker's limits")."""
    broker = request.getfixturevalue("roomy_broker" if roomy else "default_broker")
    c = config(broker, protocol, max_queue=32)
    first = Agent(AgentConfig(**c), FakeEngine())
    first.start()  # the agent's persistent session: the broker queues for it from now on
    first.stop()
    client_id = f"backlog-client-{secrets.token_hex(3)}"
    recorder = Recorder(broker, f"general/assistant_response/{client_id}/#",
                        client_id=client_id)
    try:
        for i in range(BACKLOG):
            payload = {"sessionId": f"s{i % 50}", "message": f"m{i}",
                       "replyTopic": f"general/assistant_response/{client_id}/{i}"}
            recorder.publish("general/user_input", json.dumps(payload), wait=i % 100 == 99)
        agent = Agent(AgentConfig(**c), FakeEngine(delay=0.02))  # answers take a while
        agent.start()
        try:
            recorder.holds_within(lambda: len(recorder.payloads()) >= answered, 60)
            time.sleep(0.5 if roomy else 1.0)
            got = replies(recorder)
            assert got[OVERLOADED] == 0, got[OVERLOADED]
            assert set(got.values()) == {1} and len(got) == answered  # each once; the rest lost
            assert got == Counter(f"echo: m{i}" for i in range(answered))  # the oldest kept
            assert agent.metrics_summary()["rejected"] == 0
        finally:
            agent.stop()
    finally:
        recorder.close()


def test_requests_waiting_when_sigterm_comes_stay_for_the_next_process(
    roomy_broker: Broker, tmp_path: Path,
) -> None:
    """On MQTT 3.1.1 (where 57 of them used to get the shutting-down error): one request
    generating (it gets the error: its generation is cut), four queued behind it in its
    session, five more arriving while the agent drains. The next process answers the nine."""
    c = config(roomy_broker, "3.1.1", shutdown_timeout=1.0, engine_delay=3.0)
    log_path = tmp_path / "agent.log"
    requester = Requester(roomy_broker)
    first = spawn(c, log_path)
    try:
        for i in range(5):
            requester.send(10 * i, wait=True)  # sessions s0: one lane, one at a time
        time.sleep(0.3)
        first.send_signal(signal.SIGTERM)
        time.sleep(0.2)
        for i in range(1, 6):
            requester.send(i, wait=True)  # while it drains
        assert first.wait(10) == 0, log_path.read_text()
    finally:
        if first.poll() is None:
            first.kill()
    assert Counter(requester.replies) == Counter({SHUTTING_DOWN: 1})
    second = spawn({**c, "engine_delay": 0.0}, log_path)
    try:
        requester._recorder.holds_within(lambda: len(requester.replies) >= 10, 15)
        time.sleep(0.3)
        got = Counter(requester.replies)
        assert got == Counter([SHUTTING_DOWN] + [f"echo: m{i}" for i in
                                                 (10, 20, 30, 40, 1, 2, 3, 4, 5)]), got
    finally:
        second.send_signal(signal.SIGKILL)
        second.wait(5)
        requester.close()
    assert "left unacknowledged for the next process" in log_path.read_text()
