"""The agent against a real Mosquitto (started here), with clients written like the old ones."""

from __future__ import annotations

import json
import logging
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import replace

import pytest

from agent.core.outcome import SHUTTING_DOWN
from agent.core.rate_limit import RATE_LIMITED
from agent.service.app import Agent, MqttConnectError
from agent.service.config import AgentConfig
from projects import ProjectSpec, load_project
from tests.ack_counter import every_request_acked  # noqa: F401 (a fixture)
from tests.fake_engine import FakeEngine
from tests.mqtt_broker import MOSQUITTO_PASSWD, Broker, free_port, mosquitto_available, start_broker
from tests.old_client import OldClient

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(not mosquitto_available(), reason="mosquitto is not installed"),
    pytest.mark.usefixtures("every_request_acked"),
]
PROTOCOLS = ["3.1.1", "5"]
# Part A is about the chat protocol, with echo replies: without the projects' output rules
# (driving's state tags), which tests/test_game_topics.py covers.
PLAIN_PROJECTS = {p: replace(load_project(p), output_rules=None) for p in ("maze", "driving")}


@pytest.fixture(params=PROTOCOLS, ids=lambda p: f"agent-mqtt{p}")
def agent_protocol(request: pytest.FixtureRequest) -> str:
    return request.param


MakeAgent = Callable[..., Agent]


@pytest.fixture
def make_agent(broker: Broker, agent_protocol: str) -> Iterator[MakeAgent]:
    agents: list[Agent] = []

    def make(engine: FakeEngine | None = None, on: Broker | None = None, start: bool = True,
             projects: dict[str, ProjectSpec] | None = None, **overrides: object) -> Agent:
        target = on or broker
        settings: dict = {
            "projects": ("maze", "driving"), "mqtt_broker": target.host, "mqtt_port": target.port,
            "mqtt_protocol": agent_protocol, "connect_timeout": 5.0, "reconnect_max_delay": 0.5,
            **overrides,
        }
        agent = Agent(AgentConfig(**settings), engine or FakeEngine(), projects or PLAIN_PROJECTS)
        agents.append(agent)
        if start:
            agent.start()
        return agent

    yield make
    for agent in agents:
        agent.stop()


@pytest.fixture
def client(broker: Broker, agent_protocol: str) -> Iterator[OldClient]:
    # the other protocol than the agent's: every pair of versions meets somewhere
    client = OldClient(broker, protocol="5" if agent_protocol == "3.1.1" else "3.1.1")
    yield client
    client.close()


def wait_for(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.01)


def assert_still_serving(client: OldClient, project: str = "driving") -> None:
    session = f"healthy-{time.monotonic_ns()}"
    assert client.ask(project, session, "still there?") == "echo: still there?"


@pytest.mark.parametrize("client_protocol", PROTOCOLS)
def test_old_client_flow(make_agent: MakeAgent, broker: Broker, client_protocol: str) -> None:
    make_agent()
    client = OldClient(broker, protocol=client_protocol)
    try:
        assert client.ask("maze", "s1", "hello agent") == "echo: hello agent"
        reply_topic = client.request("maze", "s1", "again", requestId="r-1")
        assert reply_topic == f"maze/assistant_response/s1/{client.client_id}"
        assert client.wait(reply_topic, 2) == ["echo: hello agent", "echo: again"]
    finally:
        client.close()


def test_default_reply_topic(make_agent: MakeAgent, client: OldClient) -> None:
    make_agent()
    client.subscribe("maze/assistant_response/s2")
    client.publish("maze/user_input", json.dumps({"sessionId": "s2", "message": "plain"}))
    assert client.wait("maze/assistant_response/s2") == ["echo: plain"]


def test_raw_payload(make_agent: MakeAgent, client: OldClient) -> None:
    make_agent()
    client.subscribe("maze/assistant_response/#")
    client.publish("maze/user_input", b"just some text, not JSON")
    (topic, reply), = client.wait_prefix("maze/assistant_response/")
    assert topic.startswith("maze/assistant_response/default-") and len(topic.split("/")[-1]) == 16
    assert reply == "echo: just some text, not JSON"


