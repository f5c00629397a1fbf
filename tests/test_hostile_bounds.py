"""What a hostile client can take (issue 15, items 5, 7 and 8): memory for the strings it
chooses, every new session of a project with one huge template, and the rate limit by
rotating session ids."""

from __future__ import annotations

import json
import tracemalloc
from collections.abc import Iterator

import pytest

from agent.core.rate_limit import RATE_LIMITED
from agent.mqtt.protocol import MAX_ID_CHARS
from agent.mqtt.topics import Topics
from agent.service.app import Agent
from agent.service.config import AgentConfig
from tests.chat_rig import ChatRig
from tests.fake_engine import FakeEngine
from tests.mqtt_broker import Broker, mosquitto_available
from tests.old_client import OldClient
from tests.test_router import PROJECTS, Replies


@pytest.fixture
def rig() -> Iterator[tuple[ChatRig, Replies]]:
    made: list[ChatRig] = []

    def make(**overrides: object) -> tuple[ChatRig, Replies]:
        config = AgentConfig(projects=("maze", "general"), **overrides)  # type: ignore[arg-type]
        replies = Replies()
        router = ChatRig(config, FakeEngine(), PROJECTS, Topics(config.projects), replies)
        router.start()
        made.append(router)
        return router, replies

    yield make  # type: ignore[misc]
    for router in made:
        router.stop()


def send(router: ChatRig, **fields: object) -> None:
    router.handle_message("general/user_input", json.dumps(fields).encode())


def test_huge_ids_are_refused_and_nothing_of_them_is_kept(rig) -> None:
    """Item 5: 0.99 MB requestIds (rate limited, or answered) were kept for 600 s: 571 MB
    for 600 of them. Now an id over 256 characters is refused, and what is kept stays
    small whatever the ids."""
    router, replies = rig(max_requests_per_session=1, max_requests_per_client=10_000)
    huge = "x" * 990_000
    send(router, sessionId="s", message="hi", requestId=huge)
    assert replies.wait(1)[0][1] == f"Error: requestId is longer than {MAX_ID_CHARS} characters"
    tracemalloc.start()
    try:
        before = tracemalloc.take_snapshot()
        for i in range(60):
            send(router, sessionId=f"s{i % 3}", message="hi", requestId=f"{i}" + huge,
                 clientId=huge)
            send(router, sessionId=f"s{i % 3}", message="hi", requestId=f"ok-{i}")  # answered
        replies.wait(121)
        after = tracemalloc.take_snapshot()
    finally:
        tracemalloc.stop()
    kept = sum(s.size_diff for s in after.compare_to(before, "filename"))
    assert kept < 2_000_000, kept  # 60 ids of 0.99 MB: 59 MB if any were kept
    assert router.core._answered.bytes < 100_000


def test_rotating_session_ids_meets_the_client_limit(rig) -> None:
    """Item 8: the limit was per session only; rotating (or leaving out) sessionId passed
    2,000 requests. The client is the level after the session in its reply topic (or its
    clientId); requests naming no client share one allowance."""
    router, replies = rig(max_requests_per_session=5, max_requests_per_client=10)
    for i in range(15):
        send(router, sessionId=f"rot-{i}", message="hi",
             replyTopic=f"general/assistant_response/rot-{i}/mallory")
    for i in range(3):
        send(router, sessionId=f"a-{i}", message="hi",
             replyTopic=f"general/assistant_response/a-{i}/alice")
    for _ in range(12):
        send(router, message="no session, no client")  # a new generated session each time
    replies.wait(30)
    by_client = {"mallory": [], "alice": [], "nobody": []}
    for topic, payload in replies.items:
        who = topic.split("/")[3] if topic.count("/") >= 3 else "nobody"
        by_client[who].append(payload)
    assert by_client["mallory"].count(RATE_LIMITED) == 5
    assert RATE_LIMITED not in by_client["alice"]
    assert by_client["nobody"].count(RATE_LIMITED) == 2


def test_a_refused_request_does_not_count_against_the_client(rig) -> None:
    router, replies = rig(max_requests_per_session=100, max_requests_per_client=2)
    send(router, sessionId="s", message="   ", clientId="c")  # invalid: not counted
    send(router, sessionId="s", message="one", clientId="c")
    send(router, sessionId="t", message="two", clientId="c")
    send(router, sessionId="u", message="three", clientId="c")
    replies.wait(4)
    assert sorted(p for _, p in replies.items) == sorted([
        "Error: empty message", "echo: one", "echo: two", RATE_LIMITED])


@pytest.mark.integration
@pytest.mark.skipif(not mosquitto_available(), reason="mosquitto is not installed")
def test_a_template_too_long_is_refused_to_its_sender(broker: Broker, client: OldClient) -> None:
    """Item 7: a 900k-character template made every new session of the project fail with
    "the message is too long", blaming its users. Now it is refused when set."""
    agent = Agent(AgentConfig(projects=("general",), mqtt_broker=broker.host,
                              mqtt_port=broker.port, max_history_tokens=300), FakeEngine())
    agent.start()
    try:
        client.subscribe("general/assistant_response/victim")
        client.publish("general/template/victim", json.dumps({"template": "word " * 180_000}))
        reply = client.wait("general/assistant_response/victim")[0]
        assert reply.startswith("Error: the template is too long:") and "at most" in reply
        client.publish("general/template", json.dumps({"template": "word " * 180_000}))
        client.publish("general/template/ok", json.dumps({"template": "Be brief."}))
        assert client.ask("general", "ok", "hi") == "echo: hi"
        assert client.ask("general", "victim", "hi") == "echo: hi"  # the default prompt
        assert "word" not in agent.core.sessions.default_prompt("general")
        assert agent.core.sessions.store.get(("general", "ok")).system_prompt == "Be brief."
    finally:
        agent.stop()

