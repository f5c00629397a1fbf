"""A maze game on a timer: how many of its states get a hint, and how many are refused.

    python bench/maze_tick.py                    # 30 states, one every 500 ms (the web game)
    python bench/maze_tick.py --interval 0.1 --states 100 --engine_delay 0.3

A private Mosquitto, the agent (project ``maze``, default settings otherwise) with a
fake engine that answers after ``--engine_delay`` s, and one game client that publishes
its state every ``--interval`` s whatever came back, as the web maze game does. Printed:
hints, of which errors "Rate limit exceeded", and states replaced before they were
answered (no hint: PROTOCOL.md, game states).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from agent.service.app import Agent  # noqa: E402
from agent.service.config import AgentConfig  # noqa: E402
from tests.fake_engine import FakeEngine  # noqa: E402
from tests.maze_game import OPEN, state  # noqa: E402
from tests.mqtt_broker import start_broker  # noqa: E402
from tests.old_client import OldClient  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--states", type=int, default=30)
    parser.add_argument("--interval", type=float, default=0.5, help="seconds between states")
    parser.add_argument("--engine_delay", type=float, default=0.1, help="seconds per answer")
    args = parser.parse_args()
    broker = start_broker()
    agent = Agent(AgentConfig(projects=("maze",), mqtt_broker=broker.host, mqtt_port=broker.port),
                  FakeEngine(reply=lambda p, r: "Go east!", delay=args.engine_delay))
    agent.start()
    client = OldClient(broker)
    topic = "maze/hint/tick"
    try:
        client.subscribe(topic)
        started = time.monotonic()
        for i in range(args.states):
            time.sleep(max(0.0, started + i * args.interval - time.monotonic()))
            client.publish("maze/state", json.dumps(state(OPEN, "tick", oxygenCollected=i)))
        time.sleep(args.engine_delay + 1.0)  # the last answers
        hints = [json.loads(p) for _, p in client.messages(topic)]
        limited = sum("Rate limit" in h.get("error", "") for h in hints)
        superseded = agent.door.plugins["maze"].host.states.superseded
        print(f"{args.states} states every {args.interval:g} s, engine {args.engine_delay:g} s: "
              f"{len(hints)} hints, {limited} rate limited, {superseded} replaced unanswered")
    finally:
        client.close()
        agent.stop()
        broker.stop()


if __name__ == "__main__":
    main()
