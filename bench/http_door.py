"""The HTTP door against the MQTT door, on one agent process and one engine, in the same run.

    python bench/http_door.py                        # 1, 8 and 32 streaming clients, 2 x 8 s each
    python bench/http_door.py --clients 1,8 --seconds 5

One ``vLLMDeploy.py`` serves the tiny demo model on the CPU (the model the demo trains; a
real engine, paged KV cache, prefix cache) to both doors: a private Mosquitto for MQTT and
``--http_port`` for HTTP. N closed-loop clients (each sends its next request when the last
reply is complete), every request a new conversation of one question, streamed: HTTP with
the ``openai`` client (``stream=True``), MQTT with part C's ``"stream": true``. Time to first
token is the first content delta's arrival. HTTP and MQTT runs alternate ``--rounds``
times per N and are pooled. Then a 5-turn HTTP chat, resent whole each turn, against
agents with and without prefix caching: each later turn's time to first token and the
prompt tokens the cache served.
"""

from __future__ import annotations

import argparse
import json
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import openai  # noqa: E402
import paho.mqtt.client as mqtt  # noqa: E402
from paho.mqtt.enums import CallbackAPIVersion  # noqa: E402

from agent.demo.demo_model import cached_demo_checkpoint  # noqa: E402
from projects.demo_corpus import DEMO_PROMPTS, dialogues  # noqa: E402
from tests.mqtt_broker import start_broker  # noqa: E402

QUESTION = DEMO_PROMPTS["general"]
MAX_TOKENS = 32


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_agent(model: Path, broker_port: int, caching: bool, log: Path) -> tuple[subprocess.Popen, int]:
    port = free_port()
    command = [sys.executable, str(ROOT / "vLLMDeploy.py"), "--projects", "general",
               "--model", str(model), "--device", "cpu", "--mqtt_port", str(broker_port),
               "--http_port", str(port), "--max_model_len", "1024", "--max_tokens",
               str(MAX_TOKENS), "--max_requests_per_session", "1000000", "--max_queue", "1024",
               "--log_level", "WARNING", "--agent_id", f"bench-{uuid.uuid4().hex[:6]}",
               "--enable_prefix_caching", "true" if caching else "false"]
    process = subprocess.Popen(command, cwd=ROOT, stdout=log.open("w"), stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 180
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2):
                return process, port
        except OSError:
            if process.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"the agent did not start:\n{log.read_text()[-3000:]}") from None
            time.sleep(0.3)


def stop_agent(process: subprocess.Popen) -> None:
    process.send_signal(signal.SIGTERM)
    process.wait(60)


# ---------------------------------------------------------------- one client each


def http_client(port: int, stop_at: float, out: list[tuple[float, float]]) -> None:
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="bench", max_retries=0)
    while time.monotonic() < stop_at:
        started, first = time.perf_counter(), None
        for chunk in client.chat.completions.create(
                model="general", stream=True, max_tokens=MAX_TOKENS, temperature=0,
                messages=[{"role": "user", "content": QUESTION}]):
            if first is None and chunk.choices and chunk.choices[0].delta.content:
                first = time.perf_counter()
        end = time.perf_counter()
        out.append(((first or end) - started, end - started))


def mqtt_client(broker_port: int, stop_at: float, out: list[tuple[float, float]]) -> None:
    me = uuid.uuid4().hex[:8]
    reply_topic = f"general/assistant_response/bench-{me}"
    events: dict[str, float] = {}
    cond = threading.Condition()

    def on_message(c: mqtt.Client, u: object, msg: mqtt.MQTTMessage) -> None:
        with cond:
            if msg.topic.endswith("/stream"):
                data = json.loads(msg.payload)
                if data["delta"] and "first" not in events:
                    events["first"] = time.perf_counter()
            else:
                events["done"] = time.perf_counter()
            cond.notify_all()

    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"bench-{me}",
                         protocol=mqtt.MQTTv5)
    client.on_message = on_message
    client.on_socket_open = _no_delay  # as the agent's own connection does (and bench/agent.py)
    client.connect("127.0.0.1", broker_port)
    client.loop_start()
    client.subscribe([(reply_topic, 1), (reply_topic + "/stream", 0)])
    time.sleep(0.3)
    n = 0
    while time.monotonic() < stop_at:
        n += 1
        with cond:
            events.clear()
        started = time.perf_counter()
        client.publish("general/user_input", json.dumps(
            {"sessionId": f"b{me}-{n}", "message": QUESTION, "replyTopic": reply_topic,
             "stream": True, "temperature": 0, "maxTokens": MAX_TOKENS}), qos=1)
        with cond:
            if not cond.wait_for(lambda: "done" in events, 60):
                break
        out.append((events.get("first", events["done"]) - started, events["done"] - started))
    client.loop_stop()
    client.disconnect()


