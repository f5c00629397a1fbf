"""Status and metrics without a broker: counters, the latency window, the summary and its log
line, the status JSON, topic confinement, the router's hooks and the Prometheus collector."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

import agent
from agent.core.metrics import LATENCY_BUCKETS, RequestMetrics, log_line, percentile, summary
from agent.mqtt.status import (
    OFFLINE,
    AgentInfo,
    StatusReporter,
    check_service_topics,
    default_agent_id,
    service_topics,
)
from agent.mqtt.topics import Topics, filters_overlap
from agent.service.app import Agent
from agent.service.checks import check_agent_config
from agent.service.config import AgentConfig
from agent.service.prometheus import PIP_HINT, AgentCollector, require_prometheus
from projects import ProjectSpec
from tests.chat_rig import ChatRig
from tests.fake_engine import FakeEngine
from tests.test_router import Replies, send

ENGINE = {"running": 1, "waiting": 2, "preemptions": 0, "tokens_per_s": 12.345,
          "kv_blocks_total": 100, "kv_blocks_free": 70, "kv_blocks_by_project": {"maze": 30}}


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_counts_latency_window_and_histogram() -> None:
    clock = Clock()
    m = RequestMetrics(clock, window_s=10.0)
    m.answered("maze", True, 0.2, door="mqtt")
    clock.now += 20  # the first reply leaves the latency window, not the counters
    for latency in (0.01, 0.02, 0.03, 0.04, 1.0):
        m.answered("maze", True, latency, door="mqtt")
    m.answered("general", False, 3.0, door="mqtt")
    m.rejected("maze", "rate_limited", door="mqtt")
    m.rejected("maze", "bad_request", door="mqtt")
    assert m.counts()["maze"] == {"ok": 6, "error": 0, "bad_request": 1, "rate_limited": 1,
                                  "overloaded": 0, "shutting_down": 0}
    assert sorted(m.latencies()) == [0.01, 0.02, 0.03, 0.04, 1.0, 3.0]
    buckets, total = m.histogram()
    assert [b for b, _ in buckets] == list(LATENCY_BUCKETS) and buckets[-1][1] == 7
    assert dict(buckets)[0.05] == 4 and dict(buckets)[0.25] == 5 and total == pytest.approx(4.3)
    assert m.uptime() == 20.0
    with pytest.raises(AssertionError):
        m.rejected("maze", "nonsense", door="mqtt")


def test_percentile_nearest_rank() -> None:
    assert percentile([], 0.95) == 0.0
    assert percentile([3.0], 0.95) == 3.0
    assert percentile([float(i) for i in range(1, 101)], 0.95) == 95.0
    assert percentile([5.0, 1.0, 2.0, 4.0, 3.0], 0.5) == 3.0


def test_summary_and_log_line() -> None:
    clock = Clock()
    m = RequestMetrics(clock)
    m.answered("maze", True, 0.1, door="mqtt")
    m.answered("maze", True, 0.3, door="mqtt")
    m.answered("maze", False, 0.5, door="mqtt")
    m.rejected("general", "overloaded", door="mqtt")
    s = summary(m, 4, ENGINE, {"driving": {"regenerated": 2, "repaired": 1}})
    assert (s["processed"], s["errors"], s["rejected"], s["queueSize"]) == (2, 1, 1, 4)
    assert s["rejectedBy"] == {"bad_request": 0, "rate_limited": 0, "overloaded": 1,
                               "shutting_down": 0}
    assert s["latencyMs"] == {"avg": 300.0, "p95": 500.0, "count": 3, "windowS": 300.0}
    assert s["kvBlocks"] == {"total": 100, "used": 30, "byProject": {"maze": 30}}
    assert s["tokensPerS"] == 12.35 and s["engine"] == {"running": 1, "waiting": 2, "preemptions": 0}
    assert s["byProject"]["general"] == {"processed": 0, "errors": 0, "rejected": 1}
    json.dumps(s, allow_nan=False)
    line = log_line(s)
    assert line.startswith("stats: processed=2 errors=1 rejected=1 (overloaded=1) queue=4")
    assert "p95=500ms" in line and "kv_used=30/100 [maze=30]" in line and "driving:2/1" in line
    empty = summary(RequestMetrics(clock), 0, {}, {})  # a fake engine without KV counters
    assert empty["latencyMs"]["avg"] is None and empty["kvBlocks"]["used"] is None
    assert "avg=- p95=-" in log_line(empty) and "kv_used" not in log_line(empty)


@pytest.mark.parametrize(("a", "b", "overlap"), [
    ("a/b", "a/b", True), ("a/+", "a/b", True), ("a/+", "a/b/c", False), ("a/#", "a", True),
    ("a/#", "a/b/c", True), ("+/+/status", "x/y/status", True), ("a/b", "a/c", False),
    ("vllm_deploy/template/+", "vllm_deploy/+/status", True), ("maze/user_input", "maze/+/x", False),
    ("$share/g/maze/user_input", "vllm_deploy/+/status", False),
])
def test_filters_overlap(a: str, b: str, overlap: bool) -> None:
    assert filters_overlap(a, b) is overlap and filters_overlap(b, a) is overlap


def subscriptions(topics: Topics, legacy: bool = False) -> list[str]:
    return [t for t, _ in topics.all_subscriptions(legacy=legacy)]


def test_service_topics_are_confined() -> None:
    topics = Topics(["maze", "driving"], "site/")
    assert service_topics("vllm_deploy/", "box-1") == ("vllm_deploy/box-1/status",
                                                       "vllm_deploy/box-1/metrics")
    check_service_topics(topics, "vllm_deploy", "box-1", subscriptions(topics, legacy=True))
    check_service_topics(topics, "site/ops", "box-1", subscriptions(topics))
    bad = [  # (topics, prefix, agent id, what the error says)
        (Topics(["vllm_deploy"]), "vllm_deploy", "box", "would catch status topics"),
        (topics, "site/maze", "template", "request or control topic"),
        (topics, "site/maze/assistant_response", "x", "reply topic"),
        (topics, "site/maze/hint", "x", "reply topic"),
        (topics, "vllm_deploy", "a/b", "one topic level"),
        (topics, "vllm/+", "a", "must not contain"),
    ]
    for t, prefix, agent_id, says in bad:
        with pytest.raises(ValueError, match=says):
            check_service_topics(t, prefix, agent_id, subscriptions(t))


def test_default_agent_id_is_one_topic_level(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("socket.gethostname", lambda: "lab box/#1+x.local")
    assert default_agent_id() == "lab-box-1-x.local"
    monkeypatch.setattr("socket.gethostname", lambda: "///")
    assert default_agent_id() == "agent"


def test_config_checks() -> None:
    for bad in ({"stats_interval": -1}, {"metrics_port": 70000}, {"agent_id": "a/b"},
                {"agent_id": ""}, {"status_prefix": "#"}, {"status_prefix": "/"}):
        with pytest.raises(ValueError):
            check_agent_config(AgentConfig(**bad))  # type: ignore[arg-type]


def test_status_payload_and_one_version() -> None:
    sent: list[tuple[str, str, bool]] = []
    reporter = StatusReporter("box", "vllm_deploy", AgentInfo("Qwen/QwQ-32B", "none"),
                              ["maze"], lambda *a: sent.append(a), lambda: True, dict, 0)
    topic, will = reporter.will()
    assert topic == "vllm_deploy/box/status"
    assert json.loads(will) == {"state": OFFLINE, "agentId": "box", "model": "Qwen/QwQ-32B",
                                "quantization": "none", "projects": ["maze"],
                                "startedAt": json.loads(will)["startedAt"],
                                "instance": reporter.instance, "version": agent.__version__}
    reporter.online()
    reporter.offline()
    reporter.online()  # a reconnect racing a clean stop does not say online again
    assert [(json.loads(p)["state"], r) for _, p, r in sent] == [("online", True), ("offline", True)]
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    pyproject = tomllib.loads(Path("pyproject.toml").read_text())
    assert pyproject["project"]["dynamic"] == ["version"]
    assert pyproject["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "agent.__version__"}


def test_router_hooks_count_every_outcome() -> None:
    config = AgentConfig(projects=("maze",), max_requests_per_session=1, max_queue=2)
    engine, replies = FakeEngine(delay=0.3), Replies()
    specs = {"maze": ProjectSpec("maze", "p")}
    router = ChatRig(config, engine, specs, Topics(config.projects), replies)
    router.start()
    try:
        send(router, sessionId="a", message="one")
        send(router, sessionId="a", message="two")  # rate-limited
        send(router, sessionId="b", message="one")
        send(router, sessionId="c", message="one")  # the queue (2) is full: overloaded
        send(router, sessionId="d", message="  ")  # bad request
        router.handle_message("maze/user_input", b'{"message": "x", "replyTopic": "elsewhere", '
                              b'"sessionId": "e", "topP": 5}')  # bad, on the default topic
        replies.wait(6)
        counts = router.metrics.counts()["maze"]
        assert counts == {"ok": 2, "error": 0, "bad_request": 2, "rate_limited": 1,
                          "overloaded": 1, "shutting_down": 0}
        assert len(router.metrics.latencies()) == 2 and min(router.metrics.latencies()) >= 0.25
    finally:
        router.stop()


def test_missing_prometheus_client_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "prometheus_client", None)  # import fails
    with pytest.raises(ValueError, match="pip install prometheus-client"):
        require_prometheus()
    engine = FakeEngine()
    built = Agent(AgentConfig(projects=("general",), metrics_port=0), engine)
    with pytest.raises(ValueError) as err:
        built.start()
    assert str(err.value) == PIP_HINT and engine.shut_down


def test_prometheus_collector() -> None:
    pytest.importorskip("prometheus_client")
    from prometheus_client import CollectorRegistry, generate_latest

    m = RequestMetrics()
    m.answered("maze", True, 0.2, door="mqtt")
    m.rejected("maze", "rate_limited", door="mqtt")
    registry = CollectorRegistry(auto_describe=False)
    rules = {"driving": {"regenerated": 1, "repaired": 0}}
    registry.register(AgentCollector(m, lambda: summary(m, 3, ENGINE, rules),  # type: ignore[arg-type]
                                     {"agent_id": "box", "version": "1"}))
    text = generate_latest(registry).decode()
    for line in ('vllm_deploy_requests_total{outcome="ok",project="maze"} 1.0',
                 'vllm_deploy_requests_total{outcome="rate_limited",project="maze"} 1.0',
                 'vllm_deploy_latency_seconds_bucket{le="0.25"} 1.0',
                 'vllm_deploy_latency_seconds_count 1.0', "vllm_deploy_queue_size 3.0",
                 'vllm_deploy_kv_blocks_used{project="maze"} 30.0', "vllm_deploy_kv_blocks_free 70.0",
                 "vllm_deploy_tokens_per_second 12.35", 'vllm_deploy_info{agent_id="box",version="1"} 1.0',
                 'vllm_deploy_output_rules_total{event="regenerated",project="driving"} 1.0'):
        assert line in text, line
