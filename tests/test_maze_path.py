"""The maze game's pure rules: grid checks, shortest paths with wall breaks, hint JSON."""

from __future__ import annotations

import json
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from projects.maze_path import (
    MAX_CELLS,
    MAX_SIDE,
    as_cell,
    check_grid,
    fewest_walls_path,
    path_problem,
    wall_towards,
)
from projects.maze_rules import build_hint, model_object, parse_state
from tests.maze_game import LONG, OPEN, SEALED, WALLED, check_hint, make_maze, reachable, state

CONVENTIONS = pytest.mark.parametrize("floor_is_one", [True, False], ids=["1=floor", "1=wall"])


@CONVENTIONS
def test_fewest_walls_path_in_both_conventions(floor_is_one: bool) -> None:
    grid, player, goal = make_maze(OPEN, floor_is_one)
    path = fewest_walls_path(grid, tuple(player), tuple(goal))
    assert path is not None and len(path) - 1 == 12  # the only way round the inner walls
    assert path_problem(grid, path, tuple(player), tuple(goal)) is None
    check_hint({"path": [list(c) for c in path], "breaks_remaining": 0}, grid, player, goal)


@CONVENTIONS
def test_a_wall_break_opens_the_way(floor_is_one: bool) -> None:
    grid, player, goal = make_maze(WALLED, floor_is_one)
    assert fewest_walls_path(grid, tuple(player), tuple(goal), 0) is None
    path = fewest_walls_path(grid, tuple(player), tuple(goal), 1)
    assert path == [(1, 1), (2, 1), (3, 1), (4, 1), (5, 1)]
    assert path_problem(grid, path, tuple(player), tuple(goal)) is not None  # crosses a wall
    assert path_problem(grid, path, tuple(player), tuple(goal), breakable=(4, 1)) is None


def test_fewer_walls_preferred_among_equally_short_paths() -> None:
    layout = ["#####", "#P#.#", "#...#", "#.#E#", "#####"]
    grid, player, goal = make_maze(layout)
    path = fewest_walls_path(grid, tuple(player), tuple(goal), 3)
    assert path is not None and len(path) == 5
    assert all(grid[y][x] == 1 for x, y in path)


def test_start_on_goal_and_exit_marked_with_its_own_value() -> None:
    grid, player, goal = make_maze(OPEN)
    assert fewest_walls_path(grid, (1, 1), (1, 1)) == [(1, 1)]
    grid[goal[1]][goal[0]] = 2  # a client that marks the exit: still reachable
    assert fewest_walls_path(grid, tuple(player), tuple(goal)) is not None


def test_wall_towards_the_exit() -> None:
    grid, player, goal = make_maze(["#####", "#P..#", "##.E#", "#####"])
    assert wall_towards(grid, tuple(player), tuple(goal)) == (1, 2)
    assert wall_towards([[1, 1], [1, 1]], (0, 0), (1, 1)) is None


