"""Backpressure and limits through a real broker: the bounded queue, the per-session rate limit,
the payload size and the prompt's token budget each answer a request, never drop it."""

from __future__ import annotations

import json
import time
from collections import Counter

import pytest

from agent.core.outcome import OVERLOADED
from agent.core.rate_limit import RATE_LIMITED
from agent.service.app import Agent
from agent.service.config import AgentConfig
from tests.ack_counter import every_request_acked  # noqa: F401 (a fixture)
from tests.fake_engine import FakeEngine
from tests.mqtt_broker import Broker, mosquitto_available
from tests.old_client import OldClient

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(not mosquitto_available(), reason="mosquitto is not installed"),
    pytest.mark.usefixtures("every_request_acked"),
]
ROOT = "general/assistant_response/"


def _agent(broker: Broker, engine: FakeEngine, **overrides: object) -> Agent:
    settings: dict = {"projects": ("general",), "mqtt_broker": broker.host,
                      "mqtt_port": broker.port, "connect_timeout": 5.0, **overrides}
    return Agent(AgentConfig(**settings), engine)


def _collect(client: OldClient, n: int, timeout: float = 15.0) -> list[tuple[str, str]]:
    """Waits for ``n`` replies under ROOT, then a moment longer to catch any extra."""
    deadline = time.monotonic() + timeout
    while len(client.messages(prefix=ROOT)) < n and time.monotonic() < deadline:
        time.sleep(0.02)
    time.sleep(0.3)
    return client.messages(prefix=ROOT)


@pytest.mark.parametrize("qos", [0, 1])
def test_burst_over_the_queue_gets_one_reply_each(broker: Broker, client: OldClient,
                                                  qos: int) -> None:
    """QoS 0: what finds the queue full gets the overload reply. QoS 1: the agent reads the
    next request once there is room (the broker holds the rest): every one is answered."""
    client.subscribe(ROOT + "#")
    with _agent(broker, FakeEngine(delay=0.3), max_queue=6):
        sent = 40
        for i in range(sent):
            client.publish("general/user_input",
                           json.dumps({"sessionId": f"b{i}", "message": f"q{i}"}), qos=qos)
        replies = _collect(client, sent)
    per_topic = Counter(t for t, _ in replies)
    assert sorted(per_topic) == sorted(ROOT + f"b{i}" for i in range(sent))
    assert set(per_topic.values()) == {1}  # exactly one reply per request
    kinds = Counter("overloaded" if p == OVERLOADED else "echo" for _, p in replies)
    if qos == 0:
        assert kinds["overloaded"] > 0 and kinds["echo"] >= 6
    else:
        assert kinds == Counter(echo=sent)
    for topic, payload in replies:
        assert payload in (OVERLOADED, f"echo: q{topic.removeprefix(ROOT + 'b')}")


def test_every_limit_answers(broker: Broker, client: OldClient) -> None:
    client.subscribe(ROOT + "#")
    engine = FakeEngine()
    with _agent(broker, engine, max_requests_per_session=2, max_payload_bytes=20_000,
                max_history_tokens=200):
        for i in range(4):  # rate limit: two served, two refused
            client.publish("general/user_input", json.dumps(
                {"sessionId": "rl", "message": f"r{i}", "replyTopic": ROOT + f"rl/{i}"}))
        too_large = {"sessionId": "big", "message": "x" * 30_000}
        client.publish("general/user_input", json.dumps(too_large))
        # under the payload limit, over the token budget: one message alone does not fit
        too_long = {"sessionId": "long", "message": "hello world " * 1000}
        client.publish("general/user_input", json.dumps(too_long))
        replies = dict(_collect(client, 6))
        assert len(client.messages(prefix=ROOT)) == 6
    assert [replies[ROOT + f"rl/{i}"] for i in range(4)] == ["echo: r0", "echo: r1",
                                                             RATE_LIMITED, RATE_LIMITED]
    assert replies[ROOT + "big"].startswith("Error: the request is too large")
    assert replies[ROOT + "long"].startswith("Error: the message is too long")
    assert len(engine.requests) == 2  # the refused ones never reached the engine
