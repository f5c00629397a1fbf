"""Fuzzing a running agent (fake engine) through a real Mosquitto: random bytes, JSON of the
wrong types, huge strings, odd Unicode, missing fields, hostile reply topics (payload and MQTT v5
Response Topic), and junk on the control and maze state topics. The agent stays connected and
every request with a usable reply target gets exactly one reply there."""

from __future__ import annotations

import itertools
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.service.app import Agent
from agent.service.config import AgentConfig
from projects import load_project
from tests.ack_counter import counting_acks
from tests.fake_engine import FakeEngine
from tests.mqtt_broker import Broker, Recorder, mosquitto_available
from tests.test_reply_confinement import HOSTILE

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(not mosquitto_available(), reason="mosquitto is not installed"),
]
PROJECTS = ("general", "maze")
MAX_PAYLOAD = 40_000
_ids = itertools.count()
# Any code point but surrogates (JSON cannot carry them to a topic) and a topic's forbidden ones.
SAFE_TEXT = st.text(st.characters(exclude_categories=("Cs", "Cc", "Co", "Cn"),
                                  exclude_characters="/+#\x00\ufffe\uffff"), max_size=12)
FORBIDDEN = st.text(st.sampled_from(["\x01", "\x1f", "\x7f", "\x85", "\ufffe", "\ufdd0",
                                     "\U0001ffff", "\x00", "+", "#", "\ud800"]), min_size=1, max_size=3)
JSON_JUNK = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=30),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=6)


@dataclass(frozen=True)
class Case:
    topic: str
    payload: bytes
    expect: str | None  # the one reply topic; None: no reply owed
    generated: bool = False  # ... or any "<project>/assistant_response/default-*" topic
    maybe: bool = False  # neither: at most one reply (a reply target the agent had to guess)
    response_topic: str | None = None


