"""PROTOCOL.md, requirement by requirement: the ones no other test file checks.

Each test quotes the sentence it checks. Wire behaviour goes through a private
Mosquitto with the agent and a FakeEngine; the rest at the level where it is
decided (the router with a fake clock, the parser, the game harness, the maze
rules, the settings).
"""

from __future__ import annotations

import json
import logging
import secrets
import time
from collections.abc import Callable, Iterator

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.reasoncodes import ReasonCode

from agent.core.sessions import Session
from agent.mqtt.protocol import RequestParser
from agent.mqtt.topics import Topics, filters_overlap
from agent.service.app import Agent
from agent.service.config import AgentConfig
from agent.service.settings import parse_settings
from projects.maze_rules import DEFAULT_MAX_BREAKS, build_hint, parse_state
from tests.ack_counter import every_request_acked  # noqa: F401 (a fixture)
from tests.agent_maker import started_agents
from tests.chat_rig import ChatRig
from tests.fake_engine import FakeEngine
from tests.game_harness import Game, system_prompt
from tests.maze_game import OPEN, SEALED, WALLED, check_hint, hint_of, make_maze, state
from tests.mqtt_broker import Broker, Recorder, mosquitto_available
from tests.test_router import PROJECTS, Replies, wait_until
from tests.test_sessions import Clock

pytestmark = pytest.mark.usefixtures("every_request_acked")
WIRE_PROJECTS = ("maze", "general")  # neither has output rules: echo replies come back as they are
HINT = "Follow the path."
RATE_LIMITED_TEXT = "Error: Rate limit exceeded. Please slow down your requests."
OVERLOADED_TEXT = "Server is overloaded. Please try again in a moment."
QUIET_S = 0.3  # how long a test waits to see that nothing more arrives


# ---- helpers ----


def on_the_wire(test: Callable) -> Callable:
    """Marks a test that runs the agent against a private Mosquitto."""
    needs_broker = pytest.mark.skipif(not mosquitto_available(), reason="mosquitto is not installed")
    return pytest.mark.integration(needs_broker(test))


class QosRecorder(Recorder):
    """A Recorder that subscribes with QoS 2, so that each message arrives with the QoS it was
    published with, and keeps that QoS per message."""

    def __init__(self, broker: Broker, *filters: str) -> None:
        self.qos: list[tuple[str, int]] = []
        super().__init__(broker, *filters)

    def _on_connect(self, client: mqtt.Client, userdata: object, flags: object,
                    reason_code: ReasonCode, properties: object) -> None:
        if not reason_code.is_failure:
            client.subscribe([(f, 2) for f in self.filters])

    def _on_message(self, client: mqtt.Client, userdata: object, message: mqtt.MQTTMessage) -> None:
        with self._cond:
            self.qos.append((message.topic, message.qos))
        super()._on_message(client, userdata, message)

    def qos_on(self, topic: str) -> list[int]:
        with self._cond:
            return [q for t, q in self.qos if t == topic]


def retained_on(broker: Broker, topic_filter: str) -> list[tuple[str, bytes]]:
    """What a fresh subscriber to ``topic_filter`` is given at once: the retained messages."""
    with Recorder(broker, topic_filter) as fresh:
        time.sleep(QUIET_S)
        return fresh.messages()


def chat(recorder: Recorder, project: str, **fields: object) -> None:
    recorder.publish(f"{project}/user_input", json.dumps(fields))


MakeAgent = Callable[..., Agent]


@pytest.fixture
def make_agent(broker: Broker) -> Iterator[MakeAgent]:
    """Started agents on the module's broker, each with its own MQTT session."""
    with started_agents(broker, projects=WIRE_PROJECTS, stats_interval=0,
                        agent_id=f"conformance-{secrets.token_hex(3)}") as make:
        yield make


MakeRouter = Callable[..., tuple[ChatRig, FakeEngine, Replies]]


