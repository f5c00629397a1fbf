"""Issue 15, the old clients (items 13, 15, 16), against a real Mosquitto with the agent on a
FakeEngine, each client written as the old one is:

- 13: the racing game's handshake on ``llama/driving/session`` (the old driving server answered
  on ``llama/driving/session/response``), and the bare ``llama/user_input`` /
  ``llama/driving/user_input`` of the old server's session ``default`` (it published every
  reply on ``<reply topic>/<session>``: ``.../assistant_response/default``);
- 15: text + images is answered as text (the old server did), the envelope says the images were
  ignored, an image-only message gets an error that says so;
- 16: ``maxTokens`` up to ``--max_tokens_limit`` is honoured (``--max_tokens`` is the default),
  above it lowered and reported in the envelope; the HTTP door uses the same cap.
"""

from __future__ import annotations

import json
import time
import urllib.request
from collections.abc import Callable, Iterator

import pytest

from agent.mqtt.legacy import RESET_REPLY
from agent.mqtt.topics import Topics
from agent.service.app import Agent
from agent.service.config import AgentConfig
from agent.service.settings import parse_settings
from tests.ack_counter import every_request_acked  # noqa: F401 (a fixture)
from tests.agent_maker import started_agents
from tests.fake_engine import FakeEngine, echo
from tests.mqtt_broker import Broker, mosquitto_available
from tests.old_client import OldClient


def on_the_wire(test: Callable) -> Callable:
    """A test of the agent against a private Mosquitto (every request it receives acknowledged)."""
    for mark in (pytest.mark.integration,
                 pytest.mark.skipif(not mosquitto_available(), reason="mosquitto is not installed"),
                 pytest.mark.usefixtures("every_request_acked")):
        test = mark(test)
    return test

TAGS = " <Cont><PlayerOp:a><AgentOP:b>"  # the driving project's output rules want them
IMAGE = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk"  # a PNG's start, base64
NO_TEXT = "Error: this model does not accept images, and the message has no text"
HTTP_KEY = "old-clients-key"


def tagged(prompt: str, request: object) -> str:
    return echo(prompt, request) + TAGS  # type: ignore[arg-type]


@pytest.fixture
def make_agent(broker: Broker) -> Iterator[Callable[..., Agent]]:
    with started_agents(broker, projects=("maze", "driving", "general")) as make:
        yield make


# ---- 13: the legacy topics ----


def test_legacy_subscriptions_and_reserved_topics() -> None:
    for prefix in ("", "site/"):
        topics = Topics(["general", "driving"], prefix)
        subs = dict(topics.all_subscriptions(legacy=True))
        for name in ("llama/user_input", "llama/driving/user_input", "llama/session",
                     "llama/driving/session", "llama/user_input/+", "llama/driving/user_input/+"):
            assert subs[prefix + name] == 0  # QoS 0, as the old game clients publish
        assert not topics.publishable(prefix + "llama/driving/session")  # a request topic
        assert topics.publishable(prefix + "llama/driving/session/response")
        assert topics.publishable(prefix + "llama/assistant_response/default")
        assert topics.publishable(prefix + "llama/driving/assistant_response/default")
    # another agent's (any prefix): never a reply topic of ours
    assert not Topics(["general"]).publishable("general/assistant_response/x/llama/driving/session")


@on_the_wire
def test_racing_game_driving_session_handshake(make_agent, client: OldClient) -> None:
    make_agent(FakeEngine(reply=tagged), legacy_topics=True)
    client.subscribe("llama/driving/session/response")
    client.subscribe("llama/session/response")
    client.publish("llama/driving/session", b"new session please", qos=0)
    sid = client.wait("llama/driving/session/response")[-1]
    assert len(sid) == 10 and int(sid, 16) >= 0
    topic = f"llama/driving/assistant_response/{sid}"
    client.subscribe(topic)
    client.publish(f"llama/driving/user_input/{sid}", "I choose Power Boost", qos=0)
    assert client.wait(topic)[-1].startswith("echo: I choose Power Boost")
    time.sleep(0.2)
    assert client.messages("llama/session/response") == []  # only the game's own handshake topic


@on_the_wire
def test_bare_chat_topics_are_the_default_session(make_agent, client: OldClient) -> None:
    engine = FakeEngine(reply=tagged)
    agent = make_agent(engine, legacy_topics=True)
    default = "llama/assistant_response/default"
    driving_default = "llama/driving/assistant_response/default"
    client.subscribe(default)
    client.subscribe(driving_default)
    client.publish("llama/user_input", "hello there", qos=0)
    assert client.wait(default)[-1].startswith("echo: hello there")
    client.publish("llama/user_input", "and again", qos=0)
    assert client.wait(default, 2)[-1].startswith("echo: and again")
    assert "hello there" in engine.prompts[-1]  # one session: the history is kept
    assert agent.core.sessions.store.get(("general", "default")) is not None
    client.publish("llama/driving/user_input", "Can I go?", qos=0)
    assert client.wait(driving_default)[-1].startswith("echo: Can I go?")
    assert "hello there" not in engine.prompts[-1]  # the driving project's own session
    client.publish("llama/user_input", b"", qos=0)  # an empty payload resets, as on <sid>
    assert client.wait(default, 3)[-1] == RESET_REPLY
    assert agent.core.sessions.store.get(("general", "default")) is None


# ---- 15: images ----