@st.composite
def chat_objects(draw: st.DrawFn) -> Case:
    project = draw(st.sampled_from(PROJECTS))
    root = f"{project}/assistant_response/"
    n = next(_ids)
    data: dict = {}
    sid_kind = draw(st.sampled_from(["valid", "valid", "missing", "empty", "number", "bad"]))
    if sid_kind == "valid":
        data["sessionId"] = f"fz{n}-" + draw(SAFE_TEXT)
    elif sid_kind == "empty":
        data["sessionId"] = draw(st.sampled_from(["", "   "]))
    elif sid_kind == "number":
        data["sessionId"] = 10**9 + n
    elif sid_kind == "bad":
        data["sessionId"] = draw(st.sampled_from([["x"], {"a": 1}, True, "a#b", "s" * 300,
                                                  f"z{n}/driving/user_input"])) \
            if draw(st.booleans()) else f"c{n}" + draw(FORBIDDEN)
    target_kind = draw(st.sampled_from(["none", "valid", "hostile", "forbidden", "junk"]))
    reply_topic = None
    if target_kind == "valid":
        reply_topic = root + f"fz{n}/" + draw(SAFE_TEXT)
        data["replyTopic"] = reply_topic
    elif target_kind == "hostile":
        data["replyTopic"] = draw(st.sampled_from(HOSTILE)).replace("maze/", f"{project}/", 1)
    elif target_kind == "forbidden":  # characters a topic must not hold, anywhere in it
        data["replyTopic"] = (root + f"fz{n}/" + draw(SAFE_TEXT) + draw(FORBIDDEN)
                              + draw(SAFE_TEXT))
    elif target_kind == "junk":
        data["replyTopic"] = draw(JSON_JUNK)
    data["message"] = draw(st.one_of(
        st.text(max_size=200), st.just("   "), JSON_JUNK,
        st.integers(5_000, 60_000).map(lambda k: "long " * (k // 5))))  # over the budget / size
    if draw(st.booleans()):
        data.pop("message")
    extras = draw(st.dictionaries(st.sampled_from([
        "temperature", "topP", "maxTokens", "systemPrompt", "prompt_template", "images",
        "clientId", "requestId", "command", "responseFormat", "includeReasoning"]),
        JSON_JUNK | st.sampled_from(["reset", "json", 0.5, 3]), max_size=3))
    data.update(extras)
    if draw(st.booleans()):  # the key order of a big payload's reply fields does not matter
        data = dict(reversed(list(data.items())))
    v5_kind = draw(st.sampled_from(["none", "none", "valid", "hostile"]))
    response_topic = None
    if v5_kind == "valid":
        response_topic = root + f"v5-{n}"
    elif v5_kind == "hostile":
        response_topic = draw(st.sampled_from(
            [t for t in HOSTILE if t.isprintable() and not t.startswith("$") and "+" not in t
             and "#" not in t]))  # the broker itself refuses the rest as a Response Topic
    sid_ok = sid_kind in ("valid", "number")
    if response_topic is not None and v5_kind == "valid":
        expect: str | None = response_topic
    elif target_kind == "valid":
        expect = reply_topic.rstrip("/")  # type: ignore[union-attr]
    elif sid_ok:
        expect = root + str(data["sessionId"])
    else:
        expect = None
    payload = json.dumps(data).encode()
    # a payload too large to parse: a sessionId that is no string is not found, so a generated
    # session may answer
    return Case(f"{project}/user_input", payload, expect,
                generated=expect is None and sid_kind in ("missing", "empty"),
                maybe=expect is None and sid_kind == "bad", response_topic=response_topic)


@st.composite
def raw_payloads(draw: st.DrawFn) -> Case:
    project = draw(st.sampled_from(PROJECTS))
    payload = draw(st.one_of(st.binary(max_size=300), JSON_JUNK.filter(lambda v: not isinstance(
        v, dict)).map(lambda v: json.dumps(v).encode()), st.text(max_size=200).map(str.encode)))
    try:
        is_object = isinstance(json.loads(payload.decode("utf-8", "replace")), dict)
    except ValueError:
        is_object = False
    return Case(f"{project}/user_input", payload, None, generated=not is_object, maybe=is_object)


@st.composite
def other_topics(draw: st.DrawFn) -> Case:
    """Control and maze state topics: no chat reply owed, the agent must just stay up (a
    session's template that is refused gets its error on the session's reply topic)."""
    topic = draw(st.sampled_from(["maze/state", "maze/template", "general/clear_history",
                                  "maze/delete_session/x", "general/template/y"]))
    payload = draw(st.one_of(st.binary(max_size=200), JSON_JUNK.map(lambda v: json.dumps(v).encode())))
    return Case(topic, payload, None, maybe=topic == "general/template/y")


def replies_after(client: Recorder, start: int, owed: bool, settle: float = 0.15) -> list[str]:
    """The topics of replies since the ``start``-th: waits for one if ``owed``, then ``settle`` s."""
    if owed:
        client.wait_for(start + 1)
    time.sleep(settle)
    return [topic for topic, _ in client.messages()[start:]]


@pytest.fixture(scope="module")
def running(broker: Broker) -> Iterator[tuple[Agent, Recorder]]:
    config = AgentConfig(projects=PROJECTS, mqtt_broker=broker.host, mqtt_port=broker.port,
                         connect_timeout=5.0, max_payload_bytes=MAX_PAYLOAD,
                         max_history_tokens=300, max_requests_per_session=1000)
    projects = {p: replace(load_project(p), output_rules=None) for p in PROJECTS}
    with counting_acks() as acks:
        agent = Agent(config, FakeEngine(), projects)
        agent.start()
        with Recorder(broker, "+/assistant_response/#") as client:
            yield agent, client
        agent.stop()
    acks.assert_balanced()  # every request, whatever its fate, acknowledged exactly once


@settings(max_examples=45, deadline=None, suppress_health_check=[
    HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large])
@given(case=st.one_of(chat_objects(), chat_objects(), raw_payloads(), other_topics()))
def test_agent_survives_and_answers_once(running: tuple[Agent, Recorder], broker: Broker,
                                         case: Case) -> None:
    agent, client = running
    start = len(client.messages())
    client.publish(case.topic, case.payload, case.response_topic)
    got = replies_after(client, start, owed=case.expect is not None or case.generated)
    if case.expect is not None:
        assert got == [case.expect]
    elif case.generated:
        assert len(got) == 1 and got[0].split("/")[2].startswith("default-"), got
    else:
        assert len(got) <= (1 if case.maybe else 0), got
    assert agent.ready and "malformed" not in broker.log
