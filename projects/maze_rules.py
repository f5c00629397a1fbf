"""The maze game's hint rules: game state -> the model's user message; model text -> one JSON hint.

Part B of PROTOCOL.md. Pure: the plug-in (``projects/maze_plugin.py``) keeps the
per-session wall-break count and publishes what these functions return.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from typing import Any

from projects.maze_path import (
    MAX_CELLS,
    Cell,
    as_cell,
    check_grid,
    fewest_walls_path,
    floor_value,
    in_bounds,
    is_wall,
    path_problem,
    wall_towards,
    walls_on,
)

DEFAULT_MAX_BREAKS = 3
MAX_BREAKS = MAX_CELLS  # no path on the largest map accepted crosses more walls
HINT_CHARS = 160
HIGHLIGHT_CELLS, HIGHLIGHT_MS = 12, 5000
FREEZE_RANGE, FREEZE_MS = 2, 2000
SLOW_RANGE, SLOW_MS = 3, 2500
BOOST_STEPS, BOOST_MS = 20, 1500
_EFFECTS = ("freeze_germs_ms", "slow_germs_ms", "speed_boost_ms", "highlight_ms")
_FENCE_RE = re.compile(r"```[A-Za-z0-9_-]*[ \t]*\n?(.*?)```", re.DOTALL)
_MAX_OBJECT_STARTS = 64  # '{' positions tried when looking for the first JSON object


@dataclass(frozen=True)
class MazeState:
    grid: list[list[int]]
    player: Cell
    exit: Cell
    germs: tuple[Cell, ...] = ()
    oxygen: tuple[Cell, ...] = ()
    oxygen_collected: int | float = 0

    def message(self) -> str:
        """The model's user message: compact JSON, positions as [x, y]."""
        return json.dumps({
            "player_pos": list(self.player),
            "exit_pos": list(self.exit),
            "visible_map": self.grid,
            "germs": [list(c) for c in self.germs],
            "oxygen": [list(c) for c in self.oxygen],
            "oxygen_collected": self.oxygen_collected,
        }, separators=(",", ":"))


def _cells(value: object, limit: int = MAX_CELLS) -> tuple[Cell, ...]:
    """The well-formed positions of a list (others are skipped); () for anything else."""
    if not isinstance(value, list):
        return ()
    cells = (as_cell(v) for v in value[:limit])
    return tuple(c for c in cells if c is not None)


def _position(data: dict, key: str, grid: list[list[int]]) -> Cell:
    cell = as_cell(data.get(key))
    if cell is None:
        raise ValueError(f"{key} must be [x, y] or {{\"x\": x, \"y\": y}} with integer coordinates")
    if not in_bounds(grid, cell):
        raise ValueError(f"{key} {list(cell)} is off the {len(grid[0])}x{len(grid)} map")
    return cell


def parse_state(data: dict) -> MazeState:
    """A ``maze/state`` payload as a MazeState, or ValueError saying what is wrong."""
    grid = check_grid(data.get("visible_map"))
    collected = data.get("oxygenCollected", data.get("oxygen_collected", 0))
    if isinstance(collected, bool) or not isinstance(collected, (int, float)) \
            or not math.isfinite(collected):
        collected = 0
    return MazeState(
        grid=grid,
        player=_position(data, "player_pos", grid),
        exit=_position(data, "exit_pos", grid),
        germs=_cells(data.get("germs")),
        oxygen=_cells(data.get("oxygenPellets", data.get("oxygen"))),
        oxygen_collected=collected,
    )


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")  # NaN / Infinity: JavaScript clients cannot parse them


def _load_object(text: str) -> dict | None:
    try:
        value = json.loads(text, parse_constant=_no_constants)
    except (ValueError, RecursionError):
        return None
    return value if isinstance(value, dict) else None


