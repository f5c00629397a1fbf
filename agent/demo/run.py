"""The demo behind ./run_demo.sh: the real agent on a tiny model, one request per project.

It uses the system Mosquitto when one answers on localhost:1883 (else it starts
one on a free port), builds the tiny demo model once into the cache (a minute's
training on built-in example dialogues, see ``agent/demo/demo_model.py``), runs
``vLLMDeploy.py`` as a subprocess on the CPU under a topic prefix of its own (so
it never collides with a real deployment on the same broker), sends one prompt
per shipped project, prints the replies and round-trip times, and stops the agent.
"""

from __future__ import annotations

import argparse
import getpass
import json
import logging
import os
import queue
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from contextlib import ExitStack, closing
from pathlib import Path

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from projects import available_projects
from projects.demo_corpus import DEMO_PROMPTS, dialogues

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_PROMPT = "Hello!"  # for a project without a prompt in DEMO_PROMPTS


def broker_answers(host: str, port: int, timeout: float = 2.0) -> bool:
    """True if an MQTT broker accepts a connection at host:port."""
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"demo-probe-{uuid.uuid4().hex[:8]}")
    try:
        client.connect(host, port, keepalive=10)
        client.loop_start()
        deadline = time.monotonic() + timeout
        while not client.is_connected() and time.monotonic() < deadline:
            time.sleep(0.05)
        return client.is_connected()
    except OSError:
        return False
    finally:
        client.loop_stop()
        client.disconnect()


def free_port() -> int:
    with closing(socket.socket()) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_mosquitto(stack: ExitStack, workdir: Path) -> int:
    """A private Mosquitto on a free loopback port, stopped when ``stack`` closes."""
    binary = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    if not os.access(binary, os.X_OK):
        sys.exit("error: no MQTT broker on localhost:1883 and no mosquitto to start: "
                 "apt-get install -y mosquitto")
    port = free_port()
    conf = workdir / "mosquitto.conf"
    conf.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n"
                    f"user {getpass.getuser()}\n")  # as root it would drop to 'mosquitto'
    log = (workdir / "mosquitto.log").open("w")
    proc = subprocess.Popen([binary, "-c", str(conf)], stdout=log, stderr=subprocess.STDOUT)
    stack.callback(stop_process, proc, "mosquitto", 5.0)
    for _ in range(100):
        if broker_answers("127.0.0.1", port, timeout=0.5):
            return port
        if proc.poll() is not None:
            break
        time.sleep(0.1)
    sys.exit(f"error: the demo's mosquitto did not start (see {workdir / 'mosquitto.log'})")


def stop_process(proc: subprocess.Popen, name: str, timeout: float) -> None:
    """SIGTERM, then SIGKILL after ``timeout`` seconds."""
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        print(f"{name} did not stop within {timeout:.0f} s: killing it")
        proc.kill()
        proc.wait()


class DemoClient:
    """A paho client that sends requests and collects the replies by topic."""

    def __init__(self, host: str, port: int, prefix: str) -> None:
        self.prefix, self.client_id = prefix, f"demo-client-{uuid.uuid4().hex[:8]}"
        self.sampling: dict[str, float] = {}  # overrides sent with each request
        self.replies: queue.Queue[tuple[str, str]] = queue.Queue()
        self.mqtt = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=self.client_id)
        self.mqtt.on_message = lambda c, u, msg: self.replies.put(
            (msg.topic, msg.payload.decode("utf-8", "replace")))
        self.mqtt.connect(host, port)
        self.mqtt.loop_start()
        self.mqtt.subscribe(f"{prefix}+/assistant_response/#", qos=1)

    def ask(self, project: str, message: str, timeout: float) -> tuple[str | None, float]:
        """The reply to one request and its round-trip time (None after ``timeout``)."""
        session = f"demo-{uuid.uuid4().hex[:8]}"
        reply_topic = f"{self.prefix}{project}/assistant_response/{session}/{self.client_id}"
        payload = {"message": message, "sessionId": session, "clientId": self.client_id,
                   "replyTopic": reply_topic, **self.sampling}
        start = time.monotonic()
        self.mqtt.publish(f"{self.prefix}{project}/user_input", json.dumps(payload), qos=1)
        while (left := timeout - (time.monotonic() - start)) > 0:
            try:
                topic, text = self.replies.get(timeout=left)
            except queue.Empty:
                break
            if topic == reply_topic:
                return text, time.monotonic() - start
        return None, time.monotonic() - start

    def close(self) -> None:
        self.mqtt.loop_stop()
        self.mqtt.disconnect()


