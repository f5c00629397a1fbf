"""No client can make the agent publish into a request or control topic (its own projects' or
another agent's under any prefix), a ``$`` topic or a wildcard: replyTopic, the MQTT v5 Response
Topic and the sessionId (which names the default reply topic) are all confined."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator

import pytest

from agent.mqtt.protocol import ProtocolError, RequestParser
from agent.mqtt.topics import Topics, looks_like_request, topic_problem
from agent.service.app import Agent
from agent.service.config import AgentConfig
from tests.fake_engine import FakeEngine
from tests.mqtt_broker import Broker, Recorder, mosquitto_available

PROJECTS = ("maze", "driving")
ROOT = "maze/assistant_response/"
# Where a hostile client may try to send the agent's reply.
HOSTILE = [
    "maze/user_input", "driving/user_input", "$share/g/maze/user_input", "$SYS/broker/log",
    "#", "+/user_input", ROOT + "#", ROOT + "s/+", ROOT + "s\x00",
    ROOT + "x/driving/user_input",  # looks like a reply topic, ends in a request topic
    ROOT + "x/other/user_input",  # another agent's project under the prefix maze/assistant_response/x/
    ROOT + "x/clinic/template", ROOT + "x/clinic/clear_history/s1", ROOT + "x/maze/state",
    ROOT + "x/llama/user_input/abc", ROOT + "x/llama/driving/user_input/abc", ROOT + "x/llama/session",
    # Mosquitto disconnects a publisher for these: one would cut the agent off
    ROOT + "s\x01", ROOT + "s\x7f", ROOT + "s\u0085", ROOT + "s\ufffe", ROOT + "s\U0001ffff",
]
# Deep reply topics the old clients use, including levels that merely resemble request names.
ALLOWED = [ROOT + "s1/client7", ROOT + "s1/client7/req9", ROOT + "state", ROOT + "s/user_inputs",
           ROOT + "s/template_v2/x", ROOT + "s/driving/state"]


@pytest.mark.parametrize("topic", HOSTILE)
def test_hostile_reply_topics_fall_back_to_the_default(topic: str) -> None:
    topics = Topics(PROJECTS)
    assert topics.confine_reply("maze", topic, "s1") == ROOT + "s1"
    assert topics.reply_problem("maze", topic.rstrip("/")) is not None  # the v5 Response Topic
    assert not topics.publishable(topic)


@pytest.mark.parametrize("topic", ALLOWED)
def test_deep_reply_topics_are_honoured(topic: str) -> None:
    topics = Topics(PROJECTS)
    assert topics.confine_reply("maze", topic, "s1") == topic and not looks_like_request(topic)


@pytest.mark.parametrize("session_id", ["x/driving/user_input", "a/maze/state", "q/llama/session",
                                        "p/other/delete_session/z", "tab\there"])
def test_session_ids_that_would_name_a_request_topic(session_id: str) -> None:
    parser = RequestParser(Topics(PROJECTS), 10_000, 100)
    payload = {"sessionId": session_id, "message": "hi"}
    with pytest.raises(ProtocolError, match="sessionId") as err:
        parser.parse("maze", json.dumps(payload).encode())
    assert err.value.reply_topic is None  # nowhere safe to answer: logged only
    with pytest.raises(ProtocolError) as err:  # a valid replyTopic still gets the error
        parser.parse("maze", json.dumps({**payload, "replyTopic": ROOT + "c/1"}).encode())
    assert err.value.reply_topic == ROOT + "c/1"


# ---- through a real broker: a spy on '#' sees everything the agent publishes ----


@pytest.fixture
def spy(broker: Broker) -> Iterator[Recorder]:
    with Recorder(broker, "#") as spy:
        yield spy


def request(spy: Recorder, payload: dict, response_topic: str | None = None) -> None:
    spy.publish("maze/user_input", json.dumps(payload), response_topic)


@pytest.mark.integration
@pytest.mark.skipif(not mosquitto_available(), reason="mosquitto is not installed")
def test_agent_never_publishes_where_a_client_points_it(broker: Broker, spy: Recorder) -> None:
    config = AgentConfig(projects=PROJECTS, mqtt_broker=broker.host, mqtt_port=broker.port,
                         connect_timeout=5.0)
    with Agent(config, FakeEngine()) as agent:
        targets = [t for t in HOSTILE if "\x00" not in t and not t.startswith("$")]
        # the broker itself refuses these as the v5 property: send them in the payload only
        bad_property = {t for t in targets if topic_problem(t)}
        for i, target in enumerate(targets):
            request(spy, {"sessionId": f"h{i}", "message": "m", "replyTopic": target},
                    None if target in bad_property else target)
        request(spy, {"sessionId": "x/driving/user_input", "message": "m"})
        request(spy, {"sessionId": "bell\x07", "message": "m"})
        for i in range(len(targets)):
            assert spy.wait_for(1, ROOT + f"h{i}") == [b"echo: m"]
        time.sleep(0.2)
        assert agent.ready
    requests = spy.payloads("maze/user_input")
    assert len(requests) == len(targets) + 2  # only ours: the agent published none there
    published = {t for t, _ in spy.messages()} - {"maze/user_input"}
    assert not any(looks_like_request(t) or Topics(PROJECTS).is_reserved(t) for t in published)
    assert not set(targets) & published
    assert not any(topic_problem(t) for t in published)
    assert "malformed" not in broker.log  # the broker never cut the agent off
