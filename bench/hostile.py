"""The adversarial run of issue 15, measured again: what a hostile or an unlucky client gets.

    python bench/hostile.py             # every scenario (about a minute)
    python bench/hostile.py backlog     # one or more by name

Each scenario runs the agent (a fake engine: the request path, not the model) against a
private Mosquitto 2.0 and prints one line: what was tried, the figure now and the figure
the issue measured before the fixes. docs/RELIABILITY.md keeps the table.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import secrets
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from agent.core.outcome import OVERLOADED, SHUTTING_DOWN  # noqa: E402
from agent.service.app import Agent  # noqa: E402
from agent.service.config import AgentConfig  # noqa: E402
from tests.fake_engine import FakeEngine  # noqa: E402
from tests.mqtt_broker import Broker, Recorder, start_broker  # noqa: E402

RESULTS: list[tuple[str, str, str]] = []  # scenario, now, before


def report(name: str, now: str, before: str) -> None:
    RESULTS.append((name, now, before))
    print(f"{name:<44} {now:<58} before: {before}", flush=True)


def settings(broker: Broker, **overrides: Any) -> AgentConfig:
    base: dict[str, Any] = {
        "projects": ("general",), "mqtt_broker": broker.host, "mqtt_port": broker.port,
        "agent_id": f"hostile-{secrets.token_hex(3)}", "stats_interval": 0,
        "reconnect_max_delay": 0.5}
    return AgentConfig(**{**base, **overrides})


class Client(Recorder):
    """A requester: every reply under its own reply root, counted by topic."""

    def __init__(self, broker: Broker, protocol: str = "5", persistent: bool = False) -> None:
        self.name = f"c{secrets.token_hex(3)}"
        super().__init__(broker, f"general/assistant_response/{self.name}/#",
                         f"general/assistant_response/+/{self.name}", protocol=protocol,
                         client_id=self.name, persistent=persistent)

    def ask(self, key: str, wait: bool = True, **fields: Any) -> None:
        payload = {"sessionId": key, "message": f"m-{key}",
                   "replyTopic": f"general/assistant_response/{self.name}/{key}", **fields}
        self.publish("general/user_input", json.dumps(payload), wait=wait)

    def by_key(self) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {}
        for topic, payload in self.messages():
            out.setdefault(topic.rsplit("/", 1)[-1], []).append(payload.decode())
        return out

    def settle(self, n: int, timeout: float) -> dict[str, list[str]]:
        self.holds_within(lambda: len(self.messages()) >= n, timeout)
        time.sleep(0.3)
        return self.by_key()


@contextmanager
def serving(broker: Broker, config: AgentConfig, engine: FakeEngine, **client_options: Any) -> Iterator[Client]:
    """An agent on ``config`` started, and a client of ``broker``; both stopped at the end."""
    agent = Agent(config, engine)
    agent.start()
    client = Client(broker, **client_options)
    try:
        yield client
    finally:
        client.close()
        agent.stop()


def retries(broker: Broker) -> None:
    """Item 1: refused requests retried with the same requestId."""
    with serving(broker, settings(broker, max_queue=4, max_requests_per_session=2,
                                  rate_limit_window=1.0), FakeEngine(delay=0.3)) as client:
        for i in range(40):  # QoS 0 would not wait for room: these are refused at once
            client._client.publish("general/user_input", json.dumps({
                "sessionId": f"o{i}", "message": f"m-o{i}", "requestId": f"r{i}",
                "replyTopic": f"general/assistant_response/{client.name}/o{i}"}), qos=0)
        first = client.settle(40, 20)
        refused = [k for k, v in first.items() if v == [OVERLOADED]]
        time.sleep(0.5)
        for key in refused:
            client.ask(key, requestId=f"r{key[1:]}")
        again = client.settle(40 + len(refused), 30)
        served = sum(again[k][-1] == f"echo: m-{k}" for k in refused)
        report("overloaded, retried with the same requestId", f"{served} of {len(refused)} answered",
               "0 of 36 answered (silence)")
        for i in range(3):
            client.ask("limit", requestId=f"l{i}")
        time.sleep(1.1)
        client.ask("limit", requestId="l2")
        client.ask("empty", requestId="e1", message="   ")
        client.ask("empty", requestId="e1", message="fixed")
        got = client.settle(len(client.messages()) + 6, 10)
        answers = got["limit"].count("echo: m-limit")
        report("rate limited, retried after its window", f"{answers} of 3 answered",
               "2 of 3 (the retry: silence)")
        report("`Error: empty message`, fixed, same requestId",
               f"fixed one answered: {'echo: fixed' in got['empty']}", "False (silence)")


def backlog(broker: Broker) -> None:
    """Item 2: 1,200 requests queued at the broker while the agent was away; the agent holds
    32 (--max_queue) and answers in 50 ms."""
    for protocol in ("5", "3.1.1"):
        for roomy in (False, True):
            target = start_broker(listener_options=["max_queued_messages 2000"]) if roomy else broker
            config = settings(target, mqtt_protocol=protocol, max_requests_per_session=10_000,
                              max_requests_per_client=10_000, max_queue=32)
            first = Agent(config, FakeEngine())
            first.start()
            first.stop()
            client = Client(target)
            for i in range(1200):
                client.ask(f"b{i}", wait=i % 100 == 99)
            agent = Agent(config, FakeEngine(delay=0.05))
            agent.start()
            try:
                got = client.settle(1200 if roomy else 1000, 60)
                replies = Counter(v for values in got.values() for v in values)
                broker_limit = "2000" if roomy else "1000 (default)"
                report(f"backlog 1200, MQTT {protocol}, max_queued {broker_limit}",
                       f"{replies[OVERLOADED]} overloaded, {1200 - len(got)} lost",
                       "MQTT 5: 744 overloaded, 200 lost; 3.1.1: 692, 200"
                       if not roomy else "-")
            finally:
                client.close()
                agent.stop()
                if roomy:
                    target.stop()


def sigterm(broker: Broker) -> None:
    """Item 2: requests waiting when SIGTERM comes (MQTT 3.1.1)."""
    config = settings(broker, mqtt_protocol="3.1.1", max_requests_per_session=10_000,
                      max_requests_per_client=10_000, shutdown_timeout=1.0)
    client = Client(broker, protocol="3.1.1", persistent=True)
    agent = Agent(config, FakeEngine(delay=0.5))
    agent.start()
    for i in range(60):
        client.ask(f"t{i % 6}-{i}", wait=False)
    time.sleep(0.3)
    stopper = threading.Thread(target=agent.stop_gracefully)
    stopper.start()
    for i in range(60, 100):
        client.ask(f"t{i % 6}-{i}", wait=False)
    stopper.join()
    after = Agent(config, FakeEngine())
    after.start()
    try:
        got = client.settle(100, 30)
        errors = sum(SHUTTING_DOWN in v for v in got.values())
        report("SIGTERM with 100 requests coming (3.1.1)",
               f"{errors} shutting-down errors, {len(got) - errors} answered, "
               f"{100 - len(got)} lost", "57 shutting-down errors")
    finally:
        client.close()
        after.stop()


def restart(broker: Broker) -> None:
    """Item 4: the broker restarted (SIGTERM, persistence on) during a burst of 200."""
    for with_ids in (True, False):
        _restart_once(broker, with_ids)


def _restart_once(broker: Broker, with_ids: bool) -> None:
    generated: Counter[str] = Counter()

    def numbered(prompt: str, request: Any) -> str:
        generated[prompt] += 1
        return f"answer {sum(generated.values())}"  # a second generation: another text

    with serving(broker, settings(broker, mqtt_protocol="3.1.1", max_requests_per_session=10_000,
                                  max_requests_per_client=10_000), FakeEngine(numbered, delay=0.01),
                 protocol="3.1.1", persistent=True) as client:
        for i in range(200):
            if i == 100:
                client.holds_within(lambda: len(client.messages()) >= 20, 10)
                broker.restart()
            fields = {"requestId": f"r{i}"} if with_ids else {}
            client.ask(f"d{i}", wait=False, **fields)
        got = client.settle(200, 30)
        twice = [v for v in got.values() if len(v) > 1]
        other = sum(len(set(v)) > 1 for v in twice)
        report(f"broker restart in a burst of 200, {'with' if with_ids else 'no'} requestId",
               f"{len(twice)} replies twice, {other} of them another text",
               "1 twice (same text)" if with_ids else "4 twice, other texts")


def twins(broker: Broker) -> None:
    """Item 3: two agents with the same --agent_id, 300 requests."""
    for protocol in ("3.1.1", "5"):
        _twins_once(broker, protocol)


def _twins_once(broker: Broker, protocol: str) -> None:
    config = settings(broker, mqtt_protocol=protocol, max_requests_per_session=10_000,
                      max_requests_per_client=10_000)
    first = Agent(config, FakeEngine(reply=lambda p, r: "first"))
    first.start()
    time.sleep(1.1)
    second = Agent(config, FakeEngine(reply=lambda p, r: "second"))
    started, stopped = time.monotonic(), [float("nan")]

    def run() -> None:
        try:
            second.run_forever()
        except Exception:  # noqa: BLE001 - the second agent is meant to stop: the figure
            stopped[0] = time.monotonic() - started

    threading.Thread(target=run, daemon=True).start()
    client = Client(broker)
    try:
        for i in range(300):
            client.ask(f"w{i}", wait=False)
            time.sleep(0.02)
        got = client.settle(300, 30)
        twice = sum(len(v) > 1 for v in got.values())
        report(f"two agents, one agent_id, 300 requests ({protocol})",
               f"the second stopped after {stopped[0]:.1f} s; {twice} answered twice",
               "15 and 28 reconnects in 23 s, 43 answered twice")
    finally:
        client.close()
        second.stop()
        first.stop()


def rss_mb() -> float:
    with open(f"/proc/{os.getpid()}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def memory(broker: Broker) -> None:
    """Item 5: 600 rate-limited requests with 0.99 MB requestIds."""
    with serving(broker, settings(broker, max_requests_per_session=1, max_payload_bytes=2_000_000),
                 FakeEngine()) as client:
        before = rss_mb()
        huge = "x" * 990_000
        for i in range(600):
            client.ask("mem", wait=i % 50 == 49, requestId=f"{i}{huge}")
        client.settle(600, 60)
        grown = rss_mb() - before
        report("600 requests with 0.99 MB requestIds", f"RSS +{grown:.0f} MB (the ids refused)",
               "RSS +571 MB, kept 600 s")


def rotation(broker: Broker) -> None:
    """Item 8: 2,000 requests from one client, a new sessionId each."""
    with serving(broker, settings(broker), FakeEngine()) as client:
        for i in range(2000):  # PROTOCOL.md's deep reply topic: <sessionId>/<clientId>
            client.ask(f"rot{i}", wait=i % 100 == 99,
                       replyTopic=f"general/assistant_response/rot{i}/{client.name}")
        client.settle(2000, 60)
        passed = sum(p.startswith(b"echo") for p in client.payloads())
        report("2000 requests, a new sessionId each", f"{passed} answered, the rest rate limited",
               "2000 answered")


def template(broker: Broker) -> None:
    """Item 7: a 900k-character P/template for the project."""
    with serving(broker, settings(broker), FakeEngine()) as client:
        client.publish("general/template", json.dumps({"template": "w " * 450_000}))
        client.ask("after-template")
        got = client.settle(1, 10).get("after-template", ["(no reply in 10 s)"])
        report("900k-character project template", f"a new session then gets: {got[0]!r}",
               "every new session: 'Error: the message is too long'")


def deadlines(broker: Broker) -> None:
    """Item 17: a client that waits 0.5 s for an answer that takes 1 s."""
    with serving(broker, settings(broker), FakeEngine(delay=1.0)) as client:
        client.ask("slow", timeoutS=0.5)
        time.sleep(2.0)
        got = client.by_key()["slow"]
        report("timeoutS 0.5 s, answer after 1 s", f"{got}", "the late answer, 100 s later")


SCENARIOS = {"retries": retries, "backlog": backlog, "sigterm": sigterm, "restart": restart,
             "twins": twins,
             "memory": memory, "rotation": rotation, "template": template, "deadlines": deadlines}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("only", nargs="*", help=f"scenarios to run: {', '.join(SCENARIOS)}")
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)  # the agents' own lines are not the figures
    unknown = set(args.only) - set(SCENARIOS)
    if unknown:
        parser.error(f"unknown scenarios: {', '.join(sorted(unknown))}")
    broker = start_broker(persistence=True)
    try:
        for name in args.only or SCENARIOS:
            SCENARIOS[name](broker)
    finally:
        broker.stop()


if __name__ == "__main__":
    main()
