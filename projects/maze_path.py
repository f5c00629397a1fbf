"""Maze geometry for the maze game's hints: grid checks and shortest paths with wall breaks.

Pure functions on plain lists (no agent, no MQTT), so the rules are tested in
milliseconds. Cells are ``(x, y)``; a grid is a list of rows, ``grid[y][x]``.
Clients disagree on the encoding (one uses 1 = floor, another 1 = wall), so the
floor value is whatever lies under the player; every other value is a wall that
a break may open. The exit is always passable, whatever value marks it.
"""

from __future__ import annotations

from collections.abc import Sequence
from heapq import heappop, heappush

Cell = tuple[int, int]  # (x, y)
Grid = Sequence[Sequence[int]]

MAX_SIDE = 256  # rows or columns
MAX_CELLS = 40_000  # a 200 x 200 maze; far beyond any game's screen
_STEPS = ((1, 0), (-1, 0), (0, 1), (0, -1))


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_grid(rows: object) -> list[list[int]]:
    """``rows`` as a rectangular list of int rows, or ValueError saying what is wrong."""
    if not isinstance(rows, list) or not rows:
        raise ValueError("visible_map must be a non-empty list of rows")
    if len(rows) > MAX_SIDE:
        raise ValueError(f"visible_map has {len(rows)} rows; at most {MAX_SIDE} are accepted")
    width = len(rows[0]) if isinstance(rows[0], list) else 0
    if not 0 < width <= MAX_SIDE or width * len(rows) > MAX_CELLS:
        raise ValueError(f"visible_map rows must hold 1 to {MAX_SIDE} cells "
                         f"and the map at most {MAX_CELLS} cells")
    for y, row in enumerate(rows):
        if not isinstance(row, list) or len(row) != width:
            raise ValueError(f"visible_map is ragged: row {y} does not hold {width} cells")
        if not all(_is_int(v) for v in row):
            raise ValueError(f"visible_map row {y} holds a value that is not an integer")
    return rows  # type: ignore[return-value]


def as_cell(value: object) -> Cell | None:
    """``[x, y]`` or ``{"x": x, "y": y}`` with integer coordinates (2.0 counts), else None."""
    if isinstance(value, dict):
        value = [value.get("x"), value.get("y")]
    if not isinstance(value, (list, tuple)) or len(value) != 2:
        return None
    out = []
    for v in value:
        if isinstance(v, float) and v.is_integer():
            v = int(v)
        if not _is_int(v):
            return None
        out.append(v)
    return out[0], out[1]


def in_bounds(grid: Grid, cell: Cell) -> bool:
    x, y = cell
    return 0 <= y < len(grid) and 0 <= x < len(grid[0])


def floor_value(grid: Grid, player: Cell) -> int:
    """The value that means "floor" in this client's grid: the one under the player."""
    return grid[player[1]][player[0]]


def is_wall(grid: Grid, cell: Cell, floor: int) -> bool:
    return grid[cell[1]][cell[0]] != floor


def neighbours(grid: Grid, cell: Cell) -> list[Cell]:
    x, y = cell
    return [(x + dx, y + dy) for dx, dy in _STEPS if in_bounds(grid, (x + dx, y + dy))]


def fewest_walls_path(grid: Grid, start: Cell, goal: Cell, max_breaks: int = 0) -> list[Cell] | None:
    """The path from ``start`` to ``goal`` (both included) that crosses the fewest walls, and
    of those the shortest; None if every path crosses more than ``max_breaks`` walls.

    Breaks are scarce, steps are not (PROTOCOL.md): the cost is (walls, steps), compared in
    that order. One Dijkstra pass over the cells, O(cells log cells) whatever ``max_breaks``
    is (a search per break count cost O(cells * breaks) each: seconds on a 200 x 200 map).
    """
    if start == goal:
        return [start]
    width, size = len(grid[0]), len(grid) * len(grid[0])
    floor = floor_value(grid, start)
    wall = [v != floor for row in grid for v in row]
    target = goal[1] * width + goal[0]
    wall[target] = False  # the exit is passable, whatever marks it
    source = start[1] * width + start[0]
    # cost = walls * size + steps (a path has fewer than ``size`` steps): ints order by walls,
    # then steps; a heap item is cost * size + cell, so equal costs pop in cell order
    cost_cap = (min(max(0, max_breaks), size) + 1) * size
    best = [cost_cap] * size
    parent = [-1] * size
    best[source] = 0
    heap = [source]
    while heap:
        cost, cell = divmod(heappop(heap), size)
        if cell == target:
            break
        if cost > best[cell]:
            continue  # reached more cheaply since this item was pushed
        x = cell % width
        for nxt in (cell + 1 if x + 1 < width else -1, cell - 1 if x else -1,
                    cell + width if cell + width < size else -1, cell - width):
            if nxt < 0:
                continue
            step = cost + 1 + (size if wall[nxt] else 0)
            if step < best[nxt]:
                best[nxt], parent[nxt] = step, cell
                heappush(heap, step * size + nxt)
    if best[target] >= cost_cap:
        return None
    path: list[Cell] = []
    cell = target
    while cell >= 0:
        path.append((cell % width, cell // width))
        cell = parent[cell]
    return path[::-1]


def walls_on(grid: Grid, path: Sequence[Cell], floor: int, goal: Cell) -> list[Cell]:
    """The wall cells ``path`` crosses (the goal never counts)."""
    return [c for c in path if c != goal and is_wall(grid, c, floor)]


def wall_towards(grid: Grid, player: Cell, goal: Cell) -> Cell | None:
    """The wall next to the player that is nearest the goal (Manhattan), if any."""
    floor = floor_value(grid, player)
    walls = [c for c in neighbours(grid, player) if is_wall(grid, c, floor)]
    return min(walls, key=lambda c: (abs(c[0] - goal[0]) + abs(c[1] - goal[1]), c), default=None)


def path_problem(
    grid: Grid, path: Sequence[Cell], player: Cell, goal: Cell, breakable: Cell | None = None
) -> str | None:
    """Why ``path`` is no valid route from the player to the goal, or None if it is one.

    It must start on the player's cell or next to it, move one cell at a time
    within the grid, end on the goal, and cross no wall but ``breakable``.
    """
    if not path:
        return "it is empty"
    floor = floor_value(grid, player)
    if any(not in_bounds(grid, c) for c in path):
        return "it leaves the grid"
    if path[0] != player and path[0] not in neighbours(grid, player):
        return "it does not start at the player"
    for a, b in zip(path, path[1:], strict=False):
        if abs(a[0] - b[0]) + abs(a[1] - b[1]) != 1:
            return f"{list(a)} and {list(b)} are not adjacent"
    if path[-1] != goal:
        return "it does not end at the exit"
    if any(c != breakable for c in walls_on(grid, path, floor, goal)):
        return "it crosses a wall that is not broken"
    return None