def wait_until_serving(client: DemoClient, agent: subprocess.Popen, project: str,
                       log_path: Path, timeout: float) -> None:
    """Retry a request until the agent answers (it is then loaded and subscribed)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if agent.poll() is not None:
            tail = log_path.read_text(errors="replace").splitlines()[-15:]
            sys.exit(f"error: the agent exited with code {agent.returncode}:\n  "
                     + "\n  ".join(tail))
        if "subscribed to" in log_path.read_text(errors="replace"):
            reply, _ = client.ask(project, "ping", timeout=30)
            if reply is not None:
                return
        time.sleep(0.5)
    sys.exit(f"error: the agent did not answer within {timeout:.0f} s (log: {log_path})")


def main(argv: list[str] | None = None) -> int:
    cli = argparse.ArgumentParser(prog="run_demo.sh", description=__doc__.splitlines()[0])
    which = cli.add_mutually_exclusive_group()
    which.add_argument("--model", help="a model folder instead of the tiny demo model")
    which.add_argument("--random-model", action="store_true",
                       help="the tiny model with random weights (gibberish) instead")
    cli.add_argument("--max-tokens", type=int, default=64, help="longest reply (default 64)")
    cli.add_argument("--timeout", type=float, default=180, help="seconds for start-up")
    cli.add_argument("--private-broker", action="store_true",
                     help="start a Mosquitto of its own even when localhost:1883 answers")
    args = cli.parse_args(argv)
    projects = available_projects()
    with ExitStack() as stack:
        workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="vllm-deploy-demo-")))
        if not args.private_broker and broker_answers("localhost", 1883):
            host, port = "localhost", 1883
            print("broker: the system Mosquitto on localhost:1883")
        else:
            host, port = "127.0.0.1", start_mosquitto(stack, workdir)
            print(f"broker: a private Mosquitto on 127.0.0.1:{port} (stopped at the end)")
        model = pick_model(args)
        print(f"model: {model}")
        tag = uuid.uuid4().hex[:8]
        prefix = f"vllm-deploy-demo-{tag}/"  # never collides with a real deployment
        log_path = workdir / "agent.log"
        http_port = free_port()
        command = [sys.executable, str(ROOT / "vLLMDeploy.py"), "--projects", *projects,
                   "--model", model, "--device", "cpu", "--mqtt_broker", host,
                   "--mqtt_port", str(port), "--topic_prefix", prefix,
                   "--client_id", f"vllm-deploy-demo-{tag}", "--max_model_len", "1024",
                   "--max_history_tokens", "512", "--max_tokens", str(args.max_tokens),
                   "--http_port", str(http_port)]
        print(f"agent: vLLMDeploy.py --projects {' '.join(projects)} --device cpu "
              f"--topic_prefix {prefix} ...", flush=True)
        env = {k: v for k, v in os.environ.items() if not k.startswith("VLLM_DEPLOY_")}
        with log_path.open("w") as log:
            agent = subprocess.Popen(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                                     env={**env, "VLLM_DEPLOY_CACHE": os.environ.get(
                                         "VLLM_DEPLOY_CACHE", str(ROOT / ".cache"))})
        stack.callback(stop_process, agent, "the agent", 20.0)
        client = DemoClient(host, port, prefix)
        if args.random_model:  # random weights say little but newlines when not sampled hot
            client.sampling = {"temperature": 2.0, "topP": 1.0}
        stack.callback(client.close)
        started = time.monotonic()
        wait_until_serving(client, agent, projects[0], log_path, args.timeout)
        print(f"agent: serving after {time.monotonic() - started:.1f} s\n")
        rows = []
        for project in projects:
            prompt = DEMO_PROMPTS.get(project, DEFAULT_PROMPT)
            reply, seconds = client.ask(project, prompt, timeout=60)
            rows.append((project, prompt,
                         f"{seconds * 1000:.0f} ms" if reply is not None else "timeout", reply))
        http = ask_over_http(http_port, projects[0], DEMO_PROMPTS.get(projects[0], DEFAULT_PROMPT),
                             client.sampling)
        rows.append((f"{projects[0]} (HTTP)", *http))
        print_table(rows)
        if args.random_model:
            print("\nThe model is a tiny one with random weights, sampled at temperature 2: its "
                  "replies are\ngibberish (or empty) by design. They show the whole path: "
                  "broker -> agent -> engine -> agent -> broker.")
        elif not args.model:
            print("\nThe model is a tiny one trained for a minute on a built-in corpus of example "
                  "dialogues\n(projects/demo_corpus.py): it parrots them, it is not a real LLM. "
                  "What the demo shows is\nthe whole path, broker -> agent -> engine -> agent -> "
                  "broker, with each project's\nsystem prompt and sampling. For a real model: "
                  "./run_demo.sh --model /path/to/model-folder")
        print("\nagent: stopping (SIGTERM)", flush=True)
        stop_process(agent, "the agent", 20.0)
        print(f"agent: stopped, exit code {agent.returncode}")
    failed = [project for project, _, _, reply in rows if reply is None]
    if failed:
        print(f"error: no reply for {', '.join(failed)} (agent log was printed above)")
        return 1
    return 0


def ask_over_http(port: int, project: str, prompt: str,
                  sampling: dict) -> tuple[str, str, str | None]:
    """The same agent over its OpenAI-compatible API, with the ``openai`` client."""
    import openai

    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="demo",
                           max_retries=0, timeout=60)
    started = time.monotonic()
    try:
        reply = client.chat.completions.create(
            model=project, messages=[{"role": "user", "content": prompt}],
            temperature=sampling.get("temperature"), top_p=sampling.get("topP"))
    except openai.OpenAIError as exc:
        print(f"HTTP: {type(exc).__name__}: {exc}")
        return prompt, "error", None
    return prompt, f"{(time.monotonic() - started) * 1000:.0f} ms", reply.choices[0].message.content


def pick_model(args: argparse.Namespace) -> str:
    """The model folder: ``--model``, else the tiny random or (default) the tiny demo model."""
    if args.model:
        return args.model
    if args.random_model:
        print("model: building/reusing the tiny random Qwen2 checkpoint ...", flush=True)
        from agent.demo.tiny_checkpoint import cached_tiny_checkpoint

        return str(cached_tiny_checkpoint("qwen2"))
    print("model: building once (about a minute) or reusing the tiny demo model ...", flush=True)
    from agent.demo.demo_model import cached_demo_checkpoint, log

    progress = logging.StreamHandler(sys.stdout)  # training progress, when it trains
    progress.setFormatter(logging.Formatter("  %(message)s"))
    log.addHandler(progress)
    log.setLevel(logging.INFO)
    started = time.monotonic()
    path = str(cached_demo_checkpoint(dialogues()))
    print(f"model: ready after {time.monotonic() - started:.1f} s")
    return path


def print_table(rows: list[tuple[str, str, str, str | None]], limit: int = 100) -> None:
    """Per project: the prompt sent, then the reply (cut at ``limit``) and its round trip."""
    width = max(len(r[0]) for r in rows)
    for project, prompt, rtt, reply in rows:
        text = "(no reply)" if reply is None else " ".join(reply.split())
        print(f"{project:<{width}}  > {prompt}")
        print(f"{'':<{width}}  < {text[:limit] + ('...' if len(text) > limit else '')}  ({rtt})")

