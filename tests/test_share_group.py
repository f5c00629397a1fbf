"""Several boxes (issue 5, item 8): two agents in one MQTT share group with the Redis session
store, against a real Mosquitto and a real Redis; and which topics a share group shares."""

from __future__ import annotations

import json
import secrets
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from agent.core.session_store_redis import RedisSessionStore
from agent.mqtt.share_group import share_group_problem, shared_subscriptions
from agent.mqtt.topics import Topics
from agent.service.app import Agent
from agent.service.checks import check_agent_config
from agent.service.config import AgentConfig
from engine.api import GenerationRequest
from tests.fake_engine import FakeEngine, user_turns
from tests.mqtt_broker import Broker, mosquitto_available
from tests.old_client import OldClient
from tests.redis_server import REDIS_URL, delete_prefix, require_redis

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(not mosquitto_available(), reason="mosquitto is not installed"),
]


def named_engine(name: str) -> FakeEngine:
    """Replies ``<name>|<system prompt>|<user turns the prompt held, joined by '/'>``."""
    def reply(prompt: str, request: GenerationRequest) -> str:
        system = prompt.split("<|im_start|>system\n", 1)[1].split("<|im_end|>", 1)[0]
        return f"{name}|{system}|{'/'.join(user_turns(prompt))}"

    return FakeEngine(reply=reply)


@pytest.fixture
def pair(broker: Broker) -> Iterator[Callable[..., tuple[str, list[Agent]]]]:
    """Two agents in a fresh share group, with the Redis store the flag names; returns the
    topic prefix they serve under (a fresh one: Redis keys and topics of this test only)."""
    require_redis()
    agents: list[Agent] = []
    prefix = f"t{secrets.token_hex(3)}"

    def make(protocol: str = "5", **overrides: Any) -> tuple[str, list[Agent]]:
        group = f"g{secrets.token_hex(3)}"
        for name in ("box-a", "box-b"):
            config = AgentConfig(
                projects=("general",), mqtt_broker=broker.host, mqtt_port=broker.port,
                mqtt_protocol=protocol, connect_timeout=5, reconnect_max_delay=0.5,
                topic_prefix=prefix, share_group=group, session_store=REDIS_URL,
                agent_id=f"{name}-{secrets.token_hex(3)}", stats_interval=0, **overrides)
            agents.append(Agent(config, named_engine(name)))
            agents[-1].start()
        return prefix, agents

    yield make
    for agent in agents:
        agent.stop()
    delete_prefix(f"vllm_deploy:{prefix}/")


@pytest.mark.parametrize("protocol", ["3.1.1", "5"])
def test_turns_alternate_between_boxes_and_the_history_is_intact(
    pair: Callable[..., tuple[str, list[Agent]]], client: OldClient, protocol: str,
) -> None:
    prefix, agents = pair(protocol)
    assert all(isinstance(a.core.sessions.store, RedisSessionStore) for a in agents)
    messages = [f"turn {i} {secrets.token_hex(2)}" for i in range(6)]
    served = []
    for i, message in enumerate(messages):
        name, _, turns = client.ask(f"{prefix}/general", "shared", message).split("|")
        served.append(name)
        assert turns.split("/") == messages[: i + 1]  # turns 1..i, whoever served them
    assert set(served) == {"box-a", "box-b"}, served
    assert any(a != b for a, b in zip(served, served[1:], strict=False))


def test_control_topics_reach_every_box(
    pair: Callable[..., tuple[str, list[Agent]]], client: OldClient,
) -> None:
    """A template without a session sets each box's default prompt (not shared): new sessions
    get it whichever box serves them; clear_history empties the shared history."""
    prefix, _ = pair()
    project = f"{prefix}/general"
    prompt = f"You are box-neutral {secrets.token_hex(3)}."
    client.publish(f"{project}/template", json.dumps({"template": prompt}))
    served, systems = set(), set()
    for i in range(4):
        name, system, turns = client.ask(project, f"new-{i}", "hello").split("|")
        served.add(name)
        systems.add(system)
        assert turns == "hello"
    assert served == {"box-a", "box-b"} and systems == {prompt}
    client.ask(project, "kept", "one")
    client.ask(project, "kept", "two")
    client.publish(f"{project}/clear_history/kept", "")
    _, _, turns = client.ask(project, "kept", "three").split("|")
    assert turns == "three"


def test_request_topics_are_shared_and_control_topics_are_not() -> None:
    topics = Topics(("general", "maze"), "site/")
    plain = topics.all_subscriptions(legacy=True)
    shared = dict(shared_subscriptions(plain, topics, "boxes"))
    assert shared_subscriptions(plain, topics, None) == plain
    assert len(shared) == len(plain)
    for topic, qos in plain:
        control = topics.parse_control(topic) is not None
        assert shared.get(topic if control else f"$share/boxes/{topic}") == qos, topic
    assert "$share/boxes/site/general/user_input" in shared
    assert "$share/boxes/site/maze/state" in shared
    assert "$share/boxes/site/llama/session" in shared
    assert "site/maze/clear_history/+" in shared
    for bad in ("", "a/b", "a+", "#", "x\0"):
        assert share_group_problem(bad)
        with pytest.raises(ValueError, match="share_group"):
            check_agent_config(AgentConfig(share_group=bad))