@pytest.fixture
def make_router() -> Iterator[MakeRouter]:
    """A router (projects maze and general, no broker) whose clock the test moves."""
    routers: list[ChatRig] = []

    def make(clock: Clock | None = None, **overrides: object) -> tuple[ChatRig, FakeEngine, Replies]:
        engine = FakeEngine()
        config = AgentConfig(projects=("maze", "general"), **overrides)  # type: ignore[arg-type]
        replies = Replies()
        router = ChatRig(config, engine, PROJECTS, Topics(config.projects), replies,
                        clock=clock or Clock())
        router.start()
        routers.append(router)
        return router, engine, replies

    yield make
    for router in routers:
        router.stop()


def ask(router: ChatRig, replies: Replies, session: str, message: str, **fields: object) -> str:
    """Sends one turn of ``session`` (project maze) and returns its reply."""
    before = len(replies.items)
    payload = {"sessionId": session, "message": message, **fields}
    router.handle_message("maze/user_input", json.dumps(payload).encode())
    return replies.wait(before + 1)[before][1]


@pytest.fixture
def game() -> Iterator[Callable[..., Game]]:
    games: list[Game] = []

    def make(engine: FakeEngine | None = None, **overrides: object) -> Game:
        games.append(Game(engine or FakeEngine(reply=lambda p, r: HINT), **overrides))
        return games[-1]

    yield make
    for g in games:
        g.agent.core.stop()


# ---- A. Chat: topics, QoS, retain ----


def test_user_input_subscribed_exactly_with_qos_1() -> None:
    """| request, client -> agent | `P/user_input` (exact; no wildcard) | subscribes with QoS 1 |"""
    agent = Agent(AgentConfig(projects=("maze", "driving", "bloodcell"), legacy_topics=True),
                  FakeEngine())
    subscriptions = dict(agent.mqtt.subscriptions)
    for project in ("maze", "driving", "bloodcell"):
        request = f"{project}/user_input"
        assert subscriptions[request] == 1
        catching = [f for f in subscriptions if filters_overlap(f, request)]
        assert catching == [request], catching  # no wildcard filter takes it (nor P/user_input/x)


@pytest.mark.parametrize("reply_topic", [None, "general/assistant_response/q1/client7/req9"],
                         ids=["default", "replyTopic"])
@pytest.mark.parametrize("message", ["hello", "  "], ids=["answer", "error"])
@on_the_wire
def test_replies_are_qos_1_and_not_retained(make_agent: MakeAgent, broker: Broker,
                                             reply_topic: str | None, message: str) -> None:
    """| reply, agent -> client | `P/assistant_response/<sessionId>` by default | publishes
    with QoS 1, not retained | and | reply, custom | `replyTopic` from the request | 1 |"""
    make_agent()
    topic = reply_topic or "general/assistant_response/q1"
    with QosRecorder(broker, "general/assistant_response/#") as recorder:
        fields = {} if reply_topic is None else {"replyTopic": reply_topic}
        chat(recorder, "general", sessionId="q1", message=message, **fields)
        [reply] = recorder.wait_for(1, topic)
        assert reply == (b"echo: hello" if message.strip() else b"Error: empty message")
        assert recorder.qos_on(topic) == [1]
    assert retained_on(broker, "general/assistant_response/#") == []


@on_the_wire
def test_stream_messages_are_qos_0_and_the_reply_follows(make_agent: MakeAgent,
                                                         broker: Broker) -> None:
    """| `<reply topic>/stream` | stream deltas when the request has `"stream": true`: JSON
    `{"requestId", "seq", "delta", "done"}`, QoS 0; the full reply still follows on the reply
    topic |"""
    make_agent()
    topic = "general/assistant_response/st1"
    with QosRecorder(broker, topic, topic + "/stream") as recorder:
        chat(recorder, "general", sessionId="st1", message="stream me please", stream=True,
             requestId="r1")
        assert recorder.wait_for(1, topic) == [b"echo: stream me please"]
        stream = [json.loads(p) for p in recorder.payloads(topic + "/stream")]
        assert stream and stream[-1]["done"]
        assert all(set(m) == {"requestId", "seq", "delta", "done"} for m in stream)
        assert set(recorder.qos_on(topic + "/stream")) == {0}
        assert recorder.qos_on(topic) == [1]
        topics = [t for t, _ in recorder.messages() if t.startswith(topic)]
        assert topics[-1] == topic  # the full reply comes after the last delta


