"""PROTOCOL.md part C in the router (FakeEngine, no broker): streaming, the JSON envelope and
its error codes, ``command: reset``, ``includeReasoning``, the MQTT v5 reply target."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterator
from types import SimpleNamespace

import pytest

from agent.core.errors import CODES
from agent.core.outcome import OVERLOADED
from agent.core.rate_limit import RATE_LIMITED
from agent.mqtt.topics import Topics
from agent.service.config import AgentConfig
from projects import OutputRules, ProjectSpec
from tests.chat_rig import ChatRig
from tests.fake_engine import FakeEngine
from tests.test_router import qwq_like_tokenizer

PROJECTS = {"maze": ProjectSpec("maze", "You guide a maze game.")}
REPLY = "maze/assistant_response/s/c"
STREAM = REPLY + "/stream"


class Published:
    """The router's publish callable: records (topic, payload, options)."""

    def __init__(self) -> None:
        self.items: list[tuple[str, str, dict]] = []
        self._cond = threading.Condition()

    def __call__(self, topic: str, payload: str, **options: object) -> None:
        with self._cond:
            self.items.append((topic, payload, options))
            self._cond.notify_all()

    def wait_on(self, topic: str, n: int = 1, timeout: float = 5.0) -> list[str]:
        with self._cond:
            assert self._cond.wait_for(lambda: len(self.on(topic)) >= n, timeout), self.items
        return self.on(topic)

    def on(self, topic: str) -> list[str]:
        return [p for t, p, _ in self.items if t == topic]

    def stream(self) -> list[dict]:
        return [json.loads(p) for p in self.on(STREAM)]


MakeRouter = Callable[..., tuple[ChatRig, FakeEngine, Published]]


@pytest.fixture
def make_router() -> Iterator[MakeRouter]:
    routers: list[ChatRig] = []

    def make(engine: FakeEngine | None = None, projects: dict | None = None,
             **overrides: object) -> tuple[ChatRig, FakeEngine, Published]:
        engine = engine or FakeEngine()
        config = AgentConfig(projects=("maze",), **overrides)  # type: ignore[arg-type]
        published = Published()
        router = ChatRig(config, engine, projects or PROJECTS, Topics(config.projects), published)
        router.start()
        routers.append(router)
        return router, engine, published

    yield make
    for router in routers:
        router.stop()


def send(router: ChatRig, properties: object = None, **fields: object) -> None:
    payload = {"sessionId": "s", "replyTopic": REPLY, "clientId": "c", **fields}
    router.handle_message("maze/user_input", json.dumps(payload).encode(), properties)


def envelope(published: Published, n: int = 1) -> dict:
    return json.loads(published.wait_on(REPLY, n)[-1])


# ---- streaming ----


def test_stream_then_the_reply(make_router: MakeRouter) -> None:
    router, engine, published = make_router()
    send(router, message="hello there", stream=True, requestId="r1")
    assert published.wait_on(REPLY) == ["echo: hello there"]
    stream = published.stream()
    assert [m["seq"] for m in stream] == list(range(len(stream))) and len(stream) > 3
    assert [m["done"] for m in stream] == [False] * (len(stream) - 1) + [True]
    assert "".join(m["delta"] for m in stream) == "echo: hello there"
    assert {m["requestId"] for m in stream} == {"r1"}
    topics = [t for t, _, _ in published.items]
    assert topics.index(REPLY) == len(topics) - 1  # done went out before the reply
    assert all(o == {"qos": 0, "correlation": None} for t, _, o in published.items if t == STREAM)


def test_no_stream_unless_asked(make_router: MakeRouter) -> None:
    router, engine, published = make_router()
    send(router, message="hi")
    send(router, message="hi", stream=False)
    assert published.wait_on(REPLY, 2) == ["echo: hi"] * 2
    assert [t for t, _, _ in published.items] == [REPLY, REPLY]
    assert engine.requests[0].on_delta is None


@pytest.mark.parametrize("mode", ["closed", "open"])
def test_stream_leaves_reasoning_out(make_router: MakeRouter, mode: str) -> None:
    engine = FakeEngine()
    if mode == "open":  # the prompt opens <think>: the completion starts inside the reasoning
        engine.tokenizer = qwq_like_tokenizer()
        engine.reply = lambda prompt, request: "Let me think.\n</think>\n\necho: q"
    else:
        engine.think = "closed"
    router, _, published = make_router(engine)
    send(router, message="q", stream=True)
    assert published.wait_on(REPLY) == ["echo: q"]
    assert "".join(m["delta"] for m in published.stream()) == "echo: q"