def model_object(text: str) -> dict | None:
    """The model's JSON object: the whole text, a fenced block, or the first {...} in it."""
    for candidate in [text, *(m.group(1) for m in _FENCE_RE.finditer(text))]:
        found = _load_object(candidate.strip())
        if found is not None:
            return found
    decoder = json.JSONDecoder(parse_constant=_no_constants)
    start = text.find("{")
    for _ in range(_MAX_OBJECT_STARTS):
        if start < 0:
            break
        try:
            value, _end = decoder.raw_decode(text, start)
        except (ValueError, RecursionError):
            value = None
        if isinstance(value, dict):
            return value
        start = text.find("{", start + 1)
    return None


def _path(value: object) -> list[Cell] | None:
    """A list of [x, y] int pairs (every item well formed), else None."""
    if not isinstance(value, list) or not value or len(value) > MAX_CELLS:
        return None
    cells = [as_cell(v) if isinstance(v, list) else None for v in value]
    return None if any(c is None for c in cells) else cells  # type: ignore[return-value]


def _route(obj: dict, state: MazeState, breaks: int) -> tuple[list[Cell], Cell | None]:
    """The path and the wall to break: the model's if valid on the grid, else computed.

    Breaks are scarce: a computed path crosses as few walls as it can (none where there is a
    way round), up to the ``breaks`` left (PROTOCOL.md). One hint names one ``break_wall``,
    the first wall on the path; the hints for the states that follow name the next ones.
    """
    grid, player, goal = state.grid, state.player, state.exit
    floor = floor_value(grid, player)
    wanted = as_cell(obj.get("break_wall"))
    if wanted is None or breaks <= 0 or not in_bounds(grid, wanted) or wanted in (player, goal) \
            or not is_wall(grid, wanted, floor):
        wanted = None
    given = _path(obj.get("path"))
    if given is not None and path_problem(grid, given, player, goal, wanted) is None:
        return given, wanted
    path = fewest_walls_path(grid, player, goal, breaks)
    if path is None:
        return [], wanted or (wall_towards(grid, player, goal) if breaks > 0 else None)
    crossed = walls_on(grid, path, floor, goal)
    return path, crossed[0] if crossed else wanted


def _duration(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) \
        and math.isfinite(value) and value >= 0


def build_hint(text: str, state: MazeState, breaks_remaining: int) -> tuple[dict, int]:
    """The JSON hint for the model's ``text`` and the breaks it uses (0 or 1)."""
    breaks = max(0, breaks_remaining)
    obj = model_object(text)
    obj = dict(obj) if obj is not None else {"hint": text.strip()[:HINT_CHARS]}
    for key in _EFFECTS:
        if key in obj and not _duration(obj[key]):
            del obj[key]  # a value the game cannot use: as if the model had not set it
    path, wall = _route(obj, state, breaks)
    obj["path"] = [list(c) for c in path]
    obj.pop("break_wall", None)
    if wall is not None:
        obj["break_wall"] = list(wall)
    obj["show_path"] = True
    moves = path[1:] if path and path[0] == state.player else path
    obj.pop("highlight_zone", None)
    if moves:
        obj["highlight_zone"] = [list(c) for c in moves[:HIGHLIGHT_CELLS]]
        obj.setdefault("highlight_ms", HIGHLIGHT_MS)
    px, py = state.player
    nearest = min((abs(x - px) + abs(y - py) for x, y in state.germs), default=None)
    if "freeze_germs_ms" not in obj and "slow_germs_ms" not in obj and nearest is not None:
        if nearest <= FREEZE_RANGE:
            obj["freeze_germs_ms"] = FREEZE_MS
        elif nearest <= SLOW_RANGE:
            obj["slow_germs_ms"] = SLOW_MS
    if "speed_boost_ms" not in obj and len(moves) >= BOOST_STEPS:
        obj["speed_boost_ms"] = BOOST_MS
    used = 1 if wall is not None else 0
    obj["breaks_remaining"] = breaks - used
    return obj, used


def error_reply(message: str, breaks_remaining: int) -> dict:
    return {"error": message, "breaks_remaining": max(0, breaks_remaining)}
