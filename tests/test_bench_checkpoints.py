"""bench/random_quantized.py: the random AWQ/GPTQ twin of a checkpoint that the engine
benchmark runs on real layer shapes must load in our engine, on tiny test models too."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench.random_quantized import group_size, random_quantized_checkpoint
from engine import create_engine
from engine.api import EngineConfig, SamplingParams
from tests.checkpoints import tiny_checkpoint_copy


def test_group_size_is_the_largest_that_divides_every_layer() -> None:
    assert group_size([4096, 11008]) == 128
    assert group_size([64, 192]) == 64
    assert group_size([96, 32]) == 32
    with pytest.raises(ValueError, match="no group size"):
        group_size([64, 24])


@pytest.mark.parametrize("method", ["awq", "gptq"])
def test_the_random_twin_loads_and_generates(tmp_path: Path, method: str) -> None:
    twin = random_quantized_checkpoint(tiny_checkpoint_copy(tmp_path), method)
    quant = json.loads((twin / "config.json").read_text())["quantization_config"]
    assert quant["quant_method"] == method and quant["bits"] == 4
    engine = create_engine(EngineConfig(model_path=str(twin), device="cpu", max_model_len=128))
    assert engine.quantization.startswith(f"{method} 4-bit, group 64")
    try:
        [result] = engine.generate([[1, 2, 3, 4]], SamplingParams(temperature=0, max_tokens=4,
                                                                 ignore_eos=True), timeout=60)
    finally:
        engine.shutdown()
    assert result.finish_reason == "length" and len(result.token_ids) == 4