def test_projects_and_sessions_at_once(make_agent: MakeAgent, client: OldClient) -> None:
    make_agent(FakeEngine(delay=0.1))
    client.subscribe("+/assistant_response/#")
    expected = {}
    for project in ("maze", "driving"):
        for i in range(4):
            topic = client.request(project, f"{project}-s{i}", f"{project} {i}", subscribe=False)
            expected[topic] = [f"echo: {project} {i}"]
    client.wait_prefix("", n=len(expected))
    time.sleep(0.1)
    got: dict[str, list[str]] = {}
    for topic, payload in client.messages():
        got.setdefault(topic, []).append(payload)
    assert got == expected  # each its own reply, and only that


def test_second_turn_sees_the_first(make_agent: MakeAgent, client: OldClient) -> None:
    engine = FakeEngine()
    make_agent(engine)
    client.ask("maze", "h", "my name is Ada")
    client.ask("maze", "h", "what is my name?")
    assert engine.user_turns() == ["my name is Ada", "what is my name?"]
    assert "<|im_start|>assistant\necho: my name is Ada<|im_end|>" in engine.prompts[-1]


def test_trimming_keeps_prompt_under_limit(make_agent: MakeAgent, client: OldClient) -> None:
    engine = FakeEngine()
    make_agent(engine, projects={"maze": ProjectSpec("maze", "Be brief.")}, max_history_tokens=150)
    for i in range(6):
        message = f"turn {i}: " + "word " * 8
        assert client.ask("maze", "t", message) == f"echo: {message.strip()}"
    assert len(engine.requests) == 6
    assert all(len(r.prompt_token_ids) <= 150 for r in engine.requests)
    turns = engine.user_turns()
    assert turns[-1].startswith("turn 5") and not turns[0].startswith("turn 0")


def test_turns_in_order(make_agent: MakeAgent, client: OldClient) -> None:
    engine = FakeEngine(delay=0.05)
    make_agent(engine)
    topic = "maze/assistant_response/o"
    client.subscribe(topic)
    for i in range(5):
        client.publish("maze/user_input", json.dumps({"sessionId": "o", "message": f"m{i}"}))
    assert client.wait(topic, 5) == [f"echo: m{i}" for i in range(5)]
    assert engine.user_turns() == [f"m{i}" for i in range(5)]


def test_duplicate_request_id_generated_once_and_its_reply_sent_again(
    make_agent: MakeAgent, client: OldClient,
) -> None:
    engine = FakeEngine()
    make_agent(engine)
    topic = client.request("maze", "d", "once", requestId="req-7")
    assert client.wait(topic) == ["echo: once"]
    client.request("maze", "d", "once", requestId="req-7")
    assert client.wait(topic, 2) == ["echo: once", "echo: once"]
    assert_still_serving(client)
    assert len(client.messages(topic)) == 2 and len(engine.requests) == 2


def test_invalid_utf8(make_agent: MakeAgent, client: OldClient) -> None:
    make_agent()
    topic = f"maze/assistant_response/u/{client.client_id}"
    client.subscribe(topic)
    client.subscribe("maze/assistant_response/#")
    payload = b'{"sessionId": "u", "message": "caf\xe9", "replyTopic": "' + topic.encode() + b'"}'
    client.publish("maze/user_input", payload)
    assert client.wait(topic)[0].startswith("Error: ")
    client.publish("maze/user_input", b"\xc3\x28 raw bytes")
    raw = client.wait_prefix("maze/assistant_response/default-")
    assert raw[0][1] == "echo: \ufffd( raw bytes"
    assert_still_serving(client)