def _no_delay(client: mqtt.Client, userdata: object, sock: socket.socket) -> None:
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def run(kind: str, n: int, seconds: float, port: int, broker_port: int) -> list[tuple[float, float]]:
    out: list[tuple[float, float]] = []
    stop_at = time.monotonic() + seconds
    target = http_client if kind == "http" else mqtt_client
    threads = [threading.Thread(target=target, args=(port if kind == "http" else broker_port,
                                                     stop_at, out)) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return out


# ---------------------------------------------------------------- the 5-turn chat


def five_turns(port: int) -> list[tuple[float, int, int]]:
    """(time to first token, prompt tokens, cached prompt tokens) of turns 2..5."""
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="bench", max_retries=0)
    questions = [QUESTION, "And of Germany?", "Which one is larger?", "Tell me more.",
                 "Thank you, what else should I know?"]
    history: list[dict[str, str]] = [{"role": "system", "content": "You are a geography tutor. "
                                      + "Answer in one sentence. " * 20}]
    rows = []
    for i, question in enumerate(questions):
        history.append({"role": "user", "content": question})
        started, first, text, usage = time.perf_counter(), None, "", None
        for chunk in client.chat.completions.create(
                model="general", stream=True, max_tokens=MAX_TOKENS, temperature=0,
                messages=history, stream_options={"include_usage": True}):
            if chunk.choices and chunk.choices[0].delta.content:
                first = first or time.perf_counter()
                text += chunk.choices[0].delta.content
            if chunk.usage:
                usage = chunk.usage
        history.append({"role": "assistant", "content": text})
        if i and usage is not None:
            rows.append(((first or time.perf_counter()) - started, usage.prompt_tokens,
                         usage.prompt_tokens_details.cached_tokens))
    return rows


def main() -> None:
    cli = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    cli.add_argument("--clients", default="1,8,32")
    cli.add_argument("--seconds", type=float, default=8.0)
    cli.add_argument("--rounds", type=int, default=2)
    args = cli.parse_args()
    model = cached_demo_checkpoint(dialogues())
    broker = start_broker()
    log = Path("/tmp/bench-http-agent.log")
    process, port = start_agent(model, broker.port, True, log)
    try:
        for kind in ("http", "mqtt"):
            run(kind, 1, 2.0, port, broker.port)  # warm-up
        print("| clients | door | req/s | TTFT p50 ms | TTFT p90 ms | total p50 ms |")
        print("|---:|---|---:|---:|---:|---:|")
        ratios = []
        for n in [int(c) for c in args.clients.split(",")]:
            pooled: dict[str, list[tuple[float, float]]] = {"http": [], "mqtt": []}
            for _ in range(args.rounds):
                for kind in ("http", "mqtt"):
                    pooled[kind] += run(kind, n, args.seconds, port, broker.port)
            rates = {}
            for kind, samples in pooled.items():
                ttft = sorted(s[0] for s in samples)
                rates[kind] = len(samples) / (args.seconds * args.rounds)
                print(f"| {n} | {kind} | {rates[kind]:.1f} | {1000 * ttft[len(ttft) // 2]:.0f} | "
                      f"{1000 * ttft[int(len(ttft) * 0.9)]:.0f} | "
                      f"{1000 * statistics.median(s[1] for s in samples):.0f} |")
            ratios.append((n, rates["http"] / rates["mqtt"]))
        print("\nHTTP / MQTT requests/s: " + ", ".join(f"{n} clients {r:.2f}" for n, r in ratios))
    finally:
        stop_agent(process)
    print("\n| prefix cache | turn | prompt tokens | cached | TTFT ms |")
    print("|---|---:|---:|---:|---:|")
    for caching in (True, False):
        process, port = start_agent(model, broker.port, caching, log)
        try:
            for turn, (ttft, prompt, cached) in enumerate(five_turns(port), 2):
                print(f"| {'on' if caching else 'off'} | {turn} | {prompt} | {cached} | "
                      f"{1000 * ttft:.0f} |")
        finally:
            stop_agent(process)
    broker.stop()


if __name__ == "__main__":
    main()
