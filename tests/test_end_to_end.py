"""The whole path with real parts: old-style MQTT client -> Mosquitto -> agent -> our engine
on a tiny random Llama checkpoint -> Mosquitto -> client."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import replace

import pytest
import torch

from agent.service.app import Agent
from agent.service.config import AgentConfig
from engine import create_engine
from engine.api import EngineConfig, GenerationRequest, SamplingParams
from engine.llm_engine import LLMEngine
from engine.tokenizer import Tokenizer
from projects import load_project
from tests.checkpoints import tiny_checkpoint
from tests.mqtt_broker import Broker, mosquitto_available
from tests.old_client import OldClient

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(not mosquitto_available(), reason="mosquitto is not installed"),
]
PROJECTS = ("maze", "driving")


class RecordingEngine:
    """The real engine, with every submitted prompt kept for the test to read."""

    def __init__(self, engine: LLMEngine) -> None:
        self._engine = engine
        self.tokenizer = engine.tokenizer
        self.max_model_len = engine.max_model_len
        self.prompts: list[list[int]] = []
        self._lock = threading.Lock()

    def submit(self, request: GenerationRequest) -> None:
        with self._lock:
            self.prompts.append(list(request.prompt_token_ids))
        self._engine.submit(request)

    def __getattr__(self, name: str):  # start, cancel, stats, token_budget, shutdown
        return getattr(self._engine, name)


@pytest.fixture(scope="module")
def threads() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # 2 busy cores: more threads only contend
    yield
    torch.set_num_threads(before)


@pytest.fixture
def serve(broker: Broker, threads: None) -> Iterator:
    agents: list[Agent] = []

    def start(**overrides: object) -> RecordingEngine:
        engine = RecordingEngine(create_engine(EngineConfig(
            model_path=str(tiny_checkpoint("llama")), device="cpu", dtype="float32", max_model_len=1024,
        )))
        config = AgentConfig(projects=PROJECTS, mqtt_broker=broker.host, mqtt_port=broker.port,
                             connect_timeout=5.0, **overrides)  # type: ignore[arg-type]
        # the raw greedy reply is compared: without the projects' output rules (driving's
        # state tags, with a sampled retry), which tests/test_game_topics.py covers
        plain = {p: replace(load_project(p), output_rules=None) for p in PROJECTS}
        agent = Agent(config, engine, plain)  # type: ignore[arg-type]
        agent.start()
        agents.append(agent)
        return engine

    yield start
    for agent in agents:
        agent.stop()


def expected_reply(engine: RecordingEngine, project: str, message: str, max_tokens: int) -> str:
    """What our engine says, greedily, to this message as the first turn of a session."""
    messages = [{"role": "system", "content": load_project(project).system_prompt},
                {"role": "user", "content": message}]
    ids = engine.tokenizer.apply_chat_template(messages)
    [result] = engine.generate([ids], SamplingParams(temperature=0, max_tokens=max_tokens))
    return result.text.strip() or "Error: the model returned an empty answer"


def test_concurrent_sessions_of_two_projects_get_their_own_greedy_reply(
    serve, client: OldClient
) -> None:
    engine = serve()
    asks = [(p, f"{p}-s{i}", f"Hello number {i}, which way now?") for p in PROJECTS for i in range(3)]
    topics = [client.request(p, s, m, temperature=0, maxTokens=24) for p, s, m in asks]
    replies = [client.wait(t, 1, timeout=30)[0] for t in topics]
    stats = engine.stats()
    assert stats["errors"] == 0 and stats["processed"] == len(asks)
    # requests that overlap share forward passes: fewer steps than generated tokens
    assert stats["steps"] < stats["tokens_generated"], stats
    for (project, _, message), reply in zip(asks, replies, strict=True):
        assert reply == expected_reply(engine, project, message, 24)
    assert len(set(replies)) > 1  # distinct prompts, distinct answers: no cross-talk


def system_prompt_tokens(project: str) -> int:
    """Prompt tokens of a session's system prompt plus a one-character first message."""
    tokenizer = Tokenizer.from_pretrained(tiny_checkpoint("llama"))
    return len(tokenizer.apply_chat_template(
        [{"role": "system", "content": load_project(project).system_prompt}, {"role": "user", "content": "x"}]
    ))


def test_second_turn_sees_the_first_and_history_is_trimmed(serve, client: OldClient) -> None:
    limit = system_prompt_tokens("maze") + 160
    engine = serve(max_history_tokens=limit)
    first = client.ask("maze", "s1", "First question about the maze?", temperature=0, maxTokens=16, timeout=30)
    client.ask("maze", "s1", "And the second one?", temperature=0, maxTokens=16, timeout=30)
    second_prompt = engine.tokenizer.decode(engine.prompts[-1], skip_special_tokens=False)
    assert "First question about the maze?" in second_prompt
    if not first.startswith("Error:"):
        assert first in second_prompt
    for i in range(6):  # grow the session well past the history budget
        client.ask("maze", "s1", f"Follow-up question number {i} with some more words in it?",
                   temperature=0, maxTokens=16, timeout=30)
    assert max(len(p) for p in engine.prompts) <= limit
    last_prompt = engine.tokenizer.decode(engine.prompts[-1], skip_special_tokens=False)
    assert "Follow-up question number 5" in last_prompt
    assert "First question about the maze?" not in last_prompt  # the oldest turns went first
    assert load_project("maze").system_prompt in last_prompt  # the system prompt always stays


def test_a_message_too_long_for_the_history_budget_is_an_error(serve, client: OldClient) -> None:
    serve(max_history_tokens=system_prompt_tokens("driving") + 100)
    reply = client.ask("driving", "long", "word " * 400, timeout=30)
    assert reply.startswith("Error: the message is too long")
    assert not client.ask("driving", "short", "Hi?", temperature=0, maxTokens=8, timeout=30).startswith(
        "Error: the message is too long"
    )