def test_json_that_is_not_an_object(make_agent: MakeAgent, client: OldClient) -> None:
    make_agent()
    client.subscribe("maze/assistant_response/#")
    client.publish("maze/user_input", b"42")
    assert client.wait_prefix("maze/assistant_response/default-")[0][1] == "echo: 42"
    assert_still_serving(client)


@pytest.mark.parametrize("fields, expected", [
    ({"message": ""}, "Error: empty message"),
    ({"message": "hi", "temperature": "hot"}, "temperature"),
    ({"message": "hi", "maxTokens": -3}, "maxTokens"),
    ({"message": " ", "images": ["aGk="]},
     "Error: this model does not accept images, and the message has no text"),
], ids=["empty", "temperature-hot", "maxTokens-negative", "images-without-text"])
def test_bad_fields(make_agent: MakeAgent, client: OldClient, fields: dict, expected: str) -> None:
    make_agent()
    fields = dict(fields)
    message = fields.pop("message")
    reply = client.ask("maze", "bad", message, **fields)
    assert reply.startswith("Error: ") and expected in reply
    assert_still_serving(client)


@pytest.mark.parametrize("reply_topic", ["maze/assistant_response/r/#", "driving/assistant_response/r"])
def test_disallowed_reply_topic(make_agent: MakeAgent, client: OldClient, reply_topic: str) -> None:
    make_agent()
    client.subscribe("+/assistant_response/#")
    client.publish("maze/user_input", json.dumps(
        {"sessionId": "r", "message": "where?", "replyTopic": reply_topic}))
    assert client.wait("maze/assistant_response/r") == ["echo: where?"]
    time.sleep(0.1)
    assert [t for t, _ in client.messages()] == ["maze/assistant_response/r"]


def test_ten_megabyte_payload(make_agent: MakeAgent, client: OldClient) -> None:
    make_agent()
    reply = client.ask("maze", "big", "x" * 10_000_000)
    assert reply.startswith("Error: ") and "too large" in reply
    assert_still_serving(client)


def test_flood_over_rate_limit(make_agent: MakeAgent, client: OldClient) -> None:
    make_agent(max_requests_per_session=5)
    topic = "maze/assistant_response/flood"
    client.subscribe(topic)
    for i in range(12):
        client.publish("maze/user_input", json.dumps({"sessionId": "flood", "message": f"f{i}"}))
    replies = client.wait(topic, 12)
    assert replies.count(RATE_LIMITED) == 7
    assert [r for r in replies if r != RATE_LIMITED] == [f"echo: f{i}" for i in range(5)]
    assert_still_serving(client, "maze")


def test_topic_prefix(make_agent: MakeAgent, client: OldClient) -> None:
    make_agent(topic_prefix="clinic1/")
    assert client.ask("clinic1/maze", "p", "prefixed") == "echo: prefixed"


def test_logs_keep_prompts_and_replies_out_of_info(
    make_agent: MakeAgent, client: OldClient, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)  # the per-request lines are DEBUG: all the more so at INFO
    make_agent()
    client.ask("maze", "log", "SECRET-PROMPT-XYZ")
    wait_for(lambda: "answered" in caplog.text)  # logged just after the reply went out
    assert "SECRET-PROMPT-XYZ" not in caplog.text


def test_stop_answers_pending(make_agent: MakeAgent, client: OldClient) -> None:
    agent = make_agent(FakeEngine(delay=30))
    topic = client.request("maze", "bye", "slow question")
    wait_for(lambda: len(agent.engine.requests) == 1)  # type: ignore[attr-defined]
    agent.stop()  # generating: it gets the error (one not started is left to the broker)
    assert client.wait(topic) == [SHUTTING_DOWN]
    assert agent.engine.shut_down  # type: ignore[attr-defined]


