"""The maze hint's worst path search: seconds for one hint on the largest maps accepted.

    python bench/maze_search.py            # each map once, breaks 10**18 (and 3)

Each map is 200 x 200 (``MAX_CELLS``), player in one corner, exit in the other; the
hint is built with ``breaks_remaining`` 10**18 (what a template could set before
``max_breaks`` was bounded) and with 3 (the default), and the slowest is printed last.
The maps are the worst ones found for the search: all walls (every step a break), a
wall every other column (one break per two steps), half walls at random, no walls, and a
serpentine (the longest path there is).
"""

from __future__ import annotations

import random
import sys
import time
from collections.abc import Iterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from projects.maze_path import MAX_CELLS  # noqa: E402
from projects.maze_rules import MazeState, build_hint  # noqa: E402

SIDE = int(MAX_CELLS ** 0.5)
Map = list[list[int]]  # 1 = floor


def maps() -> Iterator[tuple[str, Map]]:
    walls = [[0] * SIDE for _ in range(SIDE)]
    walls[0][0] = 1
    yield "all walls", walls
    yield "stripes", [[0 if x % 2 else 1 for x in range(SIDE)] for _ in range(SIDE)]
    rng = random.Random(1)
    noise = [[int(rng.random() < 0.5) for _ in range(SIDE)] for _ in range(SIDE)]
    noise[0][0] = 1
    yield "random half", noise
    yield "open", [[1] * SIDE for _ in range(SIDE)]
    snake = [[1] * SIDE for _ in range(SIDE)]
    for y in range(1, SIDE - 1, 2):
        snake[y] = [0] * SIDE
        snake[y][SIDE - 1 if y % 4 == 1 else 0] = 1
    yield "serpentine", snake


def main() -> None:
    worst = 0.0
    for name, grid in maps():
        state = MazeState(grid, (0, 0), (SIDE - 1, SIDE - 1))
        for breaks in (10**18, 3):
            started = time.perf_counter()
            hint, _used = build_hint("", state, breaks)
            seconds = time.perf_counter() - started
            worst = max(worst, seconds)
            print(f"{name:12s} breaks {breaks:<20d} {seconds:6.3f} s  path {len(hint['path'])} cells")
    print(f"worst: {worst:.3f} s")


if __name__ == "__main__":
    main()
