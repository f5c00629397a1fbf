"""The quantization tool (``python -m engine.quantize``) on the tiny Llama: the formats it
writes, GPTQ and AWQ against round-to-nearest, the AWQ fold, the CLI, and loading the
output in our engine."""

from __future__ import annotations

import json
import subprocess
import sys
from functools import cache
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from engine.config import ModelConfig
from engine.loader import load_model
from engine.quantization import resolve
from engine.quantization.packing import unpack_awq, unpack_gptq_cols, unpack_gptq_rows
from engine.quantize import capture, quantize_checkpoint
from engine.quantize.__main__ import main
from engine.quantize.awq_search import fold_decoder_layer, search_scale
from engine.quantize.calibration import calibration_tokens
from engine.quantize.gptq import gptq_quantize
from engine.quantize.rtn import fake_quantize, quantize_rtn
from tests.checkpoints import tiny_checkpoint
from tests.quant_checkpoints import LINEAR_NAMES, fp32_model, logits, prompt_ids

torch.set_num_threads(1)

REPO = Path(__file__).resolve().parent.parent
G = 32
CALIB = dict(num_samples=8, seq_len=48)
# name -> quantize_checkpoint arguments; each written once per module run
CASES = {
    "awq": dict(method="awq", group_size=G, **CALIB),
    "gptq-act-order": dict(method="gptq", bits=4, group_size=G, act_order=True, **CALIB),
    "gptq-3bit-rtn": dict(method="gptq", bits=3, group_size=G, algorithm="rtn"),
    "fp8-static-tensor": dict(method="fp8", strategy="tensor", activations="static", **CALIB),
    "int8": dict(method="int8"),
}


def src() -> Path:
    return tiny_checkpoint("llama")


@cache
def source_tensors() -> dict[str, torch.Tensor]:
    return load_file(str(src() / "model.safetensors"))


def prefixes() -> list[str]:
    return [f"model.layers.{i}.{n}" for i in range(2) for n in LINEAR_NAMES]


@pytest.fixture(scope="module")
def written(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("quantized")
    return {name: quantize_checkpoint(src(), root / name, **kw) for name, kw in CASES.items()}


def tensors_of(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path / "model.safetensors"))


def assert_layout(
    t: dict[str, torch.Tensor], name: str, dtype: torch.dtype, shape: tuple[int, ...]
) -> None:
    """The written tensor ``name`` has this dtype and shape."""
    assert (t[name].dtype, tuple(t[name].shape)) == (dtype, shape), name


def config_of(path: Path) -> dict:
    return json.loads((path / "config.json").read_text())


def dequantized(
    method: str, t: dict[str, torch.Tensor], prefix: str, k: int, n: int
) -> torch.Tensor:
    """``W [N, K]`` float32 by FORMATS.md's formula for ``method``."""
    if method == "awq":
        q, z = unpack_awq(t[f"{prefix}.qweight"]), unpack_awq(t[f"{prefix}.qzeros"])
        g = torch.arange(k) // G
        return ((q - z[g]) * t[f"{prefix}.scales"].float()[g]).T
    if method == "gptq":
        bits = 3 if t[f"{prefix}.qweight"].shape[0] == k * 3 // 32 else 4
        q = unpack_gptq_rows(t[f"{prefix}.qweight"], bits, k)
        z = unpack_gptq_cols(t[f"{prefix}.qzeros"], bits, n) + 1  # v1 stores z - 1
        g = t[f"{prefix}.g_idx"].long()
        return (t[f"{prefix}.scales"].float()[g] * (q - z[g])).T
    return t[f"{prefix}.weight"].float() * t[f"{prefix}.weight_scale"].float()


# ----------------------------------------------------------------------------- formats