def test_broker_down_at_start_is_retried(make_agent: MakeAgent) -> None:
    port = free_port()
    agent = make_agent(start=False, mqtt_port=port)
    agent.start(wait=False)
    time.sleep(0.3)  # a few refused attempts
    late = start_broker(port=port)
    late_client = OldClient(late)
    try:
        wait_for(lambda: agent.ready)
        assert late_client.ask("maze", "late", "you came up") == "echo: you came up"
        late_client.close()
        late.restart()  # the agent reconnects and subscribes again
        wait_for(lambda: not agent.ready)
        wait_for(lambda: agent.ready)
        late_client = OldClient(late)
        assert late_client.ask("maze", "late", "again") == "echo: again"
    finally:
        late_client.close()
        agent.stop()
        late.stop()


def test_start_times_out_with_a_clear_error(make_agent: MakeAgent) -> None:
    agent = make_agent(start=False, mqtt_port=free_port(), connect_timeout=0.5)
    started = time.monotonic()
    with pytest.raises(MqttConnectError, match="not connected within 0.5 s"):
        agent.start()
    assert time.monotonic() - started < 3


@pytest.mark.skipif(not MOSQUITTO_PASSWD, reason="mosquitto_passwd is not installed")
def test_password(make_agent: MakeAgent, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    secured = start_broker(users={"agent": "agent-pw-123", "user": "user-pw"})
    try:
        make_agent(on=secured, mqtt_username="agent", mqtt_password="agent-pw-123")
        client = OldClient(secured, username="user", password="user-pw")
        try:
            assert client.ask("maze", "pw", "hi") == "echo: hi"
        finally:
            client.close()
        with pytest.raises(MqttConnectError, match="refused"):
            make_agent(on=secured, mqtt_username="agent", mqtt_password="wrong-pw-456")
        refused = make_agent(on=secured, start=False, mqtt_username="agent",
                             mqtt_password="wrong-pw-456")
        with pytest.raises(MqttConnectError, match="refused"):
            refused.run_forever()  # fatal, unlike a broker that is down
        assert "agent-pw-123" not in caplog.text and "wrong-pw-456" not in caplog.text
    finally:
        secured.stop()


def test_named_agent_serves_requests_sent_while_down(make_agent: MakeAgent, client: OldClient) -> None:
    name = f"agent-{time.monotonic_ns()}"
    first = make_agent(client_id=name)
    assert client.ask("maze", "q", "before") == "echo: before"
    first.stop()
    topic = client.request("maze", "q", "while you were down")
    time.sleep(0.1)
    assert client.messages(topic) == [(topic, "echo: before")]
    make_agent(client_id=name)  # the broker kept the session and its queued request
    assert client.wait(topic, 2)[-1] == "echo: while you were down"


def test_retained_request_is_not_served_again(make_agent: MakeAgent, client: OldClient) -> None:
    engine = FakeEngine()
    make_agent(engine)
    topic = "maze/assistant_response/ret"
    client.subscribe(topic)
    payload = json.dumps({"sessionId": "ret", "message": "sticky"})
    client.publish("maze/user_input", payload, retain=True)
    try:
        assert client.wait(topic) == ["echo: sticky"]
        make_agent(engine)  # a new subscriber gets the retained copy: it must not answer it
        assert_still_serving(client)
        assert client.wait(topic) == ["echo: sticky"]
    finally:
        client.publish("maze/user_input", b"", retain=True)  # clears the retained message


def test_run_forever_until_sigterm(make_agent: MakeAgent, client: OldClient) -> None:
    agent = make_agent(start=False)

    def ask_then_terminate() -> None:
        wait_for(lambda: agent.ready)
        answers.append(client.ask("maze", "rf", "are you running?"))
        os.kill(os.getpid(), signal.SIGTERM)  # run_forever's handler is in place once ready

    answers: list[str] = []
    helper = threading.Thread(target=ask_then_terminate)
    before = signal.getsignal(signal.SIGTERM)
    helper.start()
    agent.run_forever()
    helper.join(5)
    assert answers == ["echo: are you running?"]
    assert signal.getsignal(signal.SIGTERM) is before
    assert agent.engine.shut_down  # type: ignore[attr-defined]
