"""The status and metrics topics (PROTOCOL.md part C) against a real Mosquitto: the retained
status online / offline (clean stop, Last Will of a killed agent, re-published after a broker
restart), the metrics JSON every interval, the Prometheus endpoint, and no status subscriptions."""

from __future__ import annotations

import json
import logging
import os
import re
import secrets
import select
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

import agent as agent_package
from agent.mqtt.topics import filters_overlap
from agent.service.app import Agent
from agent.service.config import AgentConfig
from tests.fake_engine import FakeEngine
from tests.mqtt_broker import Broker, free_port, mosquitto_available
from tests.old_client import OldClient

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(not mosquitto_available(), reason="mosquitto is not installed"),
]
ROOT = Path(__file__).resolve().parent.parent
PROTOCOLS = ["3.1.1", "5"]


class Watcher:
    """A fresh subscriber to one topic that records (JSON payload, retain flag)."""

    def __init__(self, broker: Broker, topic: str) -> None:
        self.items: list[tuple[dict[str, Any], bool, float]] = []
        self._cond = threading.Condition()
        self._client = mqtt.Client(CallbackAPIVersion.VERSION2, f"watcher-{secrets.token_hex(3)}")
        self._client.on_message = self._on_message
        self._client.connect(broker.host, broker.port)
        self._client.loop_start()
        self._client.subscribe(topic, qos=1)

    def _on_message(self, client: mqtt.Client, userdata: object, msg: mqtt.MQTTMessage) -> None:
        with self._cond:
            self.items.append((json.loads(msg.payload), bool(msg.retain), time.monotonic()))
            self._cond.notify_all()

    def wait(self, check: Callable[[dict[str, Any]], bool], timeout: float = 5.0) -> tuple[dict, bool]:
        """The first message that passes ``check``, and its retain flag."""
        def found() -> tuple[dict, bool] | None:
            return next(((p, r) for p, r, _ in self.items if check(p)), None)

        with self._cond:
            assert self._cond.wait_for(lambda: found() is not None, timeout), self.items
            return found()  # type: ignore[return-value]

    def close(self) -> None:
        self._client.disconnect()
        self._client.loop_stop()


@pytest.fixture
def watch(broker: Broker) -> Iterator[Callable[[str], Watcher]]:
    watchers: list[Watcher] = []

    def make(topic: str) -> Watcher:
        watchers.append(Watcher(broker, topic))
        return watchers[-1]

    yield make
    for w in watchers:
        w.close()


def settings(broker: Broker, **overrides: Any) -> dict[str, Any]:
    """A unique agent id per test: the module's broker keeps every test's retained status."""
    return {"projects": ("maze", "general"), "mqtt_broker": broker.host, "mqtt_port": broker.port,
            "connect_timeout": 5.0, "reconnect_max_delay": 0.5,
            "agent_id": f"test-{secrets.token_hex(3)}", **overrides}


@pytest.fixture
def make_agent(broker: Broker) -> Iterator[Callable[..., Agent]]:
    agents: list[Agent] = []

    def make(**overrides: Any) -> Agent:
        agents.append(Agent(AgentConfig(**settings(broker, **overrides)), FakeEngine()))
        agents[-1].start()
        return agents[-1]

    yield make
    for a in agents:
        a.stop()


def online(p: dict) -> bool:
    return p["state"] == "online"


