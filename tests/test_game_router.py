"""Part B without a broker (tests/game_harness.py): maze hints, control topics, output rules,
legacy topics."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator

import pytest

from agent.core.rate_limit import RATE_LIMITED
from agent.mqtt.legacy import RESET_REPLY
from projects import maze_plugin
from projects.maze_rules import MAX_BREAKS, MazeState, build_hint
from tests.fake_engine import FakeEngine
from tests.game_harness import Game, scripted, system_prompt
from tests.maze_game import OPEN, WALLED, check_hint, make_maze, state
from tests.test_router import wait_until

NOT_JSON = "Head east, brave little cell, and mind the germs!"


@pytest.fixture
def game() -> Iterator[Callable[..., Game]]:
    games: list[Game] = []

    def make(engine: FakeEngine | None = None, **overrides: object) -> Game:
        games.append(Game(engine or FakeEngine(reply=lambda p, r: NOT_JSON), **overrides))
        return games[-1]

    yield make
    for g in games:
        g.agent.core.stop()


@pytest.mark.parametrize("floor_is_one", [True, False], ids=["1=floor", "1=wall"])
@pytest.mark.parametrize("as_objects", [False, True], ids=["lists", "objects"])
def test_state_not_json_reply_gets_one_json_hint(game, floor_is_one: bool, as_objects: bool) -> None:
    g = game()
    g.send("maze/state", state(OPEN, "s1", floor_is_one, as_objects))
    [hint] = g.hints("s1", 1)
    assert hint["hint"] == NOT_JSON and hint["breaks_remaining"] == 3 and hint["show_path"] is True
    check_hint(hint, *make_maze(OPEN, floor_is_one))
    assert len(hint["path"]) == 13
    sent = json.loads(g.engine.user_turns()[-1])
    assert set(sent) == {"player_pos", "exit_pos", "visible_map", "germs", "oxygen", "oxygen_collected"}
    assert system_prompt(g.engine).startswith("You are the guide inside a maze game")
    time.sleep(0.05)
    assert len(g.replies.items) == 1


@pytest.mark.parametrize("payload, error", [
    ({"sessionId": "b", "exit_pos": [1, 1], "visible_map": [[1, 1], [1, 1]]}, "player_pos"),
    ({"sessionId": "b", "player_pos": [0, 0], "exit_pos": [1, 1], "visible_map": [[1, 1], [1]]}, "ragged"),
    ({"sessionId": "b", "player_pos": [0, 7], "exit_pos": [1, 1], "visible_map": [[1, 1]]}, "off the"),
    ({"sessionId": "b", "player_pos": [0, 0], "exit_pos": [1, 1], "visible_map": [[1] * 300] * 300},
     "at most"),
    ({"sessionId": "b", "player_pos": [0, 0], "exit_pos": [1, 0], "visible_map": [[1, 1]],
      "prompt_template": 7}, "prompt_template"),
], ids=["no-player", "ragged", "off-grid", "huge", "bad-template"])
def test_bad_states_get_a_json_error(game, payload: dict, error: str) -> None:
    g = game()
    g.send("maze/state", payload)
    [reply] = g.hints("b", 1)
    assert error in reply["error"] and reply["breaks_remaining"] == 3
    assert g.engine.requests == []
    g.send("maze/state", state(OPEN, "b"))
    assert "path" in g.hints("b", 2)[-1]  # still serving


def test_unparsable_states(game) -> None:
    g = game(max_payload_bytes=5000)
    g.send("maze/state", b"not json")
    g.send("maze/state", b"[1, 2]")
    g.send("maze/state", json.dumps({"sessionId": "big", "visible_map": [[0] * 3000]}).encode())
    assert all("error" in h for h in g.hints("default", 2))
    assert "too large" in g.hints("big", 1)[0]["error"]


def test_engine_errors_and_rate_limit_are_json(game) -> None:
    g = game(state_rate_limit=2)
    g.engine.fail = "out of memory"
    for _ in range(3):  # within a second: one state too many
        g.send("maze/state", state(OPEN, "e"))
    errors = sorted(h["error"] for h in g.hints("e", 3))
    assert errors == [RATE_LIMITED.removeprefix("Error: "), "out of memory", "out of memory"]
    assert all(h["breaks_remaining"] == 3 for h in g.hints("e", 3))


def test_breaks_run_out_after_max_breaks(game) -> None:
    g = game()
    g.send("maze/template/w", {"max_breaks": 2, "reset": False})
    assert g.hints("w", 1) == [{"hint": "Template updated", "breaks_remaining": 2}]
    for n in range(3):  # like a game: the next state once this one's hint is in
        g.send("maze/state", state(WALLED, "w"))
        g.hints("w", n + 2)
    hints = g.hints("w", 4)[1:]
    assert [h.get("break_wall") for h in hints] == [[4, 1], [4, 1], None]
    assert [h["breaks_remaining"] for h in hints] == [1, 0, 0]
    assert hints[-1]["path"] == []
    for h in hints:
        check_hint(h, *make_maze(WALLED))
    g.send("maze/clear_history", {"sessionId": "w"})  # a new game: breaks back to the maximum
    assert g.hints("w", 5)[-1] == {"hint": "History cleared", "breaks_remaining": 2}


def test_model_json_is_kept_and_augmented(game) -> None:
    reply = '```json\n{"hint": "Break it!", "path": [[2, 1], [3, 1], [4, 1], [5, 1]], "break_wall": [4, 1]}\n```'
    g = game(FakeEngine(reply=lambda p, r: reply))
    g.send("maze/state", state(WALLED, "j", germs=[[2, 2]]))
    [hint] = g.hints("j", 1)
    assert hint["hint"] == "Break it!" and hint["path"][0] == [2, 1] and hint["break_wall"] == [4, 1]
    assert hint["freeze_germs_ms"] == 2000 and hint["breaks_remaining"] == 2


def test_template_swap_for_one_session_and_for_new_sessions(game) -> None:
    g = game(FakeEngine())
    for sid in ("a", "b"):
        g.send("general/user_input", {"sessionId": sid, "message": f"hello {sid}"})
    g.replies.wait(2)
    g.send("general/template/a", {"template": "You are a pirate."})
    g.send("general/template", {"sessionId": "b", "prompt_template": {"content": "You are a poet."},
                                "reset": False})
    g.send("general/user_input", {"sessionId": "a", "message": "again"})
    g.replies.wait(3)
    assert system_prompt(g.engine) == "You are a pirate." and g.engine.user_turns() == ["again"]
    g.send("general/user_input", {"sessionId": "b", "message": "again"})
    g.replies.wait(4)
    assert system_prompt(g.engine) == "You are a poet." and g.engine.user_turns() == ["hello b", "again"]
    g.send("general/template", {"system_prompt": "You are a robot."})  # new sessions only
    for sid in ("a", "c"):
        g.send("general/user_input", {"sessionId": sid, "message": "x"})
    g.replies.wait(6)
    prompts = {r.metadata["session_id"]: system_prompt(g.engine, i) for i, r in enumerate(g.engine.requests)}
    assert prompts["a"] == "You are a pirate." and prompts["c"] == "You are a robot."
    assert len(g.replies.items) == 6  # no acknowledgement outside maze


def test_clear_and_delete_do_what_they_say(game) -> None:
    g = game(FakeEngine())
    for project, sid in [("general", "a"), ("general", "b"), ("driving", "a")]:
        g.send(f"{project}/user_input", {"sessionId": sid, "message": "hi", "systemPrompt": f"P-{sid}"})
    g.replies.wait(3)
    g.send("general/clear_history/a", b"")
    assert g.session("general", "a").turns == [] and g.session("general", "a").system_prompt == "P-a"
    assert g.session("general", "b").turns and g.session("driving", "a").turns
    g.send("general/clear_history", {"target": "all"})
    assert g.session("general", "b").turns == [] and g.session("driving", "a").turns
    g.send("general/delete_session", {"session_id": "a"})
    assert g.session("general", "a") is None and g.session("general", "b") is not None
    g.send("general/delete_session", b"")
    assert g.session("general", "b") is None and g.session("driving", "a") is not None
    time.sleep(0.05)
    assert len(g.replies.items) == 3  # no replies to clear / delete outside maze


def test_bad_control_messages(game) -> None:
    g = game(FakeEngine())
    g.send("maze/template/m", {"template": 42})
    g.send("maze/template/m", b"not json")
    g.send("general/template", {"reset": True})
    errors = g.hints("m", 2)
    assert all("error" in e and e["breaks_remaining"] == 3 for e in errors)
    g.send("maze/user_input", {"sessionId": "m", "message": "still here?"})
    assert g.replies.wait(3)[-1] == ("maze/assistant_response/m", "echo: still here?")


def test_change_during_a_turn_in_flight_is_not_overwritten(game) -> None:
    g = game(FakeEngine())
    for sid in ("f", "g"):
        g.send("general/user_input", {"sessionId": sid, "message": "first", "systemPrompt": "Mine."})
    g.replies.wait(2)
    g.engine.delay = 0.3
    g.send("general/user_input", {"sessionId": "f", "message": "slow"})
    g.send("general/user_input", {"sessionId": "g", "message": "slow"})
    wait_until(lambda: len(g.engine.requests) == 4)
    g.send("general/clear_history/f", b"")
    g.send("general/delete_session/g", b"")
    assert [p for _, p in g.replies.wait(4)[2:]] == ["echo: slow", "echo: slow"]  # answered
    assert g.session("general", "f").turns == [] and g.session("general", "f").system_prompt == "Mine."
    assert g.session("general", "g") is None  # not recreated by the turn in flight


def test_driving_reply_without_tags_is_regenerated_once(game) -> None:
    g = game(FakeEngine(reply=scripted("Brake!", "Brake now. <Cont><PlayerOp:brake><AgentOP:keep>")))
    g.send("driving/user_input", {"sessionId": "d", "message": "red light", "temperature": 0})
    assert g.replies.wait(1)[0][1] == "Brake now. <Cont><PlayerOp:brake><AgentOP:keep>"
    assert len(g.engine.requests) == 2 and g.engine.requests[1].sampling.temperature == 0.7
    assert g.agent.stats()["agent"]["output_rules"]["driving"] == {"regenerated": 1, "repaired": 0}
    assert g.session("driving", "d").turns[-1][1].endswith("<AgentOP:keep>")


def test_driving_reply_still_without_tags_gets_inferred_ones(game, caplog) -> None:
    g = game(FakeEngine(reply=scripted("Slow down, a cat!")))
    g.send("driving/user_input", {"sessionId": "d", "message": "what now?"})
    assert g.replies.wait(1)[0][1] == "Slow down, a cat! <Cont><PlayerOp:brake><AgentOP:keep>"
    assert len(g.engine.requests) == 2
    assert g.agent.core.stats()["output_rules"]["driving"] == {"regenerated": 1, "repaired": 1}
    assert "repaired by driving_rules" in caplog.text and "a cat" not in caplog.text


def test_bloodcell_reply_cut_to_its_word_limit(game) -> None:
    long = "I love oxygen. " + "It is so very cool to carry it everywhere in the body all day long. " * 3
    g = game(FakeEngine(reply=scripted(long)))
    g.send("bloodcell/user_input", {"sessionId": "c", "message": "hi", "maxTokens": 400})
    assert g.replies.wait(1)[0][1] == "I love oxygen. It is so very cool to carry it everywhere in the body all day long."
    assert len(g.engine.requests) == 1


def test_legacy_topics(game) -> None:
    g = game(FakeEngine(reply=scripted("Go!", "Go! <Cont><PlayerOp:accelerate><AgentOP:keep>", "Hello!")))
    g.send("llama/session", b"hi")
    [(topic, sid)] = g.replies.wait(1)
    assert topic == "llama/session/response" and len(sid) == 10 and int(sid, 16) >= 0
    g.send(f"llama/driving/user_input/{sid}", b"Can I go?")
    assert g.replies.wait(2)[-1] == (f"llama/driving/assistant_response/{sid}",
                                     "Go! <Cont><PlayerOp:accelerate><AgentOP:keep>")
    assert g.session("driving", sid).turns == [("Can I go?", "Go! <Cont><PlayerOp:accelerate><AgentOP:keep>")]
    g.send(f"llama/user_input/{sid}", b"Hi there")
    assert g.replies.wait(3)[-1] == (f"llama/assistant_response/{sid}", "Hello!")
    g.send(f"llama/driving/user_input/{sid}", b"")
    assert g.replies.wait(4)[-1] == (f"llama/driving/assistant_response/{sid}", RESET_REPLY)
    assert g.session("driving", sid) is None and g.session("general", sid) is not None


def test_an_empty_model_answer_still_gets_the_path(game) -> None:
    g = game(FakeEngine(reply=lambda p, r: "<think>hmm</think>"))
    g.send("maze/state", state(OPEN, "empty"))
    [hint] = g.hints("empty", 1)
    assert hint["hint"] == "" and "error" not in hint
    check_hint(hint, *make_maze(OPEN))


def test_max_breaks_beyond_the_largest_map_is_refused(game) -> None:
    """10**18 breaks once made every search of the session take seconds; no path on the
    largest map accepted crosses more walls than MAX_BREAKS."""
    g = game()
    g.send("maze/template/w", {"max_breaks": 10**18, "reset": False})
    [refused] = g.hints("w", 1)
    assert refused["error"].startswith(f"max_breaks must be an integer from 0 to {MAX_BREAKS}")
    assert refused["breaks_remaining"] == 3  # unchanged
    g.send("maze/template", {"max_breaks": MAX_BREAKS + 1})  # nor as the project's default
    g.send("maze/template/w", {"max_breaks": MAX_BREAKS, "reset": False})
    assert g.hints("w", 2)[-1] == {"hint": "Template updated", "breaks_remaining": MAX_BREAKS}
    g.send("maze/state", state(WALLED, "new"))
    assert g.hints("new", 1)[0]["breaks_remaining"] == 2  # the default 3, less the break


def test_a_slow_search_does_not_hold_up_another_sessions_hint(game, monkeypatch) -> None:
    """The hint of session "slow" is held inside its search (build_hint); session "quick"
    still gets its hint at once: no lock that every session shares is held across a search."""
    searching, release = threading.Event(), threading.Event()
    slow_grid = make_maze(OPEN)[0]

    def held_build_hint(text: str, state: MazeState, breaks: int) -> tuple[dict, int]:
        if state.grid == slow_grid:
            searching.set()
            release.wait(10)
        return build_hint(text, state, breaks)

    monkeypatch.setattr(maze_plugin, "build_hint", held_build_hint)
    g = game()
    try:
        g.send("maze/state", state(OPEN, "slow"))
        assert searching.wait(5)
        g.send("maze/state", state(WALLED, "quick"))
        assert g.hints("quick", 1, timeout=3)[0]["break_wall"] == [4, 1]
        assert not g.replies.on("maze/hint/slow")
    finally:
        release.set()
    check_hint(g.hints("slow", 1)[0], *make_maze(OPEN))