def test_stream_raw_without_skip_thinking(make_router: MakeRouter) -> None:
    router, engine, published = make_router(skip_thinking=False)
    engine.think = "closed"
    send(router, message="q", stream=True)
    reply = published.wait_on(REPLY)[0]
    assert reply.startswith("<think>") and "".join(m["delta"] for m in published.stream()) == reply


def test_stream_is_raw_text_and_restarts_on_a_retry(make_router: MakeRouter) -> None:
    rules = OutputRules("test_rules", check=lambda t: None if "good" in t else "not good",
                        finalize=lambda t: t.upper())
    engine = FakeEngine(reply=lambda p, r: "good one" if r.request_id.endswith("-retry") else "bad")
    router, _, published = make_router(engine,
                                       {"maze": ProjectSpec("maze", "x", output_rules=rules)})
    send(router, message="q", stream=True)
    assert published.wait_on(REPLY) == ["GOOD ONE"]  # the rules change the reply only
    stream = published.stream()
    restart = next(i for i, m in enumerate(stream) if m.get("restart"))
    assert "".join(m["delta"] for m in stream[:restart]) == "bad"
    assert "".join(m["delta"] for m in stream[restart:]) == "good one"


def test_stream_ends_on_errors(make_router: MakeRouter) -> None:
    router, engine, published = make_router()
    engine.fail = "out of memory"
    send(router, message="q", stream=True)
    assert published.wait_on(REPLY) == ["Error: out of memory"]
    assert published.stream() == [{"requestId": None, "seq": 0, "delta": "", "done": True}]


# ---- JSON envelope ----


def test_envelope(make_router: MakeRouter) -> None:
    router, engine, published = make_router()
    send(router, message="hello", responseFormat="json", requestId="r9")
    env = envelope(published)
    assert env == {
        "requestId": "r9", "sessionId": "s", "project": "maze", "clientId": "c",
        "text": "echo: hello", "finishReason": "stop",
        "usage": {"promptTokens": len(engine.requests[0].prompt_token_ids),
                  "completionTokens": len(engine.tokenizer.encode("echo: hello")),
                  "cachedPromptTokens": 0},
        "timings": {"queueMs": 0.0, "ttftMs": 0.0, "totalMs": 0.0},
    }
    send(router, message="again", responseFormat="text")
    assert published.wait_on(REPLY, 2)[-1] == "echo: again"
    assert router.store.get(("maze", "s")).turns[-1] == ("again", "echo: again")


def test_include_reasoning(make_router: MakeRouter) -> None:
    router, engine, published = make_router()
    engine.think = "closed"
    send(router, message="q", responseFormat="json", includeReasoning=True)
    env = envelope(published)
    assert env["text"] == "echo: q" and env["reasoning"] == "Let me think about it."
    send(router, message="q", responseFormat="json")
    assert "reasoning" not in envelope(published, 2)
    send(router, message="q", includeReasoning=True)  # plain text: nowhere to put it
    assert published.wait_on(REPLY, 3)[-1] == "echo: q"


def error_of(published: Published, n: int = 1) -> dict:
    env = envelope(published, n)
    assert env["text"] == "" and set(env["error"]) == {"code", "message"}
    assert env["error"]["code"] in CODES
    return env["error"]


@pytest.mark.parametrize("fields, code, message", [
    ({"message": "hi", "temperature": "hot"}, "bad_request", "Error: temperature must be"),
    ({"message": ""}, "bad_request", "Error: empty message"),
    ({"message": "hi", "stream": "yes"}, "bad_request", "Error: stream must be true or false"),
    ({"message": "x" * 3000}, "too_long", "Error: the request is too large"),
    ({"message": "w " * 400}, "too_long", "Error: the message is too long"),
])
def test_error_codes_of_bad_requests(make_router: MakeRouter, fields: dict, code: str,
                                     message: str) -> None:
    router, _, published = make_router(max_payload_bytes=2000, max_history_tokens=200)
    send(router, responseFormat="json", requestId="r1", **fields)
    error = error_of(published)
    assert error["code"] == code and error["message"].startswith(message)
    assert envelope(published)["requestId"] == "r1"