def offline(p: dict) -> bool:
    return p["state"] == "offline"


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_status_online_after_start_offline_after_clean_stop(
    make_agent: Callable[..., Agent], watch: Callable[[str], Watcher], protocol: str,
) -> None:
    agent = make_agent(mqtt_protocol=protocol)
    topic = f"vllm_deploy/{agent.agent_id}/status"
    watch(topic).wait(online)  # the broker has it: now a fresh subscriber gets it retained
    status, retained = watch(topic).wait(online)
    assert retained
    assert {k: status[k] for k in ("agentId", "projects", "version")} == {
        "agentId": agent.agent_id, "projects": ["maze", "general"],
        "version": agent_package.__version__}
    assert "model" in status and "quantization" in status
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", status["startedAt"])
    agent.stop()
    gone, retained = watch(topic).wait(lambda p: True)
    assert retained and offline(gone) and gone["startedAt"] == status["startedAt"]


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_last_will_says_offline_when_the_agent_dies(
    broker: Broker, watch: Callable[[str], Watcher], protocol: str,
) -> None:
    config = settings(broker, mqtt_protocol=protocol, projects=["general"])
    code = ("import json, sys, threading\n"
            "from agent.service.app import Agent\nfrom agent.service.config import AgentConfig\n"
            "from tests.fake_engine import FakeEngine\n"
            "c = json.loads(sys.argv[1]); c['projects'] = tuple(c['projects'])\n"
            "Agent(AgentConfig(**c), FakeEngine()).start()\n"
            "print('ready', flush=True)\nthreading.Event().wait()\n")
    proc = subprocess.Popen([sys.executable, "-c", code, json.dumps(config)], cwd=ROOT,
                            env={**os.environ, "PYTHONPATH": str(ROOT)},
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        ready, _, _ = select.select([proc.stdout], [], [], 20)
        assert ready and proc.stdout.readline().strip() == "ready"  # type: ignore[union-attr]
        watcher = watch(f"vllm_deploy/{config['agent_id']}/status")
        status, _ = watcher.wait(online)
        proc.kill()  # SIGKILL: no DISCONNECT, no offline publish of its own
        will, _ = watcher.wait(offline)
        assert will == {**status, "state": "offline"}  # the same JSON, state offline
        _, retained = watch(f"vllm_deploy/{config['agent_id']}/status").wait(offline)
        assert retained
    finally:
        proc.kill()
        proc.wait(5)


def test_online_again_after_a_broker_restart(
    make_agent: Callable[..., Agent], watch: Callable[[str], Watcher], broker: Broker,
) -> None:
    agent = make_agent()
    broker.restart()  # no persistence: the retained status is gone with the old broker
    status, _ = watch(f"vllm_deploy/{agent.agent_id}/status").wait(online, timeout=10)
    assert status["agentId"] == agent.agent_id


def test_metrics_every_interval_with_the_counts_sent(
    make_agent: Callable[..., Agent], watch: Callable[[str], Watcher], client: OldClient,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    agent = make_agent(stats_interval=0.2, max_requests_per_session=2)
    watcher = watch(f"vllm_deploy/{agent.agent_id}/metrics")
    assert client.ask("maze", "s1", "secret one") == "echo: secret one"
    assert client.ask("maze", "s1", "secret two") == "echo: secret two"
    assert client.ask("maze", "s1", "three").startswith("Error: Rate limit")
    assert client.ask("general", "s2", "   ") == "Error: empty message"
    assert client.ask("general", "s3", "four") == "echo: four"
    metrics, retained = watcher.wait(lambda p: p["processed"] + p["rejected"] == 5)
    assert not retained and metrics["agentId"] == agent.agent_id
    assert (metrics["processed"], metrics["errors"], metrics["rejected"]) == (3, 0, 2)
    assert metrics["rejectedBy"] == {"bad_request": 1, "rate_limited": 1, "overloaded": 0,
                                     "shutting_down": 0}
    assert metrics["byProject"] == {"maze": {"processed": 2, "errors": 0, "rejected": 1},
                                    "general": {"processed": 1, "errors": 0, "rejected": 1}}
    assert metrics["queueSize"] == 0 and metrics["latencyMs"]["count"] == 3
    assert 0 <= metrics["latencyMs"]["avg"] <= metrics["latencyMs"]["p95"] < 5000
    assert metrics["uptimeS"] > 0 and "tokensPerS" in metrics and "kvBlocks" in metrics
    start = len(watcher.items)
    time.sleep(1.0)
    times = [t for _, _, t in watcher.items[start:]]
    assert 3 <= len(times) <= 7, times  # one every 0.2 s
    assert all(0.05 < b - a < 1.0 for a, b in zip(times, times[1:], strict=False))
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("stats: ")]
    assert lines and "processed=3 errors=0 rejected=2" in lines[-1]
    assert not any("secret" in r.getMessage() for r in caplog.records)  # no prompts, no replies


def test_prometheus_endpoint_serves_the_counters(
    make_agent: Callable[..., Agent], client: OldClient,
) -> None:
    pytest.importorskip("prometheus_client")
    port = free_port()
    agent = make_agent(metrics_port=port, stats_interval=0)
    assert client.ask("maze", "p1", "hi") == "echo: hi"
    assert client.ask("maze", "p1", "") == "Error: empty message"
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    for line in ('vllm_deploy_requests_total{outcome="ok",project="maze"} 1.0',
                 'vllm_deploy_requests_total{outcome="bad_request",project="maze"} 1.0',
                 'vllm_deploy_door_requests_total{door="mqtt",outcome="ok"} 1.0',
                 "vllm_deploy_latency_seconds_count 1.0", "vllm_deploy_queue_size 0.0",
                 f'agent_id="{agent.agent_id}"'):
        assert line in text, line
    assert "vllm_deploy_tokens_per_second" in text and "vllm_deploy_uptime_seconds" in text
    for path in ("/", "/v1/models", "/metricsx"):  # this port serves /metrics alone
        with pytest.raises(urllib.error.HTTPError) as missing:
            urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5)
        assert missing.value.code == 404


def test_the_agent_never_subscribes_to_status_topics(make_agent: Callable[..., Agent]) -> None:
    agent = make_agent(legacy_topics=True, projects=("maze", "driving", "general"))
    filters = [t for t, _ in agent.mqtt.subscriptions]
    for status in ("vllm_deploy/+/status", "vllm_deploy/+/metrics", "vllm_deploy/#"):
        assert not [f for f in filters if filters_overlap(f, status)], status
    with pytest.raises(ValueError, match="would catch status topics"):
        Agent(AgentConfig(projects=("vllm_deploy",)), FakeEngine())