@on_the_wire
def test_topic_prefix_keeps_every_default(make_agent: MakeAgent, broker: Broker) -> None:
    """A topic prefix for every project (`--topic_prefix clinic1/`) must be possible without
    breaking the defaults."""
    make_agent(FakeEngine(reply=lambda p, r: HINT), topic_prefix="clinic1/")
    with Recorder(broker, "clinic1/#", "general/#", "maze/#") as recorder:
        chat(recorder, "general", sessionId="pre0", message="unprefixed: not ours")
        chat(recorder, "clinic1/general", sessionId="pre1", message="hi")
        recorder.publish("clinic1/maze/state", json.dumps(state(OPEN, "pre2")))
        recorder.publish("clinic1/maze/template/pre3", json.dumps({"template": "T"}))
        assert recorder.wait_for(1, "clinic1/general/assistant_response/pre1") == [HINT.encode()]
        [hint] = recorder.wait_for(1, "clinic1/maze/hint/pre2")
        check_hint(hint_of(hint), *make_maze(OPEN))
        [ack] = recorder.wait_for(1, "clinic1/maze/hint/pre3")
        assert hint_of(ack) == {"hint": "Template updated", "breaks_remaining": 3}
        time.sleep(QUIET_S)
        published = {t for t, _ in recorder.messages()}
    assert published == {"general/user_input", "clinic1/general/user_input", "clinic1/maze/state",
                         "clinic1/maze/template/pre3", "clinic1/general/assistant_response/pre1",
                         "clinic1/maze/hint/pre2", "clinic1/maze/hint/pre3"}


def test_disallowed_reply_topic_is_logged_and_the_default_used(
    make_router: MakeRouter, caplog: pytest.LogCaptureFixture,
) -> None:
    """Otherwise the agent logs a warning and uses the default topic."""
    router, _, replies = make_router()
    caplog.set_level(logging.WARNING)
    for bad in ("maze/assistant_response/", "maze/assistant_response/a/+",
                "general/assistant_response/w", "maze/template/w"):
        caplog.clear()
        assert ask(router, replies, "w", "hi", replyTopic=bad) == "echo: hi"
        assert replies.items[-1][0] == "maze/assistant_response/w"
        warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
        assert any("replyTopic" in r.getMessage() for r in warnings), (bad, caplog.text)


# ---- A. Chat: request fields ----


@pytest.mark.parametrize("field, value, attribute, expected", [
    ("temperature", 0, "temperature", 0.0),
    ("temperature", 2, "temperature", 2.0),
    ("topP", 1, "top_p", 1.0),
    ("topP", 1e-9, "top_p", 1e-9),
    ("maxTokens", 1, "max_tokens", 1),
])
def test_range_bounds_are_accepted(field: str, value: float, attribute: str,
                                   expected: float) -> None:
    """| `temperature` | number, 0..2 | ... | `topP` | number, (0, 1] | ... | `maxTokens` |
    integer >= 1 |"""
    parser = RequestParser(Topics(["maze"]), max_payload_bytes=10_000, max_tokens=256)
    payload = {"sessionId": "s", "message": "hi", field: value}
    request = parser.parse("maze", json.dumps(payload).encode())
    assert getattr(request, attribute) == expected


def test_request_id_is_deduplicated_per_session(make_router: MakeRouter) -> None:
    """| `requestId` | ... | a copy of an answered request (same session, `requestId` and
    message ...) is generated once and gets the same reply again"""
    router, engine, replies = make_router()
    for session in ("d1", "d2", "d1"):
        payload = {"sessionId": session, "message": f"to {session}", "requestId": "same-id"}
        router.handle_message("maze/user_input", json.dumps(payload).encode())
    replies.wait(3)
    time.sleep(QUIET_S)
    assert sorted(replies.items) == [("maze/assistant_response/d1", "echo: to d1")] * 2 + [
        ("maze/assistant_response/d2", "echo: to d2")]
    assert len(engine.requests) == 2


