"""PROTOCOL.md part C against a real Mosquitto: streaming, the JSON envelope, ``command: reset``,
``includeReasoning``, MQTT v5 Response Topic + Correlation Data; old clients unaffected."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import replace

import paho.mqtt.client as mqtt
import pytest
import torch
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from agent.core.outcome import OVERLOADED
from agent.core.rate_limit import RATE_LIMITED
from agent.service.app import Agent
from agent.service.config import AgentConfig
from engine import create_engine
from engine.api import EngineConfig
from projects import load_project
from tests.ack_counter import every_request_acked  # noqa: F401 (a fixture)
from tests.agent_maker import started_agents
from tests.checkpoints import tiny_checkpoint
from tests.fake_engine import FakeEngine
from tests.mqtt_broker import Broker, mosquitto_available
from tests.old_client import OldClient

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(not mosquitto_available(), reason="mosquitto is not installed"),
    pytest.mark.usefixtures("every_request_acked"),
]
PROTOCOLS = ["3.1.1", "5"]
PROJECTS = {p: replace(load_project(p), output_rules=None) for p in ("maze", "driving")}


class V5Client(OldClient):
    """An MQTT 5 client that sets Response Topic / Correlation Data and keeps what it got."""

    def __init__(self, broker: Broker) -> None:
        self.properties: list[tuple[str, Properties | None]] = []
        super().__init__(broker, protocol="5")

    def _on_message(self, client: mqtt.Client, userdata: object, message: mqtt.MQTTMessage) -> None:
        with self._cond:
            self.properties.append((message.topic, message.properties))
        super()._on_message(client, userdata, message)

    def publish_v5(self, payload: dict, response_topic: str | None, correlation: bytes) -> None:
        props = Properties(PacketTypes.PUBLISH)
        if response_topic is not None:
            props.ResponseTopic = response_topic
        props.CorrelationData = correlation
        self._client.publish("maze/user_input", json.dumps(payload), qos=1,
                             properties=props).wait_for_publish(5)

    def correlations(self, topic: str) -> list[bytes | None]:
        with self._cond:
            return [getattr(p, "CorrelationData", None) for t, p in self.properties if t == topic]


MakeAgent = Callable[..., Agent]


@pytest.fixture
def make_agent(broker: Broker) -> Iterator[MakeAgent]:
    with started_agents(broker, specs=PROJECTS, projects=("maze", "driving")) as make:
        yield lambda protocol, engine=None, **overrides: make(
            engine, mqtt_protocol=protocol, **overrides)


@pytest.fixture
def clients(broker: Broker) -> Iterator[Callable[[str], OldClient]]:
    made: list[OldClient] = []

    def make(protocol: str) -> OldClient:
        made.append(V5Client(broker) if protocol == "5" else OldClient(broker, protocol=protocol))
        return made[-1]

    yield make
    for c in made:
        c.close()


def stream_of(client: OldClient, topic: str, timeout: float = 5.0) -> list[dict]:
    """The stream messages on ``topic`` once the one with ``done`` came."""
    deadline = time.monotonic() + timeout
    while True:
        messages = [json.loads(p) for _, p in client.messages(topic)]
        if any(m["done"] for m in messages):
            return messages
        assert time.monotonic() < deadline, f"no done message on {topic}: {messages}"
        time.sleep(0.01)


@pytest.mark.parametrize("agent_protocol, client_protocol",
                         [("3.1.1", "3.1.1"), ("3.1.1", "5"), ("5", "3.1.1"), ("5", "5")])
def test_stream(make_agent: MakeAgent, clients: Callable[[str], OldClient],
                agent_protocol: str, client_protocol: str) -> None:
    engine = FakeEngine()
    engine.think = "closed"  # the reasoning is not streamed
    make_agent(agent_protocol, engine)
    client = clients(client_protocol)
    topic = f"maze/assistant_response/st/{client.client_id}"
    client.subscribe(topic + "/stream")
    message = "stream this reply, héllo wörld"
    assert client.ask("maze", "st", message, stream=True, requestId="r1") == f"echo: {message}"
    stream = stream_of(client, topic + "/stream")
    assert [m["seq"] for m in stream] == list(range(len(stream))) and len(stream) > 5
    assert [m["done"] for m in stream].count(True) == 1 and stream[-1]["done"]
    assert "".join(m["delta"] for m in stream) == f"echo: {message}"
    assert {m["requestId"] for m in stream} == {"r1"}


@pytest.mark.parametrize("agent_protocol", PROTOCOLS)
def test_old_clients_unaffected(make_agent: MakeAgent, clients: Callable[[str], OldClient],
                                agent_protocol: str) -> None:
    make_agent(agent_protocol)
    client = clients("3.1.1")
    client.subscribe("maze/assistant_response/#")
    assert client.ask("maze", "old", "plain as before", subscribe=False) == "echo: plain as before"
    time.sleep(0.1)
    assert client.messages(prefix="maze/") == [
        (f"maze/assistant_response/old/{client.client_id}", "echo: plain as before")]


@pytest.mark.parametrize("agent_protocol", PROTOCOLS)
def test_envelope_and_error_codes(make_agent: MakeAgent, clients: Callable[[str], OldClient],
                                  agent_protocol: str) -> None:
    engine = FakeEngine()
    make_agent(agent_protocol, engine, max_requests_per_session=2, max_queue=1)
    client = clients("5" if agent_protocol == "3.1.1" else "3.1.1")
    env = json.loads(client.ask("maze", "e", "hi", responseFormat="json", requestId="r1"))
    assert env["text"] == "echo: hi" and env["finishReason"] == "stop" and "error" not in env
    assert (env["requestId"], env["sessionId"], env["project"]) == ("r1", "e", "maze")
    assert env["clientId"] == client.client_id and env["usage"]["promptTokens"] > 0
    assert set(env["timings"]) == {"queueMs", "ttftMs", "totalMs"}

    def error(session: str, message: object, **fields: object) -> dict:
        reply = json.loads(client.ask("maze", session, message, responseFormat="json", **fields))
        assert reply["text"] == "" and reply["sessionId"] == session
        return reply["error"]

    assert client.ask("maze", "e", "again") == "echo: again"  # the 2nd turn of "e": the limit
    assert error("e", "x") == {"code": "rate_limited", "message": RATE_LIMITED}
    assert error("b", "hi", topP=7)["code"] == "bad_request"
    assert error("l", "word " * 3000)["code"] == "too_long"
    engine.fail = "out of memory"
    assert error("f", "hi") == {"code": "internal", "message": "Error: out of memory"}
    engine.fail, engine.delay = None, 0.5
    client.request("maze", "o1", "slow", responseFormat="json")
    # QoS 0: a QoS 1 request would wait for room (backpressure, tests/test_backpressure.py)
    assert error("o2", "hi", qos=0) == {"code": "overloaded", "message": OVERLOADED}


@pytest.mark.parametrize("agent_protocol", PROTOCOLS)
def test_reset_and_include_reasoning(make_agent: MakeAgent, clients: Callable[[str], OldClient],
                                     agent_protocol: str) -> None:
    engine = FakeEngine()
    make_agent(agent_protocol, engine)
    client = clients("3.1.1")
    client.ask("maze", "r", "remember me", systemPrompt="Custom prompt.")
    topic = client.request("maze", "r", None, command="reset")
    client.request("maze", "r", "who am I?", subscribe=False)
    assert client.wait(topic, 3)[1:] == ["OK: session reset", "echo: who am I?"]
    assert engine.user_turns() == ["who am I?"] and "Custom prompt." not in engine.prompts[-1]
    env = json.loads(client.ask("maze", "r", None, command="reset", responseFormat="json"))
    assert env["text"] == "OK: session reset" and "error" not in env
    engine.think = "closed"
    env = json.loads(client.ask("maze", "r", "q", responseFormat="json", includeReasoning=True))
    assert env["text"] == "echo: q" and env["reasoning"] == "Let me think about it."


@pytest.mark.parametrize("agent_protocol", PROTOCOLS)
def test_v5_response_topic_and_correlation_data(
    make_agent: MakeAgent, broker: Broker, agent_protocol: str
) -> None:
    make_agent(agent_protocol)
    client = V5Client(broker)
    try:
        client.subscribe("maze/assistant_response/#")
        target = "maze/assistant_response/v5/answers"
        payload = {"sessionId": "v5", "message": "hi", "stream": True,
                   "replyTopic": "maze/assistant_response/v5/rt"}
        client.publish_v5(payload, target, b"\x01corr")
        client.publish_v5({"sessionId": "v5", "message": 3}, "maze/user_input", b"\x02bad")
        if agent_protocol == "3.1.1":  # the broker gives a 3.1.1 agent no properties
            assert client.wait("maze/assistant_response/v5/rt") == ["echo: hi"]
            client.wait("maze/assistant_response/v5")
            assert client.correlations("maze/assistant_response/v5/rt") == [None]
            return
        assert client.wait(target) == ["echo: hi"]
        assert client.correlations(target) == [b"\x01corr"]  # Response Topic beats replyTopic
        stream = stream_of(client, target + "/stream")
        assert "".join(m["delta"] for m in stream) == "echo: hi"
        assert set(client.correlations(target + "/stream")) == {b"\x01corr"}
        # a disallowed Response Topic is ignored: the default topic, still with the correlation
        assert client.wait("maze/assistant_response/v5")[0].startswith("Error: message must be")
        assert client.correlations("maze/assistant_response/v5") == [b"\x02bad"]
        assert not client.messages("maze/assistant_response/v5/rt")
    finally:
        client.close()


def test_stream_and_replies_under_load(make_agent: MakeAgent,
                                       clients: Callable[[str], OldClient]) -> None:
    """Several streaming sessions at once: each stream is whole and ordered."""
    agent = make_agent("5", FakeEngine(delay=0.02))
    client = clients("3.1.1")
    client.subscribe("driving/assistant_response/#")
    threads = [threading.Thread(target=client.request,
                                args=("driving", f"s{i}", f"message {i} " * 5),
                                kwargs={"subscribe": False, "stream": True}) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i in range(8):
        topic = f"driving/assistant_response/s{i}/{client.client_id}"
        assert client.wait(topic) == [f"echo: {(f'message {i} ' * 5).strip()}"]
        stream = stream_of(client, topic + "/stream")
        assert "".join(m["delta"] for m in stream) == f"echo: {(f'message {i} ' * 5).strip()}"
        assert [m["seq"] for m in stream] == list(range(len(stream)))
    # QoS 0 stream messages are not waited for at shutdown, and leave the count of replies alone
    with agent.mqtt._acks:
        assert agent.mqtt._acks.wait_for(lambda: agent.mqtt._unacked == 0, 2.0)
        assert not agent.mqtt._qos0_mids


def test_stream_and_envelope_with_the_real_engine(broker: Broker,
                                                  clients: Callable[[str], OldClient]) -> None:
    """Our engine's detokenized deltas: joined, they are the reply; its usage and timings."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    engine = create_engine(EngineConfig(model_path=str(tiny_checkpoint("llama")), device="cpu",
                                        dtype="float32", max_model_len=512))
    config = AgentConfig(projects=("maze",), mqtt_broker=broker.host, mqtt_port=broker.port,
                         connect_timeout=5.0, temperature=0, max_tokens=24)
    try:
        with Agent(config, engine, {"maze": PROJECTS["maze"]}):
            client = clients("5")
            topic = f"maze/assistant_response/real/{client.client_id}"
            client.subscribe(topic + "/stream")
            env = json.loads(client.ask("maze", "real", "hello", stream=True, responseFormat="json",
                                        timeout=30))
            stream = stream_of(client, topic + "/stream")
    finally:
        torch.set_num_threads(threads)
    assert env["text"] and "".join(m["delta"] for m in stream).strip() == env["text"]
    assert [m["seq"] for m in stream] == list(range(len(stream))) and len(stream) > 2
    assert env["usage"]["completionTokens"] > 0 and env["usage"]["promptTokens"] > 0
    assert 0 < env["timings"]["ttftMs"] <= env["timings"]["totalMs"]
