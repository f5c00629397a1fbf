"""The HTTP door with the real ``openai`` client, over real HTTP (uvicorn), in an agent that is
connected to a real broker, on a fake engine whose answers a test scripts: error statuses,
tool calls, a client that goes away, shutdown. (tests/test_http_api.py: the real agent
process on the tiny model.)"""

from __future__ import annotations

import copy
import json
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator

import openai
import pytest

from agent.mqtt.status import AgentInfo
from agent.service.app import Agent
from agent.service.config import AgentConfig
from engine.tokenizer import Tokenizer
from tests.fake_engine import FakeEngine, tiny_tokenizer
from tests.mqtt_broker import Broker

pytestmark = pytest.mark.integration
KEY = "test-key-1"
SERVED = "Tiny-Model"

# A ChatML template that renders tools the way Qwen2.5's does (the <tools> block, the
# <tool_call> instruction, assistant tool calls and tool results in the history).
TOOLS_TEMPLATE = (
    "{%- if tools %}<|im_start|>system\n"
    "{%- if messages[0]['role'] == 'system' %}{{ messages[0]['content'] }}\n\n{%- endif %}"
    "# Tools\n<tools>{%- for tool in tools %}\n{{ tool | tojson }}{%- endfor %}\n</tools>\n"
    "For each function call, return a json object within <tool_call></tool_call> XML tags."
    "<|im_end|>\n{%- endif %}"
    "{%- for message in messages %}"
    "{%- if message['role'] == 'system' and tools %}"
    "{%- elif message['role'] == 'tool' %}<|im_start|>user\n<tool_response>\n"
    "{{ message['content'] }}\n</tool_response><|im_end|>\n"
    "{%- elif message.get('tool_calls') %}<|im_start|>assistant\n"
    "{%- for call in message['tool_calls'] %}<tool_call>\n{\"name\": \"{{ call.function.name }}\", "
    "\"arguments\": {{ call.function.arguments | tojson }}}\n</tool_call>{%- endfor %}<|im_end|>\n"
    "{%- else %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}<|im_start|>assistant\n{%- endif %}"
)
MOVE = {"type": "function", "function": {
    "name": "move", "description": "Move the player one cell",
    "parameters": {"type": "object", "properties": {"direction": {"type": "string"}}}}}


def tools_tokenizer() -> Tokenizer:
    hf = copy.deepcopy(tiny_tokenizer().hf)
    hf.chat_template = TOOLS_TEMPLATE
    return Tokenizer(hf)


class HttpAgent:
    def __init__(self, broker: Broker, engine: FakeEngine, **overrides: object) -> None:
        settings: dict = {"projects": ("general", "maze"), "mqtt_port": broker.port,
                          "http_port": 0, "api_key": (KEY, "second-key"), "agent_id": "http-test",
                          **overrides}
        self.engine = engine
        self.agent = Agent(AgentConfig(**settings), engine, info=AgentInfo(model=f"/m/{SERVED}"))
        self.agent.start()
        self.url = f"http://127.0.0.1:{self.agent.http.port}"
        self.client = openai.OpenAI(base_url=self.url + "/v1", api_key=KEY, max_retries=0)

    def raw(self, method: str, path: str, body: bytes | None = None,
            headers: dict[str, str] | None = None) -> tuple[int, dict]:
        request = urllib.request.Request(self.url + path, body, method=method,
                                         headers={"Authorization": f"Bearer {KEY}",
                                                  "Content-Type": "application/json",
                                                  **(headers or {})})
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                return response.status, json.loads(response.read() or b"{}")
        except urllib.error.HTTPError as err:
            return err.code, json.loads(err.read() or b"{}")


@pytest.fixture
def make(broker: Broker) -> Iterator[Callable[..., HttpAgent]]:
    made: list[HttpAgent] = []

    def make(engine: FakeEngine | None = None, **overrides: object) -> HttpAgent:
        made.append(HttpAgent(broker, engine or FakeEngine(), **overrides))
        return made[-1]

    yield make
    for h in made:
        h.agent.stop()


def ask(h: HttpAgent, **kw: object):
    kw.setdefault("model", "general")
    kw.setdefault("messages", [{"role": "user", "content": "hello"}])
    return h.client.chat.completions.create(**kw)  # type: ignore[arg-type]


def test_models_lists_the_served_id_first_then_the_projects(make) -> None:
    h = make()
    assert [m.id for m in h.client.models.list()] == [SERVED, "general", "maze"]
    assert h.client.models.retrieve("maze").id == "maze"
    with pytest.raises(openai.NotFoundError):
        h.client.models.retrieve("other")


def test_a_project_model_gets_its_system_prompt_the_served_one_does_not(make) -> None:
    h = make()
    reply = ask(h, model="general")
    assert reply.choices[0].message.content == "echo: hello"
    assert "<|im_start|>system" in h.engine.prompts[-1]
    ask(h, model=SERVED)
    assert "<|im_start|>system" not in h.engine.prompts[-1]
    ask(h, model="general", messages=[{"role": "system", "content": "Be brief."},
                                      {"role": "user", "content": "hi"}])
    assert "Be brief." in h.engine.prompts[-1] and "helpful" not in h.engine.prompts[-1]