def test_awq_tensors_and_config(written: dict[str, Path]) -> None:
    path = written["awq"]
    assert config_of(path)["quantization_config"] == {
        "quant_method": "awq",
        "bits": 4,
        "group_size": G,
        "zero_point": True,
        "version": "gemm",
        "modules_to_not_convert": None,
    }
    assert config_of(path)["dtype"] == "float16"
    t, s = tensors_of(path), source_tensors()
    for p in prefixes():
        n, k = s[f"{p}.weight"].shape
        assert f"{p}.weight" not in t
        assert_layout(t, f"{p}.qweight", torch.int32, (k, n // 8))
        assert_layout(t, f"{p}.qzeros", torch.int32, (k // G, n // 8))
        assert_layout(t, f"{p}.scales", torch.float16, (k // G, n))
        assert (t[f"{p}.scales"] > 0).all()
    for name in (
        "tokenizer.json",
        "tokenizer_config.json",
        "generation_config.json",
        "chat_template.jinja",
    ):
        assert (path / name).read_bytes() == (src() / name).read_bytes()
    assert not (path / "quantize_config.json").exists()


def test_gptq_tensors_config_and_act_order(written: dict[str, Path]) -> None:
    path = written["gptq-act-order"]
    qc = config_of(path)["quantization_config"]
    assert {
        k: qc[k]
        for k in (
            "bits",
            "group_size",
            "desc_act",
            "sym",
            "static_groups",
            "damp_percent",
            "quant_method",
            "checkpoint_format",
        )
    } == {
        "bits": 4,
        "group_size": G,
        "desc_act": True,
        "sym": False,
        "static_groups": False,
        "damp_percent": 0.01,
        "quant_method": "gptq",
        "checkpoint_format": "gptq",
    }
    assert json.loads((path / "quantize_config.json").read_text()) == qc
    t, s = tensors_of(path), source_tensors()
    for p in prefixes():
        n, k = s[f"{p}.weight"].shape
        assert_layout(t, f"{p}.qweight", torch.int32, (k // 8, n))
        assert_layout(t, f"{p}.qzeros", torch.int32, (k // G, n // 8))
        assert_layout(t, f"{p}.scales", torch.float16, (k // G, n))
        g_idx = t[f"{p}.g_idx"]
        assert g_idx.dtype == torch.int32 and tuple(g_idx.shape) == (k,)
        assert not bool((g_idx[1:] >= g_idx[:-1]).all()), f"{p}: act-order g_idx is monotonic"
        assert torch.bincount(g_idx.long()).tolist() == [G] * (k // G)
        w = dequantized("gptq", t, p, k, n)
        assert (w - s[f"{p}.weight"]).norm() / s[f"{p}.weight"].norm() < 0.15


def test_gptq_3bit_stores_rtn_values_and_zero_minus_one(written: dict[str, Path]) -> None:
    """Packed along K in the 3-word layout, zeros along N as z - 1; values equal RTN's."""
    t, s = tensors_of(written["gptq-3bit-rtn"]), source_tensors()
    for p in prefixes():
        n, k = s[f"{p}.weight"].shape
        ref = quantize_rtn(s[f"{p}.weight"], 3, G, sym=False, min_zero=1)
        assert tuple(t[f"{p}.qweight"].shape) == (k * 3 // 32, n)
        assert tuple(t[f"{p}.qzeros"].shape) == (k // G, n * 3 // 32)
        assert torch.equal(unpack_gptq_rows(t[f"{p}.qweight"], 3, k), ref.q.T)
        stored = unpack_gptq_cols(t[f"{p}.qzeros"], 3, n)
        assert torch.equal(stored, ref.zeros - 1) and int(stored.min()) >= 0
        assert torch.equal(t[f"{p}.g_idx"], torch.arange(k, dtype=torch.int32) // G)
        assert torch.equal(t[f"{p}.scales"], ref.scales.half())


def _compressed_tensors_reference(
    w: torch.Tensor, kind: str, strategy: str
) -> dict[str, torch.Tensor]:
    from compressed_tensors.compressors.naive_quantized import (
        FloatQuantizationCompressor,
        IntQuantizationCompressor,
    )
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from compressed_tensors.quantization.utils import calculate_qparams

    args = QuantizationArgs(num_bits=8, type=kind, symmetric=True, strategy=strategy)
    scheme = QuantizationScheme(targets=["Linear"], weights=args)
    dims = dict(dim=1, keepdim=True) if strategy == "channel" else {}
    scale, zp = calculate_qparams(w.amin(**dims), w.amax(**dims), args)
    compressor = FloatQuantizationCompressor if kind == "float" else IntQuantizationCompressor
    return compressor.compress(
        {"weight": w, "weight_scale": scale, "weight_zero_point": zp}, scheme
    )


@pytest.mark.parametrize("case,kind", [("fp8-static-tensor", "float"), ("int8", "int")])
def test_compressed_tensors_bit_exact_and_config_valid(
    written: dict[str, Path], case: str, kind: str
) -> None:
    from compressed_tensors.quantization import QuantizationConfig

    path = written[case]
    qc = config_of(path)["quantization_config"]
    parsed = QuantizationConfig.model_validate(qc)
    assert parsed.format == f"{kind}-quantized" and parsed.ignore == ["lm_head"]
    strategy = "tensor" if case.startswith("fp8") else "channel"
    static = case.startswith("fp8")
    group = qc["config_groups"]["group_0"]
    weights = {
        k: group["weights"][k] for k in ("num_bits", "type", "strategy", "symmetric", "dynamic")
    }
    assert weights == {
        "num_bits": 8,
        "type": kind,
        "strategy": strategy,
        "symmetric": True,
        "dynamic": False,
    }
    acts = group["input_activations"]
    assert (acts["strategy"], acts["dynamic"]) == (("tensor", False) if static else ("token", True))
    t, s = tensors_of(path), source_tensors()
    for p in prefixes():
        n, k = s[f"{p}.weight"].shape
        ref = _compressed_tensors_reference(s[f"{p}.weight"], kind, strategy)
        assert t[f"{p}.weight"].dtype == (torch.float8_e4m3fn if kind == "float" else torch.int8)
        assert tuple(t[f"{p}.weight"].shape) == (n, k)
        assert torch.equal(t[f"{p}.weight"].view(torch.int8), ref["weight"].view(torch.int8))
        assert t[f"{p}.weight_scale"].dtype == torch.float32
        assert tuple(t[f"{p}.weight_scale"].shape) == ((1,) if strategy == "tensor" else (n, 1))
        assert torch.equal(
            t[f"{p}.weight_scale"], ref["weight_scale"].reshape(t[f"{p}.weight_scale"].shape)
        )
        assert (f"{p}.input_scale" in t) == static
    if static:  # one input per layer group: q/k/v read the same tensor, o_proj another
        a = [t[f"model.layers.0.self_attn.{x}_proj.input_scale"] for x in "qkvo"]
        assert a[0].shape == (1,) and a[0].dtype == torch.float32 and float(a[0]) > 0
        assert torch.equal(a[0], a[1]) and torch.equal(a[0], a[2]) and not torch.equal(a[0], a[3])


# ----------------------------------------------------------------------------- algorithms


@cache
def _layer0_inputs() -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    """transformers' tiny Llama (fp32) and its layer 0's linear inputs on calibration text."""
    model = capture.load_model(src())
    tokens = calibration_tokens(src(), None, num_samples=8, seq_len=48)
    batches = capture.first_layer_inputs(model, tokens, torch.device("cpu"))
    layer = capture.decoder_layers(model)[0]
    stats = capture.capture_linear_inputs(layer, batches, keep_inputs=True)
    return layer, {n: st.stacked() for n, st in stats.items()}


def _output_error(x: torch.Tensor, w: torch.Tensor, wq: torch.Tensor) -> float:
    return float((x @ w.T - x @ wq.T).norm())


@pytest.mark.parametrize("bits", [4, 3])
def test_gptq_beats_rtn_on_calibration_activations(bits: int) -> None:
    layer, inputs = _layer0_inputs()
    for name in ("self_attn.q_proj", "self_attn.o_proj", "mlp.up_proj", "mlp.down_proj"):
        x, w = inputs[name], layer.get_submodule(name).weight.detach().float()
        h = 2 * x.T @ x / x.shape[0]
        rtn = _output_error(x, w, quantize_rtn(w, bits, G).dequantize())
        for act_order in (False, True):
            gq = gptq_quantize(w, h, bits, G, act_order=act_order)
            assert int(gq.q.min()) >= 0 and int(gq.q.max()) < 2**bits
            err = _output_error(x, w, gq.dequantize())
            assert err < 0.95 * rtn, f"{name} {bits}-bit act_order={act_order}: {err} vs rtn {rtn}"


def test_act_order_g_idx_is_a_permutation_of_full_groups() -> None:
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(256, 64, generator=gen) * torch.rand(64, generator=gen) * 3
    w = torch.randn(48, 64, generator=gen)
    gq = gptq_quantize(w, 2 * x.T @ x / 256, 4, 16, act_order=True)
    assert not bool((gq.g_idx[1:] >= gq.g_idx[:-1]).all())
    assert torch.bincount(gq.g_idx.long()).tolist() == [16] * 4
    # group g holds the channels ranked 16g..16g+15 by the Hessian diagonal
    order = torch.argsort(torch.diag(x.T @ x), descending=True)
    assert torch.equal(gq.g_idx[order].long(), torch.arange(64) // 16)


def test_awq_search_not_worse_than_rtn() -> None:
    layer, inputs = _layer0_inputs()
    attn, mlp = layer.self_attn, layer.mlp
    improved = False
    for name, linears in (
        ("self_attn.q_proj", [attn.q_proj, attn.k_proj, attn.v_proj]),
        ("mlp.gate_proj", [mlp.gate_proj, mlp.up_proj]),
        ("mlp.down_proj", [mlp.down_proj]),
    ):
        x, ws = inputs[name], [m.weight.detach().float() for m in linears]
        found = search_scale(x, ws, 4, G)
        rtn = sum(_output_error(x, w, fake_quantize(w, 4, G)) ** 2 for w in ws)
        s = found.scales
        awq = sum(_output_error(x, w, fake_quantize(w * s, 4, G) / s) ** 2 for w in ws)
        assert awq <= rtn * (1 + 1e-6), name
        improved |= awq < rtn * 0.999
    assert improved, "the search never found a better scale than s = 1"


@torch.no_grad()
def test_awq_folded_model_computes_the_same_function() -> None:
    model = capture.load_model(src()).float()
    ids = torch.tensor([prompt_ids(20, seed=3)])
    before = model(ids).logits
    tokens = calibration_tokens(src(), None, num_samples=4, seq_len=32)
    batches = capture.first_layer_inputs(model, tokens, torch.device("cpu"))
    norms_before = model.model.layers[0].input_layernorm.weight.clone()
    for layer in capture.decoder_layers(model):
        stats = capture.capture_linear_inputs(layer, batches, keep_inputs=True)
        fold_decoder_layer(layer, {n: s.stacked() for n, s in stats.items()}, 4, G)
        batches = capture.run_layer(layer, batches)
    assert not torch.allclose(model.model.layers[0].input_layernorm.weight, norms_before)
    torch.testing.assert_close(model(ids).logits, before, atol=1e-4, rtol=0)


# ----------------------------------------------------------------------------- CLI


def run_cli(output: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """``python -m engine.quantize --model <the tiny model> --output <output> <args>``."""
    cmd = [sys.executable, "-m", "engine.quantize", "--model", str(src()), "--output", str(output)]
    return subprocess.run(
        [*cmd, *args], cwd=REPO, capture_output=True, text=True, timeout=120
    )


def test_cli_writes_a_checkpoint(tmp_path: Path) -> None:
    out = tmp_path / "int8"
    proc = run_cli(out, "--method", "int8", "--strategy", "tensor")
    assert proc.returncode == 0, proc.stderr
    assert "smaller" in proc.stderr  # the size summary is logged
    assert tensors_of(out)["model.layers.0.mlp.up_proj.weight_scale"].shape == (1,)


def test_cli_bad_arguments_exit_non_zero(tmp_path: Path) -> None:
    proc = run_cli(tmp_path / "x", "--method", "awq", "--bits", "3")
    assert proc.returncode != 0 and "awq writes 4-bit weights only" in proc.stderr
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize(
    "args,message",
    [
        (["--method", "gptq", "--bits", "5"], "supports --bits 2, 3, 4, 8"),
        (["--method", "fp8", "--bits", "4"], "fp8 stores 8-bit weights"),
        (["--method", "awq", "--group_size", "48"], "--group_size 48 does not divide in_features"),
        (["--method", "awq", "--act_order"], "apply to --method gptq only"),
        (["--method", "gptq", "--algorithm", "rtn", "--act_order"], "need --algorithm gptq"),
        (["--method", "int8", "--activations", "sometimes"], "choose dynamic or static"),
        (["--method", "gptq", "--calibration", "/nonexistent.txt"], "no such file"),
        (["--method", "gptq", "--damp_percent", "2"], "--damp_percent"),
    ],
)
def test_bad_combinations_are_clear_errors(
    tmp_path: Path, capsys, args: list[str], message: str
) -> None:
    out = tmp_path / "out"
    assert main(["--model", str(src()), "--output", str(out), *args]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_refuses_a_non_empty_output(tmp_path: Path) -> None:
    (tmp_path / "keep.txt").write_text("x")
    with pytest.raises(ValueError, match="not empty"):
        quantize_checkpoint(src(), tmp_path, "int8")
    assert (tmp_path / "keep.txt").exists()


# ----------------------------------------------------------------------------- our engine


def _load(path: Path) -> torch.nn.Module:
    quant = resolve(None, path, ModelConfig.from_pretrained(path).quantization_config, {})
    return load_model(path, torch.float32, "cpu", quant=quant)


def _dequantized_checkpoint(path: Path, method: str, dest: Path) -> Path:
    """The plain fp32 checkpoint with the written weights by the formula, the rest as written."""
    dest.mkdir()
    config = config_of(path)
    config.pop("quantization_config")
    (dest / "config.json").write_text(json.dumps(config))
    t, s = tensors_of(path), source_tensors()
    out = {n: v.float() for n, v in t.items() if not any(n.startswith(p + ".") for p in prefixes())}
    for p in prefixes():
        n, k = s[f"{p}.weight"].shape
        out[f"{p}.weight"] = dequantized(method, t, p, k, n)
    save_file({n: v.contiguous() for n, v in out.items()}, str(dest / "model.safetensors"))
    return dest


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


# Relative logit error against the original fp32 model: measured 0.23 (awq), 0.21 (gptq),
# 0.10 (fp8, static per-tensor), 0.02 (int8) on this random tiny model; a wrong packing
# or scale gives > 1.
BOUND_VS_FP32 = {"awq": 0.35, "gptq-act-order": 0.35, "fp8-static-tensor": 0.2, "int8": 0.06}


@pytest.mark.parametrize("case", ["awq", "gptq-act-order", "fp8-static-tensor", "int8"])
@torch.inference_mode()
def test_output_loads_in_our_engine(written: dict[str, Path], case: str, tmp_path: Path) -> None:
    ids = prompt_ids(24)
    got = logits(_load(written[case]), ids)
    assert torch.isfinite(got).all()
    assert _rel(got, logits(fp32_model(), ids)) < BOUND_VS_FP32[case]
    if case in ("awq", "gptq-act-order"):  # integer weights: exact dequantization, fp32 math
        ref = load_model(
            _dequantized_checkpoint(written[case], case.split("-")[0], tmp_path / "deq"),
            torch.float32,
            "cpu",
        )
        assert _rel(got, logits(ref, ids)) < 1e-5


def test_shards_with_an_index_when_over_the_limit(tmp_path: Path) -> None:
    from engine.loader import checkpoint_tensor_files
    from engine.quantize.writers import ShardWriter

    gen = torch.Generator().manual_seed(2)
    tensors = {f"t{i}": torch.randn(64, 64, generator=gen) for i in range(5)}  # 16 KiB each
    writer = ShardWriter(tmp_path, max_shard_bytes=40_000)
    for name, t in tensors.items():
        writer.add(name, t)
    writer.finish()
    files = checkpoint_tensor_files(tmp_path)
    assert sorted(f.name for f in set(files.values())) == [
        f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)
    ]
    for name, t in tensors.items():
        assert torch.equal(load_file(str(files[name]))[name], t)
