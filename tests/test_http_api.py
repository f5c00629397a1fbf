"""The OpenAI-compatible API of the real agent process (vLLMDeploy.py on the tiny demo model,
trained on the projects' example dialogues, on the CPU), with the real ``openai`` client, while the same process serves MQTT clients through a
real broker: greedy replies equal to MQTT's, streaming, stop strings, usage and the prefix
cache, a stream cut off by its client, both doors at once."""

from __future__ import annotations

import json
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import openai
import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from agent.demo.demo_model import cached_demo_checkpoint
from projects.demo_corpus import DEMO_PROMPTS, dialogues
from tests.mqtt_broker import Broker

pytestmark = [pytest.mark.integration, pytest.mark.slow]
ROOT = Path(__file__).resolve().parent.parent
KEY = "api-test-key"
MAX_TOKENS = 24
QUESTION = DEMO_PROMPTS["general"]  # the demo model answers it in a sentence


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Running:
    def __init__(self, broker: Broker, log: Path) -> None:
        self.model = cached_demo_checkpoint(dialogues())
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.broker = broker
        command = [sys.executable, "vLLMDeploy.py", "--projects", "general", "maze",
                   "--model", str(self.model), "--device", "cpu", "--mqtt_port", str(broker.port),
                   "--max_model_len", "256", "--max_history_tokens", "200", "--max_tokens",
                   str(MAX_TOKENS), "--http_port", str(self.port), "--api_key", KEY,
                   "--agent_id", "http-api-test", "--temperature", "0"]
        self.log = log
        with log.open("w") as out:
            self.process = subprocess.Popen(command, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 120
        while not self.healthy():
            assert self.process.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.3)
        self.client = openai.OpenAI(base_url=self.url + "/v1", api_key=KEY, max_retries=0)
        self.served = self.model.name

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(self.url + "/health", timeout=2) as response:
                return response.status == 200
        except OSError:
            return False

    def metric(self, name: str) -> float:
        with urllib.request.urlopen(self.url + "/metrics", timeout=5) as response:
            text = response.read().decode()
        match = re.search(rf"^{re.escape(name)} ([0-9.e+-]+)$", text, re.M)
        assert match, text
        return float(match.group(1))

    def mqtt_ask(self, message: str, session: str) -> str:
        got: list[str] = []
        done, subscribed = threading.Event(), threading.Event()
        client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"t-{session}")
        client.on_message = lambda c, u, m: (got.append(m.payload.decode()), done.set())
        client.on_subscribe = lambda *args: subscribed.set()
        client.connect(self.broker.host, self.broker.port)
        client.loop_start()
        try:
            client.subscribe(f"general/assistant_response/{session}", qos=1)
            assert subscribed.wait(10)
            client.publish("general/user_input", json.dumps(
                {"sessionId": session, "message": message, "temperature": 0,
                 "maxTokens": MAX_TOKENS}), qos=1)
            assert done.wait(60), self.log.read_text()[-3000:]
            return got[0]
        finally:
            client.loop_stop()
            client.disconnect()

    def stop(self) -> None:
        self.process.send_signal(signal.SIGTERM)
        try:
            assert self.process.wait(30) == 0, self.log.read_text()[-3000:]
        finally:
            if self.process.poll() is None:
                self.process.kill()


@pytest.fixture(scope="module")
def agent(broker: Broker, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Running]:
    running = Running(broker, tmp_path_factory.mktemp("http-api") / "agent.log")
    yield running
    running.stop()


def chat(agent: Running, text: str, **kw: object):
    return agent.client.chat.completions.create(
        model=kw.pop("model", "general"), messages=[{"role": "user", "content": text}],
        temperature=0, max_tokens=MAX_TOKENS, **kw)  # type: ignore[arg-type]


def test_greedy_http_reply_equals_the_mqtt_reply(agent: Running) -> None:
    http = chat(agent, QUESTION)
    over_mqtt = agent.mqtt_ask(QUESTION, "same-prompt")
    assert len(over_mqtt) > 10 and not over_mqtt.startswith("Error")
    assert http.choices[0].message.content == over_mqtt
    assert http.choices[0].finish_reason in ("stop", "length")
    usage = http.usage
    assert usage.prompt_tokens > 5 and 1 <= usage.completion_tokens <= MAX_TOKENS
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens


def test_streamed_deltas_join_to_the_reply(agent: Running) -> None:
    whole = chat(agent, QUESTION).choices[0].message.content
    chunks = list(chat(agent, QUESTION, stream=True,
                       stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == whole
    assert chunks[-1].usage.completion_tokens >= 1


def test_a_stop_string_ends_the_text_before_it(agent: Running) -> None:
    whole = chat(agent, QUESTION).choices[0].message.content
    assert len(whole) > 10, whole
    k = next(i for i in range(5, len(whole) - 1) if whole.find(whole[i:i + 3]) == i)
    stopped = chat(agent, QUESTION, stop=[whole[k:k + 3]])
    assert stopped.choices[0].message.content == whole[:k]
    assert stopped.choices[0].finish_reason == "stop"


def test_a_resent_conversation_reuses_the_prefix_cache(agent: Running) -> None:
    history = [{"role": "user", "content": "the first question of a long chat " * 3}]
    first = agent.client.chat.completions.create(model="general", messages=history,
                                                 temperature=0, max_tokens=4)
    history += [{"role": "assistant", "content": first.choices[0].message.content},
                {"role": "user", "content": "and a second one"}]
    second = agent.client.chat.completions.create(model="general", messages=history,
                                                  temperature=0, max_tokens=4)
    assert second.usage.prompt_tokens_details.cached_tokens >= 16  # one block at least


def test_a_stream_cut_off_by_its_client_frees_its_blocks(agent: Running) -> None:
    """Its blocks go back to the pool (those of its prompt stay cached for reuse, as any
    finished prompt's do); tests/test_http_door.py shows the engine's cancel itself."""
    free_before = agent.metric("vllm_deploy_kv_blocks_free")
    prompt = "a long story about the river and the mountain " * 4  # about 40 tokens
    request = urllib.request.Request(
        agent.url + "/v1/chat/completions", json.dumps(
            {"model": agent.served, "stream": True, "max_tokens": MAX_TOKENS,
             "messages": [{"role": "user", "content": prompt}]}).encode(),
        headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    response = urllib.request.urlopen(request, timeout=30)
    response.readline()
    response.close()
    cached = 4  # full blocks of 16 tokens the prompt may leave in the prefix cache
    deadline = time.monotonic() + 10
    while (agent.metric("vllm_deploy_kv_blocks_free") < free_before - cached
           and time.monotonic() < deadline):
        time.sleep(0.1)
    assert agent.metric("vllm_deploy_kv_blocks_free") >= free_before - cached
    assert agent.metric("vllm_deploy_queue_size") == 0 and agent.healthy()


def test_mqtt_and_http_clients_at_once(agent: Running) -> None:
    results: dict[str, str] = {}

    def over_http(i: int) -> None:
        results[f"http{i}"] = chat(agent, f"question {i}").choices[0].message.content or ""

    def over_mqtt(i: int) -> None:
        results[f"mqtt{i}"] = agent.mqtt_ask(f"question {i}", f"both-{i}")

    threads = [threading.Thread(target=f, args=(i,)) for i in range(3)
               for f in (over_http, over_mqtt)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(90)
    assert len(results) == 6
    for i in range(3):
        assert results[f"http{i}"] == results[f"mqtt{i}"]  # greedy: the same prompt, one reply