@on_the_wire
def test_refusal_texts_are_the_old_ones(make_agent: MakeAgent, broker: Broker) -> None:
    """Errors are plain strings that start with `Error: `, for example `Error: Rate limit
    exceeded. Please slow down your requests.`; and the old overload text, kept as it was:
    `Server is overloaded. Please try again in a moment.`"""
    make_agent(FakeEngine(delay=0.3), max_queue=1, max_requests_per_session=1)
    with Recorder(broker, "general/assistant_response/#") as recorder:
        chat(recorder, "general", sessionId="busy", message="first")  # holds the one queue place
        # QoS 0: a QoS 1 request would wait for room first (backpressure, test_backpressure.py)
        recorder._client.publish("general/user_input", json.dumps(
            {"sessionId": "other", "message": "no room"}), qos=0).wait_for_publish(5)
        chat(recorder, "general", sessionId="busy", message="too soon")  # its 2nd in the window
        assert recorder.wait_for(1, "general/assistant_response/other") == [OVERLOADED_TEXT.encode()]
        busy = recorder.wait_for(2, "general/assistant_response/busy")
    assert sorted(busy) == sorted([RATE_LIMITED_TEXT.encode(), b"echo: first"])


# ---- A. Sessions and history ----


def test_a_turn_too_long_changes_nothing_in_the_session(make_router: MakeRouter) -> None:
    """A newest user turn that alone does not fit gets an `Error: ...` reply; nothing else in
    the session changes."""
    router, _, replies = make_router(max_history_tokens=200)
    assert ask(router, replies, "t", "one", systemPrompt="First prompt.") == "echo: one"
    reply = ask(router, replies, "t", "z" * 1000, systemPrompt="Second prompt.")
    assert reply.startswith("Error: ")
    assert router.store.get(("maze", "t")) == Session("First prompt.", [("one", "echo: one")])


def test_idle_sessions_expire_after_session_timeout(make_router: MakeRouter) -> None:
    """Sessions expire after `--session_timeout` seconds idle (default 3600)"""
    clock = Clock()
    router, engine, replies = make_router(clock, session_timeout=10)
    ask(router, replies, "kept", "one")
    ask(router, replies, "idle", "one")
    clock.now += 9
    ask(router, replies, "kept", "two")
    assert engine.user_turns() == ["one", "two"]
    clock.now += 2  # "idle" has been idle for 11 s
    ask(router, replies, "idle", "two")
    assert engine.user_turns() == ["two"]


def test_least_recently_used_session_goes_over_the_cap(make_router: MakeRouter) -> None:
    """over `--max_concurrent_sessions` (default 100) the least recently used goes."""
    clock = Clock()
    router, engine, replies = make_router(clock, max_concurrent_sessions=2)
    for session in ("a", "b", "a", "c"):  # "b" is the least recently used when "c" comes
        clock.now += 1
        ask(router, replies, session, f"hello from {session}")
    assert router.store.get(("maze", "b")) is None
    assert router.store.get(("maze", "a")) is not None and router.store.get(("maze", "c")) is not None


def test_rate_limit_counts_per_window(make_router: MakeRouter) -> None:
    """Per-session rate limit: `--max_requests_per_session` per `--rate_limit_window` seconds
    (defaults 20 per 60)."""
    clock = Clock()
    router, _, replies = make_router(clock, max_requests_per_session=2, rate_limit_window=60)
    assert ask(router, replies, "r", "1") == "echo: 1"
    clock.now += 30
    assert ask(router, replies, "r", "2") == "echo: 2"
    clock.now += 29
    assert ask(router, replies, "r", "3") == RATE_LIMITED_TEXT
    assert ask(router, replies, "other", "x") == "echo: x"  # per session
    clock.now += 2  # the first request left the window
    assert ask(router, replies, "r", "4") == "echo: 4"