def test_text_parts_and_sampling_fields_reach_the_engine(make) -> None:
    h = make()
    ask(h, messages=[{"role": "user", "content": [{"type": "text", "text": "two "},
                                                   {"type": "text", "text": "parts"}]}],
        temperature=0, top_p=0.5, seed=7, stop=["END", "STOP"], max_completion_tokens=5,
        frequency_penalty=0, user="someone", extra_body={"chat_template_kwargs": {"x": 1}})
    sampling = h.engine.requests[-1].sampling
    assert (sampling.temperature, sampling.top_p, sampling.seed, sampling.stop,
            sampling.max_tokens) == (0.0, 0.5, 7, ("END", "STOP"), 5)
    assert "two parts" in h.engine.prompts[-1]


def test_max_tokens_is_lowered_to_what_fits(make) -> None:
    h = make(FakeEngine(max_model_len=200), max_tokens=4096)
    reply = ask(h, max_tokens=4096)
    prompt = len(h.engine.requests[-1].prompt_token_ids)
    assert h.engine.requests[-1].sampling.max_tokens == 200 - prompt
    assert reply.usage.prompt_tokens == prompt


def test_errors_in_openai_shape_with_their_status(make) -> None:
    h = make(max_payload_bytes=5000)
    with pytest.raises(openai.BadRequestError) as bad:
        ask(h, temperature=3)
    assert bad.value.body["param"] == "temperature"
    for field, value in (("logprobs", True), ("n", 2), ("presence_penalty", 0.5),
                         ("response_format", {"type": "json_object"})):
        with pytest.raises(openai.BadRequestError) as bad:
            ask(h, **{field: value})
        assert bad.value.body["param"] == field
    with pytest.raises(openai.BadRequestError) as bad:
        ask(h, messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "data:,"}}]}])
    assert "images" in bad.value.body["message"]
    with pytest.raises(openai.NotFoundError) as missing:
        ask(h, model="nope")
    assert missing.value.body["code"] == "model_not_found"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=h.url + "/v1", api_key="wrong", max_retries=0).models.list()
    assert h.raw("GET", "/v1/models", headers={"Authorization": ""})[0] == 401
    status, body = h.raw("POST", "/v1/chat/completions", b'{"model": "general", "messages": '
                         + json.dumps([{"role": "user", "content": "x" * 6000}]).encode() + b"}")
    assert status == 413 and body["error"]["code"] == "too_long"
    assert h.raw("POST", "/v1/chat/completions", b"{not json")[0] == 400
    assert h.raw("GET", "/v1/nothing")[0] == 404 and h.raw("GET", "/v1/completions")[0] == 405
    status, body = h.raw("POST", "/v1/chat/completions", json.dumps(
        {"model": "general", "messages": [{"role": "user", "content": "y " * 3000}]}).encode())
    assert status == 413  # the body limit comes first: --max_payload_bytes


def test_a_prompt_over_the_budget_is_a_400_that_says_how_many_fit(make) -> None:
    h = make(FakeEngine(budgets={"general": 60}))
    with pytest.raises(openai.BadRequestError) as bad:
        ask(h, messages=[{"role": "user", "content": "word " * 80}])
    assert "at most 59 fit" in bad.value.body["message"]
    assert bad.value.body["code"] == "too_long"


def test_rate_limit_429_per_key_overload_and_engine_failure(make) -> None:
    h = make(max_requests_per_client=2)
    ask(h), ask(h)
    with pytest.raises(openai.RateLimitError):
        ask(h)
    other = openai.OpenAI(base_url=h.url + "/v1", api_key="second-key", max_retries=0)
    assert other.chat.completions.create(model="general", messages=[
        {"role": "user", "content": "hi"}]).choices[0].message.content == "echo: hi"
    failing = make(FakeEngine(), max_requests_per_session=100)
    failing.engine.fail = "CUDA error: out of memory"
    with pytest.raises(openai.InternalServerError) as err:
        ask(failing)
    assert err.value.status_code == 500
    slow = make(FakeEngine(delay=1.0), max_queue=1)
    first = threading.Thread(target=ask, args=(slow,))
    first.start()
    time.sleep(0.3)
    with pytest.raises(openai.APIStatusError) as busy:
        ask(slow)
    assert busy.value.status_code == 503
    first.join()


def test_streaming_chunks_usage_and_done(make) -> None:
    h = make()
    chunks = list(ask(h, stream=True, stream_options={"include_usage": True},
                      messages=[{"role": "user", "content": "a streamed reply"}]))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "echo: a streamed reply"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens > 0


def test_completions_return_the_raw_text(make) -> None:
    h = make(FakeEngine(reply=lambda p, r: " upon a time"))
    done = h.client.completions.create(model="general", prompt="Once")
    assert done.choices[0].text == " upon a time" and done.object == "text_completion"
    assert h.engine.prompts[-1] == "Once"
    streamed = h.client.completions.create(model="general", prompt="Once", stream=True)
    assert "".join(c.choices[0].text for c in streamed) == " upon a time"


