"""Part B against a real Mosquitto, with clients written like the game clients: the maze
game (states in both grid conventions, every hint json.loads-ed), a web app that swaps
templates and deletes sessions, and a legacy driving client on llama/driving/..."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from itertools import count

import pytest

from agent.mqtt.legacy import RESET_REPLY
from agent.service.app import Agent
from tests.ack_counter import AckCounter, every_request_acked  # noqa: F401 (a fixture)
from tests.agent_maker import started_agents
from tests.fake_engine import FakeEngine
from tests.maze_game import OPEN, SEALED, WALLED, check_hint, hint_of, make_maze, state
from tests.mqtt_broker import Broker, mosquitto_available
from tests.old_client import OldClient
from tests.test_router import wait_until

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(not mosquitto_available(), reason="mosquitto is not installed"),
    pytest.mark.usefixtures("every_request_acked"),
]
NOT_JSON = "You can do it, follow the glowing path to the exit!"


@pytest.fixture
def make_agent(broker: Broker) -> Iterator[Callable[..., Agent]]:
    with started_agents(broker, lambda: FakeEngine(reply=lambda p, r: NOT_JSON),
                        projects=("maze", "driving", "general")) as make:
        yield make


class MazeGame:
    """Like the pygame and web maze games: publish the state, json.loads every hint."""

    def __init__(self, client: OldClient, session: str) -> None:
        self.client, self.session = client, session
        self.topic = f"maze/hint/{session}"
        client.subscribe(self.topic)

    def send(self, layout: list[str], floor_is_one: bool = True, **fields: object) -> None:
        self.client.publish("maze/state", json.dumps(state(layout, self.session, floor_is_one, **fields)))

    def hints(self, n: int, timeout: float = 10.0) -> list[dict]:
        hints = [hint_of(p) for p in self.client.wait(self.topic, n, timeout)]
        for hint in hints:  # what the games read
            _ = hint.get("hint"), hint.get("path"), hint.get("break_wall"), hint["breaks_remaining"]
        return hints


def test_every_state_gets_one_json_hint_with_a_valid_path(make_agent, client: OldClient) -> None:
    make_agent(FakeEngine(reply=lambda p, r: NOT_JSON, delay=0.05))
    client.subscribe("maze/hint/+")  # like the web game's backend bridge
    games = {(i, convention): MazeGame(client, f"g{i}-{convention}")
             for i in range(3) for convention in (True, False)}
    for (i, floor_is_one), game in games.items():
        for layout in (OPEN, WALLED):
            game.send(layout, floor_is_one, as_objects=i == 1)
    for (_, floor_is_one), game in games.items():
        open_hint, walled_hint = game.hints(2)
        assert open_hint["hint"] == NOT_JSON and "break_wall" not in open_hint
        check_hint(open_hint, *make_maze(OPEN, floor_is_one))
        assert walled_hint["break_wall"] == [4, 1] and walled_hint["breaks_remaining"] == 2
        check_hint(walled_hint, *make_maze(WALLED, floor_is_one))
    time.sleep(0.2)
    assert len(client.messages(prefix="maze/hint/")) == 2 * len(games)  # exactly one per state


TICK_S = 0.05  # the web maze game's 500 ms, ten times faster ...
TICK_LIMIT = 200  # ... against ten times the default --state_rate_limit (20 a second)


def test_every_state_of_a_game_tick_is_answered(make_agent, client: OldClient) -> None:
    """The web maze game at its 500 ms setting got 10 of 30 hints as "Rate limit exceeded"
    (the chat limit, 20 a minute). States have a limit of their own, sized for a tick."""
    make_agent(state_rate_limit=TICK_LIMIT)
    game = MazeGame(client, "tick")
    started = time.monotonic()
    for i in range(30):
        client.wait(game.topic, i, timeout=5)  # the last hint is in before the next tick
        time.sleep(max(0.0, started + i * TICK_S - time.monotonic()))
        game.send(OPEN, oxygenCollected=i)
    hints = game.hints(30)
    assert [h.get("error") for h in hints] == [None] * 30
    for hint in hints:
        check_hint(hint, *make_maze(OPEN))
    time.sleep(0.2)
    assert len(client.messages(game.topic)) == 30


def test_a_burst_of_states_leaves_only_the_newest_waiting(
        make_agent, client: OldClient, request: pytest.FixtureRequest) -> None:
    """While a state is being answered, newer ones replace each other: the newest is answered
    next, the replaced ones get no hint, and their PUBACKs go at once."""
    answering = threading.Event()
    engine = FakeEngine(reply=lambda p, r: (answering.wait(10), NOT_JSON)[1])
    make_agent(engine)
    game = MazeGame(client, "burst")
    game.send(OPEN, oxygenCollected=0)
    wait_until(lambda: len(engine.requests) == 1)
    for i in range(1, 6):
        game.send(OPEN, oxygenCollected=i)
    acks: AckCounter = request.getfixturevalue("every_request_acked")
    try:
        with acks.cond:  # 6 states in; the 4 replaced acknowledged, 2 still held
            assert acks.cond.wait_for(lambda: sum(acks.delivered.values()) == 6
                                      and sum(acks.acked.values()) == 4, 5)
        assert len(engine.requests) == 1 and not client.messages(game.topic)
    finally:
        answering.set()
    assert len(game.hints(2)) == 2
    time.sleep(0.3)
    assert len(client.messages(game.topic)) == 2 and len(engine.requests) == 2
    assert [json.loads(engine.user_turns(i)[-1])["oxygen_collected"] for i in (0, 1)] == [0, 5]


@pytest.mark.parametrize("payload, error", [
    ({"sessionId": "bad", "exit_pos": [1, 1], "visible_map": [[1, 1], [1, 1]]}, "player_pos"),
    ({"sessionId": "bad", "player_pos": {"x": 0, "y": 0}, "visible_map": [[1, 1]]}, "exit_pos"),
    ({"sessionId": "bad", "player_pos": [0, 0], "exit_pos": [1, 1], "visible_map": [[1, 1], [1]]},
     "ragged"),
    ({"sessionId": "bad", "player_pos": [9, 0], "exit_pos": [1, 0], "visible_map": [[1, 1]]}, "off the"),
    ({"sessionId": "bad", "player_pos": [0, 0], "exit_pos": [1, 0], "visible_map": [[1] * 400] * 400},
     "at most"),
], ids=["no-player", "no-exit", "ragged", "off-grid", "huge"])
def test_bad_states_get_a_json_error_and_the_agent_stays_up(
    make_agent, client: OldClient, payload: dict, error: str
) -> None:
    make_agent()
    game = MazeGame(client, "bad")
    client.publish("maze/state", json.dumps(payload))
    [reply] = game.hints(1)
    assert error in reply["error"] and reply["breaks_remaining"] == 3
    game.send(OPEN)
    check_hint(game.hints(2)[-1], *make_maze(OPEN))


def test_web_app_swaps_templates_and_deletes_sessions(make_agent, client: OldClient) -> None:
    engine = FakeEngine()
    agent = make_agent(engine)
    assert client.ask("general", "w1", "hello") == "echo: hello"
    client.publish("general/template/w1", json.dumps({"template": "You are a pirate."}))
    client.publish("general/template", json.dumps({"systemPrompt": "New default."}))
    assert client.ask("general", "w1", "ahoy?") == "echo: ahoy?"
    assert engine.prompts[-1].startswith("<|im_start|>system\nYou are a pirate.<|im_end|>")
    assert engine.user_turns() == ["ahoy?"]  # reset by default
    client.ask("general", "w2", "new here")
    assert engine.prompts[-1].startswith("<|im_start|>system\nNew default.<|im_end|>")
    client.publish("general/delete_session", json.dumps({"sessionId": "w1"}))
    time.sleep(0.2)
    assert agent.core.sessions.store.get(("general", "w1")) is None
    assert agent.core.sessions.store.get(("general", "w2")) is not None
    game = MazeGame(client, "m1")
    client.publish("maze/template/m1", json.dumps({"prompt_template": {"content": "Guide me."},
                                                   "max_breaks": 5}))
    assert game.hints(1) == [{"hint": "Template updated", "breaks_remaining": 5}]
    client.publish("maze/clear_history", json.dumps({"session_id": "m1"}))
    assert game.hints(2)[-1] == {"hint": "History cleared", "breaks_remaining": 5}


def legacy_handshake(client: OldClient) -> str:
    client.subscribe("llama/session/response")
    client.publish("llama/session", b"hello", qos=0)
    sid = client.wait("llama/session/response")[-1]
    assert len(sid) == 10 and int(sid, 16) >= 0
    return sid


def test_legacy_driving_client(make_agent, client: OldClient) -> None:
    turn = count()
    replies = ["Go go go!", "Green light, go! <Cont><PlayerOp:accelerate><AgentOP:keep>"]
    make_agent(FakeEngine(reply=lambda p, r: replies[min(next(turn), 1)]), legacy_topics=True)
    sid = legacy_handshake(client)
    topic = f"llama/driving/assistant_response/{sid}"
    client.subscribe(topic)
    client.publish(f"llama/driving/user_input/{sid}", "Can I go now?", qos=0)
    assert client.wait(topic) == [replies[1]]  # the first lacked its tags: generated again
    client.publish(f"llama/driving/user_input/{sid}", b"", qos=0)
    assert client.wait(topic, 2)[-1] == RESET_REPLY
    client.subscribe(f"llama/assistant_response/{sid}")
    client.publish(f"llama/user_input/{sid}", "hi", qos=0)
    assert client.wait(f"llama/assistant_response/{sid}")[-1] == replies[1]


def test_legacy_topics_absent_without_the_flag(make_agent, client: OldClient) -> None:
    engine = FakeEngine()
    agent = make_agent(engine)
    assert not any(t.startswith("llama/") for t, _ in agent.mqtt.subscriptions)
    client.subscribe("llama/#")
    client.publish("llama/session", b"hello", qos=0)
    client.publish("llama/driving/user_input/abc", b"hi", qos=0)
    assert client.ask("general", "alive", "x") == "echo: x"
    time.sleep(0.2)
    assert [t for t, _ in client.messages(prefix="llama/")] == ["llama/session", "llama/driving/user_input/abc"]
    assert engine.user_turns() == ["x"]


def test_no_subscription_catches_a_reply(make_agent, client: OldClient) -> None:
    engine = FakeEngine()
    agent = make_agent(engine, legacy_topics=True)
    for topic, _ in agent.mqtt.subscriptions:
        assert "#" not in topic and not any(s in topic for s in ("assistant_response", "hint", "/response"))
    for topic in ("maze/hint/x", "maze/assistant_response/x", "llama/assistant_response/x",
                  "llama/session/response", "maze/template/x/deeper"):
        client.publish(topic, json.dumps({"sessionId": "x", "message": "loop?", "template": "t"}))
    assert client.ask("maze", "alive", "x") == "echo: x"
    assert engine.user_turns() == ["x"] and agent.core.sessions.store.get(("maze", "x")) is None


# ---- the tiny real model ----


@pytest.fixture
def real_engine() -> Iterator[Callable[[], object]]:
    import torch

    from engine import create_engine
    from engine.api import EngineConfig
    from tests.checkpoints import tiny_checkpoint
    from tests.test_end_to_end import RecordingEngine

    before = torch.get_num_threads()
    torch.set_num_threads(1)  # 2 busy cores: more threads only contend

    def make() -> RecordingEngine:
        return RecordingEngine(create_engine(EngineConfig(
            model_path=str(tiny_checkpoint("llama")), device="cpu", dtype="float32", max_model_len=1024)))

    yield make
    torch.set_num_threads(before)


def test_real_model_hints_templates_and_breaks(make_agent, client: OldClient, real_engine) -> None:
    engine = real_engine()
    make_agent(engine, max_tokens=12)
    games = [MazeGame(client, f"real-{convention}") for convention in (True, False)]
    for game, floor_is_one in zip(games, (True, False), strict=True):
        game.send(OPEN, floor_is_one)
    for game, floor_is_one in zip(games, (True, False), strict=True):
        [hint] = game.hints(1, timeout=30)
        check_hint(hint, *make_maze(OPEN, floor_is_one))
        assert hint["path"] and hint["path"][-1] == make_maze(OPEN)[2]
    # a template for one session: its prompt changes, the other's does not
    game, other = games
    client.publish(f"maze/template/{game.session}", json.dumps({"template": "Pirate guide.", "max_breaks": 1}))
    assert game.hints(2)[-1] == {"hint": "Template updated", "breaks_remaining": 1}
    other.send(OPEN, False)
    for n, layout in enumerate((WALLED, WALLED, SEALED)):  # a state once the last is answered
        game.send(layout)
        game.hints(n + 3, timeout=30)
    hints = game.hints(5, timeout=30)[2:]
    assert [h.get("break_wall") for h in hints] == [[4, 1], None, None]
    assert [h["breaks_remaining"] for h in hints] == [0, 0, 0]
    for hint, layout in zip(hints, (WALLED, WALLED, SEALED), strict=True):
        check_hint(hint, *make_maze(layout))
    other.hints(2, timeout=30)
    prompts = [engine.tokenizer.decode(p, skip_special_tokens=False) for p in engine.prompts]
    pirate = [p for p in prompts if "Pirate guide." in p]
    assert len(pirate) == 3 and all("guide inside a maze game" not in p for p in pirate)
    assert sum("guide inside a maze game" in p for p in prompts) == 3  # 2 first states + other's
    # no session named: the default for new sessions only
    client.publish("maze/template", json.dumps({"template": "Default robot."}))
    newcomer = MazeGame(client, "real-new")
    newcomer.send(OPEN)
    other.send(OPEN, False)
    newcomer.hints(1, timeout=30)
    other.hints(3, timeout=30)
    prompts = [engine.tokenizer.decode(p, skip_special_tokens=False) for p in engine.prompts[-2:]]
    assert sum("Default robot." in p for p in prompts) == 1