def test_protocol_defaults_of_the_launcher_and_the_agent() -> None:
    """Sessions expire after `--session_timeout` seconds idle (default 3600); over
    `--max_concurrent_sessions` (default 100) ...; (defaults 20 per 60); With `--skip_thinking`
    (default on); `status_prefix` defaults to `vllm_deploy`; `max_breaks` (default 3);
    Legacy topics (opt-in, `--legacy_topics`)."""
    expected = {"session_timeout": 3600, "max_concurrent_sessions": 100,
                "max_requests_per_session": 20, "rate_limit_window": 60, "skip_thinking": True,
                "status_prefix": "vllm_deploy", "legacy_topics": False}
    for config in (parse_settings([], {}).agent_config(), AgentConfig()):
        assert {name: getattr(config, name) for name in expected} == expected
    assert DEFAULT_MAX_BREAKS == 3


def test_the_model_is_not_stopped_at_think(make_router: MakeRouter) -> None:
    """the model is not stopped at `</think>` (the old server used it as a stop string and so
    cut answers off): it goes on to write the answer."""
    router, engine, replies = make_router()
    engine.think = "closed"
    assert ask(router, replies, "th", "question") == "echo: question"
    assert not any("think" in stop for stop in engine.requests[-1].sampling.stop)


# ---- B. Maze state -> JSON hints ----


@pytest.mark.parametrize("reply_topic, expected", [
    ("maze/hint/h1/web", "maze/hint/h1/web"),
    ("maze/assistant_response/h1", "maze/hint/h1"),
    ("maze/hint/#", "maze/hint/h1"),
])
@on_the_wire
def test_maze_reply_topic_must_start_with_the_hint_root(
    make_agent: MakeAgent, broker: Broker, reply_topic: str, expected: str,
) -> None:
    """optional `replyTopic` (must start with `maze/hint/`)"""
    make_agent(FakeEngine(reply=lambda p, r: HINT))
    with Recorder(broker, "maze/hint/#", "maze/assistant_response/#") as recorder:
        recorder.publish("maze/state", json.dumps(state(OPEN, "h1", replyTopic=reply_topic)))
        [hint] = recorder.wait_for(1, expected)
        assert hint_of(hint)["hint"] == HINT
        time.sleep(QUIET_S)
        assert [t for t, _ in recorder.messages() if t != "maze/state"] == [expected]


def test_maze_state_prompt_template_is_the_system_prompt(game: Callable[..., Game]) -> None:
    """optional `prompt_template` (`content`)"""
    g = game()
    g.send("maze/state", state(OPEN, "pt", prompt_template={"content": "You are a pirate guide."}))
    g.hints("pt", 1)
    assert system_prompt(g.engine) == "You are a pirate guide."


def test_maze_state_message_maps_the_oxygen_fields(game: Callable[..., Game]) -> None:
    """Payload: ... `oxygenPellets`, `oxygenCollected` ... The model sees the state as a JSON
    user message with keys `player_pos, exit_pos, visible_map, germs, oxygen,
    oxygen_collected`."""
    g = game()
    g.send("maze/state", state(OPEN, "ox", germs=[{"x": 7, "y": 1}],
                               oxygenPellets=[[3, 2], {"x": 5, "y": 1}], oxygenCollected=4))
    g.hints("ox", 1)
    grid, player, exit_ = make_maze(OPEN)
    assert json.loads(g.engine.user_turns()[-1]) == {
        "player_pos": player, "exit_pos": exit_, "visible_map": grid, "germs": [[7, 1]],
        "oxygen": [[3, 2], [5, 1]], "oxygen_collected": 4}


@pytest.mark.parametrize("steps", [19, 20])
def test_speed_boost_from_twenty_steps(steps: int) -> None:
    """`speed_boost_ms: 1500` when the path has 20 or more steps"""
    corridor = ["#" * (steps + 3), "#P" + "." * (steps - 1) + "E#", "#" * (steps + 3)]
    hint, _ = build_hint("Run!", parse_state(state(corridor, "s")), 3)
    assert len(hint["path"]) - 1 == steps
    assert hint.get("speed_boost_ms") == (1500 if steps >= 20 else None)