@pytest.mark.parametrize("rows, message", [
    (None, "non-empty list"),
    ([], "non-empty list"),
    ([[]], "1 to"),
    ([[1, 0], [1]], "ragged"),
    ([[1, 0], "10"], "ragged"),
    ([[1, "0"]], "not an integer"),
    ([[1, True]], "not an integer"),
    ([[1.5, 0]], "not an integer"),
    ([[0]] * (MAX_SIDE + 1), "rows"),
    ([[0] * (MAX_SIDE + 1)], "1 to"),
    ([[0] * 250] * 250, "at most"),
])
def test_malformed_grids(rows: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        check_grid(rows)


def test_cells() -> None:
    assert as_cell([3, 4]) == (3, 4) and as_cell({"x": 3, "y": 4}) == (3, 4)
    assert as_cell([3.0, 4]) == (3, 4)
    for bad in ([3], [3, 4, 5], [3.5, 4], ["3", 4], [True, 4], {"x": 3}, "3,4", None):
        assert as_cell(bad) is None, bad


def test_largest_grid_is_fast() -> None:
    side = int(MAX_CELLS ** 0.5)
    grid = [[1] * side for _ in range(side)]
    for y in range(1, side - 1, 2):  # a serpentine: the longest shortest path there is
        for x in range(side):
            grid[y][x] = 0
        grid[y][side - 1 if y % 4 == 1 else 0] = 1
    started = time.perf_counter()
    path = fewest_walls_path(check_grid(grid), (0, 0), (side - 1, side - 1), 1)
    assert path is not None and time.perf_counter() - started < 2.0


def test_unlimited_breaks_on_the_largest_map_are_fast() -> None:
    """Every cell a wall: the path to the far corner needs a break per step. With 10**18
    breaks (a template could set that) the search took 20 s, a search per break count."""
    side = int(MAX_CELLS ** 0.5)
    grid = [[0] * side for _ in range(side)]
    grid[0][0] = 1
    started = time.perf_counter()
    hint, used = build_hint("", parse_state(state(["P", "E"], "s", visible_map=grid,
                                                  exit_pos=[side - 1, side - 1])), 10**18)
    assert time.perf_counter() - started < 1.0
    assert len(hint["path"]) == 2 * side - 1 and hint["break_wall"] == hint["path"][1]
    assert used == 1


@settings(max_examples=150, deadline=None)
@given(
    cells=st.lists(st.booleans(), min_size=36, max_size=36),
    ends=st.tuples(*[st.integers(0, 5)] * 4),
    breaks=st.integers(0, 2),
    floor_is_one=st.booleans(),
)
def test_paths_agree_with_an_independent_search(cells: list[bool], ends: tuple, breaks: int,
                                                floor_is_one: bool) -> None:
    floor, wall = (1, 0) if floor_is_one else (0, 1)
    grid = [[floor if cells[6 * y + x] else wall for x in range(6)] for y in range(6)]
    player, goal = [ends[0], ends[1]], [ends[2], ends[3]]
    grid[player[1]][player[0]] = floor
    path = fewest_walls_path(grid, tuple(player), tuple(goal), breaks)
    assert (path is not None) == reachable(grid, player, goal, breaks)
    if path is not None:
        walls = [c for c in path if list(c) != goal and grid[c[1]][c[0]] != floor]
        assert len(walls) <= breaks and path[0] == tuple(player) and path[-1] == tuple(goal)
        assert not walls or not reachable(grid, player, goal, len(walls) - 1)  # the fewest
        assert all(abs(a[0] - b[0]) + abs(a[1] - b[1]) == 1 for a, b in zip(path, path[1:], strict=False))


# ---- hints ----


@pytest.mark.parametrize("payload, message", [
    ({"exit_pos": [1, 1], "visible_map": [[1, 1]]}, "player_pos"),
    ({"player_pos": [0, 0], "visible_map": [[1, 1]]}, "exit_pos"),
    ({"player_pos": [0, 0], "exit_pos": [1, 0]}, "visible_map"),
    ({"player_pos": [0, 0], "exit_pos": [1, 0], "visible_map": [[1, 1], [1]]}, "ragged"),
    ({"player_pos": [5, 0], "exit_pos": [1, 0], "visible_map": [[1, 1]]}, "off the 2x1 map"),
    ({"player_pos": [0, 0], "exit_pos": {"x": 0, "y": -1}, "visible_map": [[1, 1]]}, "off the"),
    ({"player_pos": "0,0", "exit_pos": [1, 0], "visible_map": [[1, 1]]}, "player_pos"),
])
def test_bad_states(payload: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_state(payload)


def test_state_message_keys_and_positions() -> None:
    parsed = parse_state(state(OPEN, "s", as_objects=True, germs=[[2, 1], {"x": 3}, "junk"]))
    message = json.loads(parsed.message())
    assert list(message) == ["player_pos", "exit_pos", "visible_map", "germs", "oxygen",
                             "oxygen_collected"]
    assert message["player_pos"] == [1, 1] and message["germs"] == [[2, 1]]


@pytest.mark.parametrize("text, expected", [
    ('{"hint": "go"}', {"hint": "go"}),
    ('```json\n{"hint": "fenced"}\n```', {"hint": "fenced"}),
    ('Sure! Here: {"hint": "inline", "x": {"y": 1}} and {"hint": "second"}', {"hint": "inline", "x": {"y": 1}}),
    ('{broken {"hint": "after"}', {"hint": "after"}),
    ('[{"hint": "in a list"}]', {"hint": "in a list"}),
    ("no JSON at all", None),
    ('{"hint": NaN}', None),
])
def test_model_object(text: str, expected: dict | None) -> None:
    assert model_object(text) == expected


@pytest.mark.parametrize("floor_is_one", [True, False])
def test_plain_text_gets_a_hint_and_a_computed_path(floor_is_one: bool) -> None:
    parsed = parse_state(state(OPEN, "s", floor_is_one))
    hint, used = build_hint("Go right then down! " * 20, parsed, 3)
    assert hint["hint"] == ("Go right then down! " * 20).strip()[:160]
    assert used == 0 and hint["breaks_remaining"] == 3 and "break_wall" not in hint
    assert hint["show_path"] is True and hint["highlight_ms"] == 5000
    assert hint["highlight_zone"] == hint["path"][1:13]
    check_hint(hint, *make_maze(OPEN, floor_is_one))
    json.dumps(hint, allow_nan=False)


def test_model_path_kept_if_valid_else_replaced() -> None:
    parsed = parse_state(state(WALLED, "s"))
    good = [[2, 1], [3, 1], [4, 1], [5, 1]]
    hint, used = build_hint(json.dumps({"hint": "h", "path": good, "break_wall": [4, 1]}), parsed, 2)
    assert hint["path"] == good and hint["break_wall"] == [4, 1] and used == 1
    assert hint["breaks_remaining"] == 1
    for bad in ([[1, 1], [3, 1], [5, 1]], [[1, 1], [2, 1], [3, 1], [4, 1], [5, 1]], [[9, 9]], "x"):
        hint, _ = build_hint(json.dumps({"hint": "h", "path": bad}), parsed, 1)
        check_hint(hint, *make_maze(WALLED))
        assert hint["path"] == [[1, 1], [2, 1], [3, 1], [4, 1], [5, 1]] and hint["break_wall"] == [4, 1]


def test_breaks_run_out() -> None:
    parsed = parse_state(state(WALLED, "s"))
    hint, used = build_hint("no json", parsed, 1)
    assert hint["break_wall"] == [4, 1] and used == 1 and hint["breaks_remaining"] == 0
    hint, used = build_hint('{"hint": "smash", "break_wall": [4, 1]}', parsed, 0)
    assert used == 0 and "break_wall" not in hint and hint["path"] == [] and hint["breaks_remaining"] == 0


def test_a_path_may_cross_as_many_walls_as_breaks_remain() -> None:
    """Two walls and two breaks: the path crosses both, the hint breaks the first (the hint
    for the next state, one break left, names the second)."""
    grid, player, goal = make_maze(SEALED)
    hint, used = build_hint("?", parse_state(state(SEALED, "s")), 2)
    assert hint["path"] == [[x, 1] for x in range(1, 7)] and player == [1, 1] and goal == [6, 1]
    assert hint["break_wall"] == [3, 1] and used == 1 and hint["breaks_remaining"] == 1
    check_hint(hint, grid, player, goal)
    grid[1][3] = grid[1][1]  # the game broke it
    hint, used = build_hint("?", parse_state(state(SEALED, "s", visible_map=grid)), 1)
    assert hint["break_wall"] == [4, 1] and used == 1 and hint["breaks_remaining"] == 0


def test_no_path_within_the_breaks_left() -> None:
    parsed = parse_state(state(SEALED, "s"))
    hint, used = build_hint("?", parsed, 1)
    assert hint["path"] == [] and "highlight_zone" not in hint
    assert hint["break_wall"] == [0, 1] and used == 1  # next to the player, nearest the exit


def test_effects() -> None:
    near = parse_state(state(OPEN, "s", germs=[[2, 2]]))
    assert build_hint("x", near, 3)[0]["freeze_germs_ms"] == 2000
    closer_by_three = parse_state(state(OPEN, "s", germs=[{"x": 3, "y": 2}]))
    hint = build_hint("x", closer_by_three, 3)[0]
    assert hint["slow_germs_ms"] == 2500 and "freeze_germs_ms" not in hint
    far = build_hint("x", parse_state(state(OPEN, "s", germs=[[7, 1]])), 3)[0]
    assert "slow_germs_ms" not in far and "freeze_germs_ms" not in far and "speed_boost_ms" not in far
    model_set = build_hint('{"hint": "h", "slow_germs_ms": 900}', near, 3)[0]
    assert model_set["slow_germs_ms"] == 900 and "freeze_germs_ms" not in model_set
    junk = build_hint('{"hint": "h", "freeze_germs_ms": "lots"}', near, 3)[0]
    assert junk["freeze_germs_ms"] == 2000
    assert build_hint("x", parse_state(state(LONG, "s")), 3)[0]["speed_boost_ms"] == 1500