def test_error_codes_of_refusals_and_failures(make_router: MakeRouter) -> None:
    router, engine, published = make_router(FakeEngine(delay=0.3), max_requests_per_session=2,
                                            max_queue=1, request_timeout=0.2)
    send(router, message="a", responseFormat="json")  # times out
    send(router, message="b", responseFormat="json")  # the queue is full
    assert error_of(published) == {"code": "overloaded", "message": OVERLOADED}
    assert error_of(published, 2)["code"] == "overloaded"  # timed out: busy, try again
    assert error_of(published, 2)["message"].startswith("Error: no answer within")
    send(router, message="c", responseFormat="json")  # the second counted: b was refused
    send(router, message="c2", responseFormat="json")
    assert error_of(published, 3) == {"code": "rate_limited", "message": RATE_LIMITED}
    assert error_of(published, 4)["code"] == "overloaded"  # c timed out
    engine.delay, engine.fail = 0, "out of memory"
    send(router, sessionId="t", message="d", responseFormat="json")
    assert error_of(published, 5) == {"code": "internal", "message": "Error: out of memory"}
    engine.delay, engine.fail = 5, None
    send(router, sessionId="u", message="e", responseFormat="json")
    router.stop()
    assert error_of(published, 6)["code"] == "shutting_down"


# ---- command: reset ----


def test_reset_in_order_without_the_engine(make_router: MakeRouter) -> None:
    router, engine, published = make_router(FakeEngine(delay=0.05))
    send(router, message="one", systemPrompt="Be a pirate.")
    send(router, command="reset")
    send(router, message="two")
    assert published.wait_on(REPLY, 3) == ["echo: one", "OK: session reset", "echo: two"]
    assert len(engine.requests) == 2
    assert engine.user_turns() == ["two"]  # the history went ...
    assert engine.prompts[-1].startswith("<|im_start|>system\nYou guide a maze game.")  # and this
    send(router, command="reset", responseFormat="json", message="ignored")
    env = envelope(published, 4)
    assert env["text"] == "OK: session reset" and "error" not in env and env["finishReason"] is None
    assert router.store.get(("maze", "s")) is None


@pytest.mark.parametrize("fields, field", [
    ({"message": "hi", "responseFormat": "xml"}, "responseFormat"),
    ({"message": "hi", "includeReasoning": 1}, "includeReasoning"),
    ({"message": "hi", "command": "delete"}, "command"),
    ({"command": 7}, "command"),
    ({"message": "hi", "stream": "true"}, "stream"),
])
def test_options_validated(make_router: MakeRouter, fields: dict, field: str) -> None:
    router, engine, published = make_router()
    send(router, **fields)
    reply = published.wait_on(REPLY)[0]
    assert reply.startswith(f"Error: {field} must be") and not engine.requests


# ---- MQTT v5 reply target ----


def v5(topic: str | None = None, correlation: bytes | None = None) -> SimpleNamespace:
    props = SimpleNamespace()
    if topic is not None:
        props.ResponseTopic = topic
    if correlation is not None:
        props.CorrelationData = correlation
    return props


def test_response_topic_and_correlation_data(make_router: MakeRouter) -> None:
    router, _, published = make_router()
    target = "maze/assistant_response/s/v5/"
    send(router, v5(target, b"\x00id-1"), message="hi", stream=True)
    published.wait_on(target.rstrip("/"))
    by_topic = {t: o for t, _, o in published.items}
    # the Response Topic wins over replyTopic
    assert by_topic[target.rstrip("/")] == {"qos": 1, "correlation": b"\x00id-1"}
    assert by_topic[target + "stream"] == {"qos": 0, "correlation": b"\x00id-1"}
    assert REPLY not in by_topic


@pytest.mark.parametrize("target", ["maze/user_input", "maze/assistant_response/#", "other/x"])
def test_disallowed_response_topic_is_ignored(make_router: MakeRouter, target: str) -> None:
    router, _, published = make_router()
    send(router, v5(target, b"c1"), message="hi")
    published.wait_on(REPLY)
    send(router, v5(target), message="")
    assert published.wait_on(REPLY, 2) == ["echo: hi", "Error: empty message"]
    assert [o for _, _, o in published.items] == [{"qos": 1, "correlation": b"c1"}, {}]


def test_correlation_data_on_errors(make_router: MakeRouter) -> None:
    router, _, published = make_router(max_requests_per_session=1)
    send(router, v5(correlation=b"a"), message="hi")
    published.wait_on(REPLY)
    send(router, v5(correlation=b"b"), message="hi")
    send(router, v5("maze/assistant_response/bad", b"c"), message="hi", temperature=5)
    published.wait_on("maze/assistant_response/bad")
    assert [(p, o) for _, p, o in published.items] == [
        ("echo: hi", {"qos": 1, "correlation": b"a"}),
        (RATE_LIMITED, {"qos": 1, "correlation": b"b"}),
        ("Error: temperature must be a number in [0, 2], got 5", {"qos": 1, "correlation": b"c"}),
    ]