def test_computed_path_may_break_up_to_breaks_remaining_walls() -> None:
    """`path`: if the model gave no valid list of `[x, y]` int pairs, the agent computes the
    shortest path from player to exit by BFS, allowing up to `breaks_remaining` wall breaks;
    if a break is needed it adds `break_wall: [x, y]`; if no path exists even so, `path: []`"""
    hint, _ = build_hint("Which way?", parse_state(state(SEALED, "s")), 3)
    assert hint["path"], hint  # two walls stand between player and exit; three breaks remain
    assert hint["path"][0] == make_maze(SEALED)[1] and hint["path"][-1] == make_maze(SEALED)[2]
    assert "break_wall" in hint


# ---- B. Control topics ----


@pytest.mark.parametrize("topic, payload", [
    ("general/template/c", {"template": "New prompt."}),
    ("general/template/c", {"template": {"content": "New prompt."}}),
    ("general/template", {"sessionId": "c", "system_prompt": "New prompt."}),
    ("general/template", {"session_id": "c", "systemPrompt": "New prompt."}),
    ("general/template", {"session_id": "c", "prompt_template": "New prompt."}),
    ("general/template", {"sessionId": "c", "prompt_template": {"content": "New prompt."}}),
    ("general/template/c", {"prompt_template": {"template": "New prompt."}}),
])
def test_template_fields_and_session_sources(game: Callable[..., Game], topic: str,
                                             payload: dict) -> None:
    """`P/template`: new system prompt from `template`, `system_prompt`, `systemPrompt` or
    `prompt_template` (a string, or an object's `content` / `template`); session from
    `sessionId`, `session_id` or the topic suffix"""
    g = game(FakeEngine())
    g.send("general/user_input", {"sessionId": "c", "message": "hello"})
    g.replies.wait(1)
    g.send(topic, payload)
    g.send("general/user_input", {"sessionId": "c", "message": "again"})
    g.replies.wait(2)
    assert system_prompt(g.engine) == "New prompt."
    assert g.engine.user_turns() == ["again"]  # reset: true by default


@pytest.mark.parametrize("action", ["clear_history", "delete_session"])
@pytest.mark.parametrize("topic_suffix, payload", [
    ("/a", b""), ("", {"sessionId": "a"}), ("", {"session_id": "a"}), ("", {"target": "a"}),
], ids=["suffix", "sessionId", "session_id", "target"])
def test_clear_and_delete_target_one_session(game: Callable[..., Game], action: str,
                                             topic_suffix: str, payload: object) -> None:
    """`P/clear_history`: target from `sessionId`, `session_id`, `target` or the suffix ...
    Clears history, keeps the system prompt. `P/delete_session`: same targeting; forgets the
    session(s); no reply."""
    g = game(FakeEngine())
    for sid in ("a", "b"):
        g.send("general/user_input", {"sessionId": sid, "message": "hi", "systemPrompt": "Mine."})
    g.replies.wait(2)
    g.send(f"general/{action}{topic_suffix}", payload)
    if action == "clear_history":
        assert g.session("general", "a") == Session("Mine.", [])
    else:
        assert g.session("general", "a") is None
    assert g.session("general", "b") == Session("Mine.", [("hi", "echo: hi")])
    time.sleep(0.05)
    assert len(g.replies.items) == 2  # no reply outside maze


@pytest.mark.parametrize("action", ["clear_history", "delete_session"])
@pytest.mark.parametrize("topic_suffix, payload", [
    ("", b""), ("", {"target": "all"}), ("", {"session_id": "all"}), ("/all", b""),
], ids=["none", "target", "session_id", "suffix"])
def test_all_or_no_target_means_every_session(game: Callable[..., Game], action: str,
                                              topic_suffix: str, payload: object) -> None:
    """`all` or none means every session of `P`."""
    g = game(FakeEngine())
    for project, sid in (("general", "a"), ("general", "b"), ("maze", "a")):
        g.send(f"{project}/user_input", {"sessionId": sid, "message": "hi"})
    g.replies.wait(3)
    g.send(f"general/{action}{topic_suffix}", payload)
    for sid in ("a", "b"):
        session = g.session("general", sid)
        assert (session is None) if action == "delete_session" else (session.turns == [])
    assert g.session("maze", "a").turns == [("hi", "echo: hi")]  # another project's: untouched