@on_the_wire
def test_text_with_images_is_answered_and_the_envelope_says_they_were_ignored(
        make_agent, client: OldClient) -> None:
    engine = FakeEngine()
    make_agent(engine)
    # plain text: the answer alone, as the old server sent it (old clients show it verbatim)
    assert client.ask("general", "img", "what is this?", images=[IMAGE]) == "echo: what is this?"
    envelope = json.loads(client.ask("general", "img", "and this?", images=[IMAGE, IMAGE],
                                     responseFormat="json", requestId="r2"))
    assert envelope["text"] == "echo: and this?" and "error" not in envelope
    assert [w["code"] for w in envelope["warnings"]] == ["images_ignored"]
    assert "2 images ignored" in envelope["warnings"][0]["message"]
    assert not any(IMAGE in p for p in engine.prompts)
    # no warnings where nothing was ignored
    plain = json.loads(client.ask("general", "img", "plain", responseFormat="json"))
    assert "warnings" not in plain


@on_the_wire
def test_an_image_without_text_gets_an_error_that_says_so(make_agent, client: OldClient) -> None:
    engine = FakeEngine()
    make_agent(engine)
    assert client.ask("general", "img", "", images=[IMAGE]) == NO_TEXT
    envelope = json.loads(client.ask("general", "img", " ", images=[IMAGE], responseFormat="json"))
    assert envelope["error"] == {"code": "bad_request", "message": NO_TEXT}
    assert client.ask("general", "img", "") == "Error: empty message"  # no image: as before
    assert engine.requests == []


# ---- 16: maxTokens, --max_tokens and --max_tokens_limit ----


def asked(client: OldClient, session: str, engine: FakeEngine, **fields: object) -> tuple[str, int]:
    """The reply to one request, and the reply length cap the engine was given."""
    before = len(engine.requests)
    reply = client.ask("general", session, "hi", **fields)
    assert len(engine.requests) == before + 1
    return reply, engine.requests[-1].sampling.max_tokens


@on_the_wire
def test_max_tokens_is_the_default_and_the_limit_the_cap(make_agent, client: OldClient) -> None:
    engine = FakeEngine()
    make_agent(engine, max_tokens=8, max_tokens_limit=64)
    assert asked(client, "qa", engine) == ("echo: hi", 8)  # none asked: --max_tokens
    assert asked(client, "qa", engine, maxTokens=32)[1] == 32  # above --max_tokens: honoured
    reply, cap = asked(client, "qa", engine, maxTokens=1536)  # the QA client's ask
    assert (reply, cap) == ("echo: hi", 64)  # lowered, not refused, text unchanged
    envelope = json.loads(asked(client, "qa", engine, maxTokens=1536, responseFormat="json")[0])
    assert (envelope["maxTokens"], envelope["maxTokensApplied"]) == (1536, 64)
    assert [w["code"] for w in envelope["warnings"]] == ["max_tokens_capped"]
    assert "error" not in envelope and envelope["text"] == "echo: hi"
    envelope = json.loads(asked(client, "qa", engine, maxTokens=32, responseFormat="json")[0])
    assert (envelope["maxTokens"], envelope["maxTokensApplied"]) == (32, 32)
    assert "warnings" not in envelope
    envelope = json.loads(asked(client, "qa", engine, responseFormat="json")[0])
    assert "maxTokens" not in envelope and "maxTokensApplied" not in envelope


@on_the_wire
def test_without_a_limit_max_tokens_is_the_cap_as_before(make_agent, client: OldClient) -> None:
    engine = FakeEngine()
    make_agent(engine, max_tokens=8)
    assert asked(client, "old", engine, maxTokens=4)[1] == 4
    reply, cap = asked(client, "old", engine, maxTokens=1536, responseFormat="json")
    assert cap == 8
    envelope = json.loads(reply)
    assert (envelope["maxTokens"], envelope["maxTokensApplied"]) == (1536, 8)
    assert "--max_tokens_limit" in envelope["warnings"][0]["message"]


def test_the_limit_is_a_setting_checked_against_max_tokens() -> None:
    settings = parse_settings(["--max_tokens", "512", "--max_tokens_limit", "2048"], {})
    core = settings.agent_config().core_settings()
    assert (core.max_tokens, core.token_limit) == (512, 2048)
    unset = parse_settings(["--max_tokens", "300"], {}).agent_config().core_settings()
    assert unset.max_tokens_limit is None and unset.token_limit == 300
    with pytest.raises(ValueError, match=r"max_tokens_limit \(256\) must be >= max_tokens \(512\)"):
        AgentConfig(max_tokens=512, max_tokens_limit=256)


def _http_completion(port: int, body: dict) -> dict:
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/v1/chat/completions", json.dumps(body).encode(), method="POST",
        headers={"Authorization": f"Bearer {HTTP_KEY}", "Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


@on_the_wire
def test_the_http_door_uses_the_same_cap(make_agent) -> None:
    pytest.importorskip("uvicorn")
    engine = FakeEngine()
    agent = make_agent(engine, max_tokens=8, max_tokens_limit=64, http_port=0,
                       api_key=(HTTP_KEY,))
    hello = [{"role": "user", "content": "hello"}]
    for fields, cap in (({}, 8), ({"max_tokens": 32}, 32), ({"max_completion_tokens": 48}, 48),
                        ({"max_tokens": 1536}, 64)):
        reply = _http_completion(agent.http.port, {"model": "general", "messages": hello, **fields})
        assert reply["choices"][0]["message"]["content"] == "echo: hello"
        assert engine.requests[-1].sampling.max_tokens == cap, fields