def test_reasoning_is_removed_and_given_when_asked(make) -> None:
    engine = FakeEngine()
    engine.think = "closed"
    h = make(engine)
    plain = ask(h)
    assert plain.choices[0].message.content == "echo: hello"
    asked = ask(h, extra_body={"include_reasoning": True})
    assert asked.model_extra is not None
    assert asked.choices[0].message.model_extra["reasoning_content"] == "Let me think about it."


def test_tool_calls_hermes_as_vllm_returns_them(make) -> None:
    call = '<tool_call>\n{"name": "move", "arguments": {"direction": "up"}}\n</tool_call>'
    engine = FakeEngine(reply=lambda p, r: call)
    engine.tokenizer = tools_tokenizer()
    h = make(engine)
    reply = ask(h, model=SERVED, tools=[MOVE], tool_choice="auto",
                messages=[{"role": "user", "content": "where now?"}])
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    (tool_call,) = choice.message.tool_calls
    assert tool_call.function.name == "move"
    assert json.loads(tool_call.function.arguments) == {"direction": "up"}
    assert '"name": "move"' in engine.prompts[-1] and "<tools>" in engine.prompts[-1]
    # the call and its result in the history, as the SDK sends them back
    ask(h, model=SERVED, tools=[MOVE], messages=[
        {"role": "user", "content": "where now?"},
        {"role": "assistant", "content": None, "tool_calls": [tool_call.model_dump()]},
        {"role": "tool", "tool_call_id": tool_call.id, "content": "moved up"}])
    assert "<tool_response>\nmoved up" in engine.prompts[-1]
    assert '"arguments": {"direction": "up"}' in engine.prompts[-1]
    chunks = list(ask(h, model=SERVED, tools=[MOVE], stream=True))
    deltas = [c.choices[0].delta for c in chunks if c.choices and c.choices[0].delta.tool_calls]
    assert deltas[0].tool_calls[0].function.name == "move"
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    ask(h, model=SERVED, tools=[MOVE], tool_choice="none")
    assert "<tools>" not in engine.prompts[-1]


def test_a_template_without_tools_is_a_400(make) -> None:
    h = make()
    with pytest.raises(openai.BadRequestError) as bad:
        ask(h, tools=[MOVE])
    assert "does not support tools" in bad.value.body["message"]


def test_a_client_that_goes_away_mid_stream_cancels_its_request(make) -> None:
    engine = FakeEngine(delay=30.0)  # the answer would come only after 30 s
    h = make(engine)
    request = urllib.request.Request(
        h.url + "/v1/chat/completions", json.dumps(
            {"model": "general", "stream": True,
             "messages": [{"role": "user", "content": "long"}]}).encode(),
        headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    response = urllib.request.urlopen(request, timeout=10)
    assert response.readline().startswith(b"data: ")  # the role chunk: the turn is running
    response.close()
    deadline = time.monotonic() + 5
    while not engine.cancelled and time.monotonic() < deadline:
        time.sleep(0.05)
    assert engine.cancelled == [engine.requests[-1].request_id]
    assert h.agent.core.lanes.pending == 0


def test_health_metrics_and_shutdown(make) -> None:
    h = make(FakeEngine(delay=0.5))
    assert h.raw("GET", "/health") == (200, {"status": "ok"})
    alive = h.agent.service.engine_alive
    h.agent.service.engine_alive = lambda: False  # the engine loop stopped progressing
    assert h.raw("GET", "/health") == (503, {"status": "unavailable"})
    h.agent.service.engine_alive = alive
    ask(h)
    with pytest.raises(openai.BadRequestError):
        ask(h, temperature=5)
    with urllib.request.urlopen(h.url + "/metrics") as response:
        text = response.read()
    for line in (b'vllm_deploy_requests_total{outcome="ok",project="general"} 1.0',
                 b'vllm_deploy_door_requests_total{door="http",outcome="ok"} 1.0',
                 b'vllm_deploy_door_requests_total{door="http",outcome="bad_request"} 1.0'):
        assert line in text, line
    h.agent.core.refuse_new()
    with pytest.raises(openai.APIStatusError) as stopping:
        ask(h)
    assert stopping.value.status_code == 503 and "shutting down" in stopping.value.message


def test_a_stream_in_flight_at_shutdown_ends_with_an_error_event(make) -> None:
    h = make(FakeEngine(delay=30.0))
    request = urllib.request.Request(
        h.url + "/v1/chat/completions", json.dumps(
            {"model": "general", "stream": True,
             "messages": [{"role": "user", "content": "long"}]}).encode(),
        headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as response:
        assert response.readline().startswith(b"data: ")  # the role chunk
        h.agent.core.stop()  # what Agent.stop does with the turns still in flight
        events = [line for line in response.read().split(b"\n") if line.startswith(b"data: ")]
    error = json.loads(events[0][6:])["error"]
    assert error["code"] == "shutting_down" and events[-1] == b"data: [DONE]"
