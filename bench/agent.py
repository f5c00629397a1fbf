"""The agent's own cost: requests/s and added latency against a bare paho echo responder.

    python bench/agent.py                       # 1, 10 and 100 concurrent clients, 3 x 2 s each
    python bench/agent.py --clients 10 --seconds 10 --log_level WARNING

A private Mosquitto is started on a free port. Two services run beside it, each
in its own process: the agent (projects ``general``) with an *instant* engine
(it answers ``pong`` from inside ``submit``: no model, no timer thread; a short
request is then served whole on the agent's MQTT thread, whereas the real engine
answers from its loop thread and one hand-off to a worker remains), and the
floor any Python MQTT service pays: a paho client that subscribes, reads the
request's ``replyTopic`` and publishes the payload back there (QoS 1). The load
generator, a third process, runs N closed-loop clients (each sends its next
request when the reply to the last one arrives; every request a new session, so
no rate limit or history), spread over at most 10 connections, QoS 1 both
ways. For each N the echo run goes first, then the agent's; the first second of
each run is warm-up and is not counted. Added latency is the agent's percentile
minus the echo's. Echo and agent runs alternate ``--rounds`` times per N and are
pooled, so that a change in the machine's load during the bench hits both alike.
CPU per request is the service process's CPU time (user +
system) over the whole run divided by the replies it sent: on a busy machine
it moves far less than the rates do.
"""

from __future__ import annotations

import argparse
import json
import logging
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import paho.mqtt.client as mqtt  # noqa: E402
import psutil  # noqa: E402
from paho.mqtt.enums import CallbackAPIVersion  # noqa: E402

from tests.mqtt_broker import start_broker  # noqa: E402

MAX_CONNECTIONS = 10
WARMUP_S = 1.0
SERVICES = {"echo": "echo/user_input", "agent": "general/user_input"}


# ---------------------------------------------------------------- services (child processes)


def _connect(port: int, client_id: str) -> mqtt.Client:
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5)
    client.on_socket_open = _no_delay  # as the agent's own connection does
    client.connect("127.0.0.1", port)
    return client


def _no_delay(client: mqtt.Client, userdata: object, sock: socket.socket) -> None:
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def serve_echo(port: int) -> None:
    client = _connect(port, "bench-echo")

    def on_message(c: mqtt.Client, userdata: object, message: mqtt.MQTTMessage) -> None:
        c.publish(json.loads(message.payload)["replyTopic"], message.payload, qos=1)

    subscribed = threading.Event()
    client.on_message = on_message
    client.on_subscribe = lambda *a: subscribed.set()
    client.loop_start()
    client.subscribe(SERVICES["echo"], qos=1)
    subscribed.wait(10)
    print("ready", flush=True)
    sys.stdin.read()  # until the parent closes our stdin
    client.disconnect()
    client.loop_stop()


