"""Maze fixtures written like the game clients: mazes in both grid conventions, state
payloads, and an oracle for hints that does not use the agent's own path code."""

from __future__ import annotations

import json
from collections import deque

# '#' wall, '.' floor, 'P' player, 'E' exit (both on floor cells)
OPEN = [
    "#########",
    "#P..#...#",
    "#.#.#.#.#",
    "#.#...#E#",
    "#########",
]
WALLED = [  # the exit is only reachable through one wall ('x' marks it)
    "#######",
    "#P..#E#",
    "#...x.#",
    "#######",
]
SEALED = [  # the exit is behind two walls: no path with at most one break
    "########",
    "#P.##.E#",
    "########",
]
LONG = ["#" * 26, "#P" + "." * 22 + "E#", "#" * 26]  # 23 steps: speed boost


def make_maze(layout: list[str], floor_is_one: bool = True) -> tuple[list[list[int]], list[int], list[int]]:
    """(visible_map, player [x, y], exit [x, y]) in one convention or the other."""
    floor, wall = (1, 0) if floor_is_one else (0, 1)
    grid, player, exit_ = [], None, None
    for y, row in enumerate(layout):
        grid.append([wall if c in "#x" else floor for c in row])
        if "P" in row:
            player = [row.index("P"), y]
        if "E" in row:
            exit_ = [row.index("E"), y]
    assert player is not None and exit_ is not None
    return grid, player, exit_


def state(layout: list[str], session: str, floor_is_one: bool = True, as_objects: bool = False,
          germs: list | None = None, **extra: object) -> dict:
    """A maze/state payload like the pygame game (lists) or the web game ({x, y} objects)."""
    grid, player, exit_ = make_maze(layout, floor_is_one)
    pos = (lambda c: {"x": c[0], "y": c[1]}) if as_objects else (lambda c: c)
    return {"sessionId": session, "player_pos": pos(player), "exit_pos": pos(exit_),
            "visible_map": grid, "germs": list(germs or []),
            "oxygenPellets": [], "oxygenCollected": 0, **extra}


def reachable(grid: list[list[int]], start: list[int], goal: list[int], breaks: int) -> bool:
    """Whether a path with at most ``breaks`` walls exists (independent of the agent's code)."""
    floor = grid[start[1]][start[0]]
    seen = {(start[0], start[1], 0)}
    todo = deque(seen)
    while todo:
        x, y, b = todo.popleft()
        if [x, y] == goal:
            return True
        for nx, ny in ((x + 1, y), (x - 1, y), (x, y + 1), (x, y - 1)):
            if not (0 <= ny < len(grid) and 0 <= nx < len(grid[0])):
                continue
            nb = b + (grid[ny][nx] != floor and [nx, ny] != goal)
            if nb <= breaks and (nx, ny, nb) not in seen:
                seen.add((nx, ny, nb))
                todo.append((nx, ny, nb))
    return False


def check_hint(hint: dict, grid: list[list[int]], player: list[int], goal: list[int]) -> None:
    """What the game needs of a hint: its path starts at (or next to) the player, ends at the
    exit and steps between neighbours; its first wall is the one break_wall names, and it
    crosses no more walls than there are breaks (later hints name the others)."""
    assert isinstance(hint.get("breaks_remaining"), int) and hint["breaks_remaining"] >= 0, hint
    path = hint["path"]
    assert isinstance(path, list), hint
    if not path:
        return
    floor = grid[player[1]][player[0]]
    cells = [list(c) for c in path]
    assert all(len(c) == 2 and all(isinstance(v, int) for v in c) for c in cells), hint
    first = cells[0]
    assert abs(first[0] - player[0]) + abs(first[1] - player[1]) <= 1, hint
    for a, b in zip(cells, cells[1:], strict=False):
        assert abs(a[0] - b[0]) + abs(a[1] - b[1]) == 1, (a, b, hint)
    assert cells[-1] == goal, hint
    walls = [c for c in cells if c != goal and grid[c[1]][c[0]] != floor]
    assert not walls or walls[0] == hint.get("break_wall"), (walls, hint)
    assert len(walls) <= hint["breaks_remaining"] + 1, (walls, hint)


def hint_of(payload: str | bytes) -> dict:
    """What the game does with a hint payload: json.loads, then read its fields."""
    hint = json.loads(payload)
    assert isinstance(hint, dict), payload
    return hint
