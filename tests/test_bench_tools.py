"""The benchmarks' own machinery, on the CPU: bench/random_quantized.py (the random AWQ/GPTQ
twin of a checkpoint that bench/engine.py runs on real layer shapes must load in our engine,
on tiny test models too) and bench/kernel_bench.py's cycling through copies of a case's inputs
(so that CUDA-graph timings read weights from memory, not from L2)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bench.kernel_bench import Case, copies_beyond_cache, cycling
from bench.random_quantized import group_size, random_quantized_checkpoint
from engine import create_engine
from engine.api import EngineConfig, SamplingParams
from tests.checkpoints import tiny_checkpoint_copy

ROOT = Path(__file__).resolve().parent.parent


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


def test_enough_copies_to_span_twice_the_cache() -> None:
    l2 = 50 * 2**20
    assert copies_beyond_cache(8 * 2**20, l2) == 13  # 8 MiB of int4 weights: 104 MiB in all
    assert copies_beyond_cache(100 * 2**20, l2) == 1
    assert copies_beyond_cache(99 * 2**20, l2) == 2
    assert copies_beyond_cache(0, l2) >= 1


def test_cycling_runs_each_copy_in_turn() -> None:
    calls: list[int] = []

    def copy(i: int) -> Case:
        return Case("int4", lambda: calls.append(i) or torch.zeros(1), nbytes=10)

    case = cycling([copy(0), copy(1), copy(2)])
    for _ in range(7):
        case.run()
    assert sorted(calls[:3]) == [0, 1, 2] and calls[3:6] == calls[:3] and calls[6] == calls[0]
    assert (case.name, case.nbytes) == ("int4", 10)


def test_every_kernel_case_runs_in_the_triton_interpreter() -> None:
    """bench/kernel_bench.py's cases, built as the GPU run builds them, on a small shape: a broken
    case here would cost a GPU session its device time."""
    code = """
import torch
from bench.kernel_bench import cases_beyond_cache
cases = cases_beyond_cache(1, 256, 128, torch.device("cpu"), 1 << 16)
for case in cases:
    for _ in range(3):  # each copy once
        y = case.run()
        assert y.shape == (1, 128) and torch.isfinite(y).all(), case.name
print(sorted(c.name for c in cases))
"""
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split("\n")[0] == str(sorted(
        ["fp16 torch", "int4 g128", "int8 g128", "lut4", "fp8 w8a8", "int8 w8a8"]))