def serve_agent(port: int, log_level: str, log_file: str) -> None:
    logging.basicConfig(level=log_level, filename=log_file,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from agent.service.app import Agent
    from agent.service.config import AgentConfig
    from tests.fake_engine import InstantEngine  # answers inside submit: no engine time
    from vLLMDeploy import freeze_start_up_objects

    config = AgentConfig(projects=("general",), mqtt_broker="127.0.0.1", mqtt_port=port,
                         agent_id="bench", max_queue=100_000, max_requests_per_session=10**6,
                         stats_interval=0, connect_timeout=10)
    with Agent(config, InstantEngine()):
        freeze_start_up_objects()  # as the launcher does before serving
        print("ready", flush=True)
        sys.stdin.read()


# ---------------------------------------------------------------- load generator


class Load:
    """N closed-loop clients over at most MAX_CONNECTIONS connections."""

    def __init__(self, port: int, service: str, n: int) -> None:
        self.request_topic = SERVICES[service]
        self.n = n
        self.running = False
        self.lock = threading.Lock()
        self.sent_at: dict[int, float] = {}
        self.seq = [0] * n
        self.latencies: list[tuple[float, float]] = []  # (finished at, seconds)
        self.conns = [_connect(port, f"bench-load-{service}-{n}-{i}")
                      for i in range(min(n, MAX_CONNECTIONS))]
        for i, conn in enumerate(self.conns):
            done = threading.Event()
            conn.on_subscribe = lambda *a, done=done: done.set()
            conn.on_message = self._on_reply
            conn.loop_start()
            conn.subscribe([(self._reply_topic(c), 1) for c in range(i, n, len(self.conns))])
            assert done.wait(10), "no SUBACK"

    @staticmethod
    def _reply_topic(c: int) -> str:
        return f"general/assistant_response/bench/c{c}"

    def _send(self, c: int) -> None:
        self.seq[c] += 1
        payload = json.dumps({"sessionId": f"c{c}-{self.seq[c]}", "message": "ping",
                              "replyTopic": self._reply_topic(c)})
        self.sent_at[c] = time.perf_counter()
        self.conns[c % len(self.conns)].publish(self.request_topic, payload, qos=1)

    def _on_reply(self, conn: mqtt.Client, userdata: object, message: mqtt.MQTTMessage) -> None:
        now = time.perf_counter()
        c = int(message.topic.rsplit("c", 1)[1])
        with self.lock:
            self.latencies.append((now, now - self.sent_at[c]))
            if self.running:
                self._send(c)

    def run(self, seconds: float, service: psutil.Process) -> Sample:
        """The latencies after the warm-up, and the ``service`` process's CPU time."""
        cpu = sum(service.cpu_times()[:2])
        self.running = True
        with self.lock:
            for c in range(self.n):
                self._send(c)
        start = time.perf_counter()
        time.sleep(WARMUP_S + seconds)
        with self.lock:
            self.running = False
        time.sleep(0.5)  # let the last replies drain
        cpu_s = sum(service.cpu_times()[:2]) - cpu
        counted = [lat for at, lat in self.latencies
                   if start + WARMUP_S <= at <= start + WARMUP_S + seconds]
        for conn in self.conns:
            conn.disconnect()
            conn.loop_stop()
        if not counted:
            raise RuntimeError("no replies: is the service up?")
        return Sample(counted, seconds, cpu_s, len(self.latencies))


@dataclass
class Sample:
    """Runs of one service at one concurrency, pooled."""

    latencies: list[float] = field(default_factory=list)  # counted (after warm-up), s
    seconds: float = 0.0  # measured
    cpu_s: float = 0.0  # the service's CPU time over the whole runs
    replies: int = 0  # over the whole runs (warm-up included), for CPU per request

    def add(self, other: Sample) -> None:
        self.latencies += other.latencies
        self.seconds += other.seconds
        self.cpu_s += other.cpu_s
        self.replies += other.replies

    def figures(self) -> tuple[float, float, float, float]:
        """Requests/s, p50 and p99 latency (ms), CPU ms per request."""
        lat = sorted(self.latencies)
        pick = lambda q: lat[min(len(lat) - 1, int(q * len(lat)))] * 1000  # noqa: E731
        return (len(lat) / self.seconds, pick(0.50), pick(0.99),
                self.cpu_s * 1000 / max(1, self.replies))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clients", default="1,10,100", help="concurrencies, comma-separated")
    parser.add_argument("--seconds", type=float, default=2.0, help="measured seconds per run")
    parser.add_argument("--rounds", type=int, default=3,
                        help="echo and agent runs alternate this many times per concurrency "
                             "(pooled), so that drift on a busy machine hits both alike")
    parser.add_argument("--log_level", default="INFO", help="the agent's log level (to a file)")
    parser.add_argument("--serve", choices=list(SERVICES), help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--log_file", default="/dev/null", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve == "echo":
        return serve_echo(args.port)
    if args.serve == "agent":
        return serve_agent(args.port, args.log_level, args.log_file)

    # Mosquitto's default leaves Nagle on: a reply written after the request's PUBACK then
    # waits ~40 ms for a delayed ACK. Production brokers (and ours, see docs) turn it off.
    broker = start_broker(listener_options=["set_tcp_nodelay true"])
    children = []
    try:
        for kind in SERVICES:
            child = subprocess.Popen(
                [sys.executable, __file__, "--serve", kind, "--port", str(broker.port),
                 "--log_level", args.log_level, "--log_file", str(broker.workdir / "agent.log")],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
            children.append(child)
            assert child.stdout is not None and child.stdout.readline().strip() == "ready", kind
        rows = []
        services = [psutil.Process(child.pid) for child in children]
        for n in (int(x) for x in args.clients.split(",")):
            echo, agent = Sample(), Sample()
            for _ in range(args.rounds):
                echo.add(Load(broker.port, "echo", n).run(args.seconds, services[0]))
                agent.add(Load(broker.port, "agent", n).run(args.seconds, services[1]))
            rows.append((n, echo.figures(), agent.figures()))
            print(f"{n} clients: echo {rows[-1][1][0]:.0f}/s, agent {rows[-1][2][0]:.0f}/s",
                  file=sys.stderr)
    finally:
        for child in children:
            child.communicate("", timeout=30)
        broker.stop()
    print("| clients | echo req/s | agent req/s | agent / echo | echo p50 ms | agent p50 ms "
          "| added p50 ms | echo p99 ms | agent p99 ms | added p99 ms | echo CPU ms/req "
          "| agent CPU ms/req |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for n, (e_rps, e50, e99, e_cpu), (a_rps, a50, a99, a_cpu) in rows:
        print(f"| {n} | {e_rps:.0f} | {a_rps:.0f} | {a_rps / e_rps:.0%} | {e50:.2f} | {a50:.2f} "
              f"| {a50 - e50:+.2f} | {e99:.2f} | {a99:.2f} | {a99 - e99:+.2f} | {e_cpu:.3f} "
              f"| {a_cpu:.3f} |")


if __name__ == "__main__":
    main()