@on_the_wire
def test_maze_delete_session_forgets_breaks_and_sends_nothing(make_agent: MakeAgent,
                                                              broker: Broker) -> None:
    """`P/delete_session`: same targeting; forgets the session(s); no reply. ...
    `breaks_remaining`: per session, starting at `max_breaks` (default 3)"""
    make_agent(FakeEngine(reply=lambda p, r: HINT))
    topic = "maze/hint/del1"
    with Recorder(broker, topic) as recorder:
        recorder.publish("maze/state", json.dumps(state(WALLED, "del1")))
        assert hint_of(recorder.wait_for(1, topic)[0])["breaks_remaining"] == 2
        recorder.publish("maze/delete_session/del1", b"")
        recorder.publish("maze/state", json.dumps(state(WALLED, "del1")))
        hints = [hint_of(p) for p in recorder.wait_for(2, topic)]
        time.sleep(QUIET_S)
        assert len(recorder.payloads(topic)) == 2  # nothing for the delete itself
    assert hints[1]["break_wall"] == [4, 1] and hints[1]["breaks_remaining"] == 2  # 3 again, less 1


# ---- B. Legacy topics ----


def test_legacy_subscriptions_are_qos_0() -> None:
    """`llama/user_input/<sid>` and `llama/driving/user_input/<sid>` (QoS 0) ... any message on
    `llama/session`"""
    subscriptions = dict(Topics(["general"]).all_subscriptions(legacy=True))
    legacy = ("llama/user_input/+", "llama/driving/user_input/+", "llama/session")
    assert {t: subscriptions[t] for t in legacy} == dict.fromkeys(legacy, 0)


@on_the_wire
def test_legacy_empty_payload_resets_with_the_old_text(make_agent: MakeAgent, broker: Broker) -> None:
    """an empty payload resets the session and replies `Dialog has been reset.`"""
    engine = FakeEngine()
    make_agent(engine, legacy_topics=True)
    topic = "llama/assistant_response/leg1"
    with Recorder(broker, topic) as recorder:
        for n, text in enumerate(("remember me", "", "who am I?"), start=1):
            recorder.publish("llama/user_input/leg1", text)
            replies = recorder.wait_for(n, topic)
    assert replies == [b"echo: remember me", b"Dialog has been reset.", b"echo: who am I?"]
    assert engine.user_turns() == ["who am I?"]


def test_legacy_project_comes_from_the_configuration(game: Callable[..., Game]) -> None:
    """Which project's prompt serves them is set in the configuration."""
    g = game(FakeEngine(), legacy_project="maze", legacy_driving_project="general")
    g.send("llama/user_input/x1", b"hello")
    g.send("llama/driving/user_input/x1", b"vroom")
    g.replies.wait(2)
    prompts = {system_prompt(g.engine, i) for i in range(2)}
    assert prompts == {g.agent.projects["maze"].system_prompt,
                       g.agent.projects["general"].system_prompt}
    assert g.session("maze", "x1").turns == [("hello", "echo: hello")]
    assert g.session("general", "x1").turns == [("vroom", "echo: vroom")]


# ---- Guarantees ----


@on_the_wire
def test_bad_input_without_a_reply_topic_is_logged(
    make_agent: MakeAgent, broker: Broker, caplog: pytest.LogCaptureFixture,
) -> None:
    """Bad input never stops the agent: it answers with an error where it knows a reply topic
    and logs a warning otherwise."""
    caplog.set_level(logging.WARNING)
    make_agent()
    with Recorder(broker, "general/#") as recorder:
        chat(recorder, "general", sessionId="a#b", message="nowhere to answer")
        chat(recorder, "general", sessionId="after", message="still there?")
        assert recorder.wait_for(1, "general/assistant_response/after") == [b"echo: still there?"]
        time.sleep(QUIET_S)
        replies = [t for t, _ in recorder.messages() if t != "general/user_input"]
    assert replies == ["general/assistant_response/after"]
    wait_until(lambda: any(r.levelno == logging.WARNING and "no reply topic" in r.getMessage()
                           for r in caplog.records))
