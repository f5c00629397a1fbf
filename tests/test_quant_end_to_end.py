"""Every quantization method end to end: old-style MQTT client -> Mosquitto -> agent -> our
engine on a tiny Llama quantized into that format -> reply.

The checkpoints are real: AWQ, GPTQ (act-order), FP8 and INT8 come from our quantization
tool (``engine.quantize``, checked against the formats in tests/test_quantize_tool.py),
SqueezeLLM from the format's packer, bitsandbytes from the bitsandbytes library; fp8, int8
and bitsandbytes also quantize the plain checkpoint while loading. Each reply must be the
quantized engine's own greedy answer (so the agent really served the quantized model), the
status topic names the method, and a start-up with a flag that contradicts the checkpoint
is refused with the fix in the message.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from agent.mqtt.status import AgentInfo
from agent.service.app import Agent
from agent.service.config import AgentConfig
from engine import create_engine
from engine.api import EngineConfig, SamplingParams, UnsupportedError
from projects import load_project
from tests.checkpoints import tiny_checkpoint
from tests.mqtt_broker import Broker, mosquitto_available
from tests.old_client import OldClient

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(not mosquitto_available(), reason="mosquitto is not installed"),
    pytest.mark.usefixtures("one_torch_thread"),
]
PROJECT = "maze"
# (name, how the checkpoint is made, --quantization, words the engine's description holds)
CASES = [
    ("awq", "tool", None, "awq 4-bit"),
    ("gptq", "tool", "gptq", "gptq 4-bit"),
    ("fp8", "tool", None, "fp8"),
    ("int8", "tool", "int8", "int8"),
    ("squeezellm", "packer", None, "squeezellm"),
    ("bnb-nf4", "bitsandbytes", "bitsandbytes", "nf4"),
    ("fp8-at-load", "plain", "fp8", "fp8"),
    ("int8-at-load", "plain", "int8", "int8"),
    ("bnb-at-load", "plain", "bitsandbytes", "nf4"),
]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("quantized")
    built: dict[str, Path] = {}

    def make(name: str, how: str) -> Path:
        if name in built:
            return built[name]
        plain = tiny_checkpoint("llama")
        out = root / name
        if how == "plain":
            built[name] = plain
        elif how == "tool":
            from engine.quantize import quantize_checkpoint

            options = {"gptq": {"act_order": True}}.get(name, {})
            built[name] = quantize_checkpoint(plain, out, name, group_size=32, num_samples=4,
                                              seq_len=32, device="cpu", **options)
        elif how == "packer":
            from tests.quant_fixtures import QuantSpec, build_quant_checkpoint

            built[name] = build_quant_checkpoint(out, QuantSpec(method="squeezellm", bits=4))
        else:
            from tests.quant_checkpoints import bnb_checkpoint

            built[name] = bnb_checkpoint(out, "nf4")
        return built[name]

    return make


def plain_project():
    """The maze project without its output rules: the raw greedy reply is compared (the
    rules are tests/test_game_topics.py's)."""
    return replace(load_project(PROJECT), output_rules=None)


def greedy_reply(engine, message: str, max_tokens: int) -> str:
    messages = [{"role": "system", "content": load_project(PROJECT).system_prompt},
                {"role": "user", "content": message}]
    ids = engine.tokenizer.apply_chat_template(messages)
    [result] = engine.generate([ids], SamplingParams(temperature=0, max_tokens=max_tokens))
    return result.text.strip() or "Error: the model returned an empty answer"


@pytest.mark.parametrize(("name", "how", "flag", "described"), CASES, ids=[c[0] for c in CASES])
def test_each_method_answers_over_mqtt(
    name: str, how: str, flag: str | None, described: str, checkpoints, broker: Broker,
    client: OldClient,
) -> None:
    path = checkpoints(name, how)
    engine = create_engine(EngineConfig(model_path=str(path), device="cpu", dtype="float32",
                                        max_model_len=512, quantization=flag))
    assert described in engine.quantization, engine.quantization
    info = AgentInfo(model=str(path), quantization=engine.quantization)
    agent = Agent(AgentConfig(projects=(PROJECT,), mqtt_broker=broker.host, mqtt_port=broker.port,
                              connect_timeout=5.0, agent_id=f"quant-{name}"),
                  engine, {PROJECT: plain_project()}, info=info)
    agent.start()
    try:
        status_topic = f"vllm_deploy/quant-{name}/status"
        client.subscribe(status_topic)
        reply = client.ask(PROJECT, f"s-{name}", "Which way to the goal?", temperature=0,
                           maxTokens=12, timeout=60)
        status = json.loads(client.wait(status_topic, 1, timeout=10)[0])
        expected = greedy_reply(engine, "Which way to the goal?", 12)
    finally:
        agent.stop()  # shuts the engine down too
    assert reply == expected
    assert status["quantization"] == engine.quantization


def test_a_flag_that_contradicts_the_checkpoint_is_refused(checkpoints) -> None:
    awq = checkpoints("awq", "tool")
    with pytest.raises(UnsupportedError, match="use --quantization awq"):
        create_engine(EngineConfig(model_path=str(awq), device="cpu", quantization="gptq"))
    with pytest.raises(UnsupportedError, match=r"not AWQ-quantized .*; use --quantization bitsandbytes"):
        create_engine(EngineConfig(model_path=str(tiny_checkpoint("llama")), device="cpu",
                                   quantization="awq"))


def test_int4_weights_take_at_most_030_of_fp16() -> None:
    """Memory accounting: a 4096 x 4096 AWQ layer (group 128) as loaded for the kernels
    (qweight, scales, zeros) takes at most 0.30 of its fp16 bytes."""
    from engine.layers.linear import Linear
    from engine.quantization.awq import AWQConfig
    from engine.quantization.base import TensorSet
    from engine.quantization.packing import pack_awq

    k = n = 4096
    config = AWQConfig.from_checkpoint(
        {"quant_method": "awq", "bits": 4, "group_size": 128, "zero_point": True, "version": "gemm"},
        "config.json", {})
    with torch.device("meta"):
        layer = Linear(k, n, quant_method=config.linear_method("model.layers.0.mlp.up_proj"))
    gen = torch.Generator().manual_seed(0)
    tensors = TensorSet("model.layers.0.mlp.up_proj", {
        "qweight": pack_awq(torch.randint(0, 16, (k, n), generator=gen, dtype=torch.int32)),
        "qzeros": pack_awq(torch.randint(0, 16, (k // 128, n), generator=gen, dtype=torch.int32)),
        "scales": torch.rand(k // 128, n, generator=gen).half(),
    })
    layer.quant_method.load(layer, tensors, torch.device("cpu"), torch.float16)
    tensors.finish()
    nbytes = sum(t.numel() * t.element_size() for t in layer.buffers())
    assert nbytes / (2 * k * n) <= 0.30, nbytes / (2 * k * n)


def test_start_up_log_states_weight_bytes_and_ratio(checkpoints, caplog: pytest.LogCaptureFixture) -> None:
    import logging

    caplog.set_level(logging.INFO, logger="engine.loader")
    engine = create_engine(EngineConfig(model_path=str(checkpoints("awq", "tool")), device="cpu",
                                        max_model_len=256))
    engine.shutdown()
    line = next(r.getMessage() for r in caplog.records if "of the" in r.getMessage())
    assert "awq 4-bit" in line and "MiB they take in fp16" in line, line
