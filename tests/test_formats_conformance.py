"""Conformance of the checkpoint loaders to /work/shared/FORMATS.md: one test per statement
that no other test checked (audit of the loaders; see the other quant test files for the
rest). Each docstring quotes the sentence it checks.

Layers are loaded one at a time where a whole model adds nothing (``load_layer``: the
method's ``load`` + ``TensorSet.finish``, as ``engine.loader`` calls them). Where a
well-kept library writes or reads the format it is the oracle: AutoAWQ's own
``WQLinear_GEMM.from_linear`` / ``dequantize_gemm``, compressed-tensors'
``calculate_qparams`` and compressor, bitsandbytes' quantizers and code tables.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import logging
import re
import sys
import types
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

import tests.quant_checkpoints as qc
from deploy_kernels.paged_attention_ref import dequantize, write_kv_ref
from engine.config import ModelConfig
from engine.kv_cache import PagedKVCache
from engine.layers.linear import Linear, make_linear
from engine.loader import load_model
from engine.quantization import QuantConfig, QuantFormatError, resolve
from engine.quantization.awq import AWQConfig
from engine.quantization.base import TensorSet
from engine.quantization.bitsandbytes import BitsAndBytesConfig
from engine.quantization.fp8 import FP8Config
from engine.quantization.gptq import GPTQConfig
from engine.quantization.int8 import Int8Config
from engine.quantization.packing import pack_awq, pack_gptq_cols, pack_gptq_rows, pack_squeezellm
from engine.quantization.squeezellm import SqueezeLLMConfig
from tests.checkpoints import as_state_dict
from tests.quant_fixtures import QuantSpec, build_quant_checkpoint

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CPU = torch.device("cpu")
PREFIX = "model.layers.0.mlp.up_proj"


# ----------------------------------------------------------------------------- helpers


def load_layer(
    config: QuantConfig,
    tensors: dict[str, torch.Tensor],
    k: int,
    n: int,
    bias: bool = False,
    dtype: torch.dtype = torch.float32,
) -> Linear:
    """One quantized linear ``[K -> N]`` read from its checkpoint ``tensors``, as the loader
    reads it (every tensor must be used)."""
    layer = make_linear(k, n, bias, config, PREFIX)
    assert layer.quantized
    tensor_set = TensorSet(PREFIX, tensors)
    layer.quant_method.load(layer, tensor_set, CPU, dtype)
    tensor_set.finish()
    return layer


def as_int32(word: int) -> int:
    """A 32-bit pattern as the signed int32 a checkpoint stores."""
    return word - 2**32 if word >= 2**31 else word


def words(shape: tuple[int, int], word: int) -> torch.Tensor:
    return torch.full(shape, as_int32(word), dtype=torch.int32)


def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    assert bool(torch.isfinite(got).all()), "NaN/inf never passes"
    return float((got.double() - ref.double()).norm() / ref.double().norm())


def awq_config(group_size: int) -> AWQConfig:
    raw = {
        "quant_method": "awq",
        "bits": 4,
        "group_size": group_size,
        "zero_point": True,
        "version": "gemm",
    }
    return AWQConfig.from_checkpoint(raw, "config.json", {})


def gptq_config(bits: int, group_size: int, checkpoint_format: str, sym: bool = True) -> GPTQConfig:
    raw = {
        "quant_method": "gptq",
        "bits": bits,
        "group_size": group_size,
        "desc_act": False,
        "sym": sym,
        "checkpoint_format": checkpoint_format,
    }
    return GPTQConfig.from_checkpoint(raw, "config.json", {})


@contextmanager
def autoawq_gemm() -> Iterator[types.ModuleType]:
    """AutoAWQ's own ``awq/modules/linear/gemm.py`` (``WQLinear_GEMM.from_linear`` writes the
    format; it imports ``dequantize_gemm``, AutoAWQ's reader), from the installed files. The
    package's ``__init__`` needs accelerate and an old transformers (it is installed with
    --no-deps), so ``awq`` is a bare package here and ``awq.utils.utils`` a stub; every
    ``awq`` module is dropped again afterwards."""
    root = Path(str(importlib.metadata.distribution("autoawq").locate_file("awq")))
    saved = {n: m for n, m in sys.modules.items() if n == "awq" or n.startswith("awq.")}
    package = types.ModuleType("awq")
    package.__path__ = [str(root)]
    stub = types.ModuleType("awq.utils.utils")
    stub.get_best_device = lambda: "cpu"
    sys.modules.update({"awq": package, "awq.utils.utils": stub})
    try:
        spec = importlib.util.spec_from_file_location(
            "awq.modules.linear.gemm", root / "modules/linear/gemm.py"
        )
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        yield module
    finally:
        for name in [n for n in sys.modules if n == "awq" or n.startswith("awq.")]:
            del sys.modules[name]
        sys.modules.update(saved)


# ----------------------------------------------------------------------------- AWQ


def _autoawq_scales_and_zeros(
    w: torch.Tensor, group: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """AutoAWQ's ``pseudo_quantize_tensor`` with zero points (fp16 scales): ``(fake-quantized
    w [N, K], scales [K/G, N], zeros [K/G, N])`` as ``_apply_quant`` hands them to
    ``from_linear``."""
    n, k = w.shape
    g = w.reshape(-1, group)
    scales = (
        ((g.amax(dim=1, keepdim=True) - g.amin(dim=1, keepdim=True)).clamp(min=1e-5) / 15)
        .half()
        .float()
    )
    zeros = (-torch.round(g.amin(dim=1, keepdim=True) / scales)).clamp(0, 15)
    fake = (torch.clamp(torch.round(g / scales) + zeros, 0, 15) - zeros) * scales
    return (
        fake.reshape(n, k),
        scales.view(n, -1).t().contiguous(),
        zeros.view(n, -1).t().contiguous(),
    )


def test_awq_layer_written_by_autoawq_reads_as_autoawq_dequantizes() -> None:
    """FORMATS.md AWQ: "`qweight` int32 [K, N/8], packed along **N**; `qzeros` int32
    [K/G, N/8], packed the same way; `scales` fp16 [K/G, N]; optional `bias` [N]." and
    "Dequant: `W[k, n] = (q[k, n] - z[k // G, n]) * s[k // G, n]`; note this W is already
    [K, N], so y = x W." (written and read back by AutoAWQ itself, bias included)"""
    k, n, group = 64, 64, 32  # AutoAWQ's from_linear needs N % 32 == 0 (N // 32 * 4 words)
    gen = torch.Generator().manual_seed(0)
    linear = torch.nn.Linear(k, n, bias=True)
    w, scales, zeros = _autoawq_scales_and_zeros(torch.randn(n, k, generator=gen) * 0.1, group)
    with torch.no_grad():
        linear.weight.copy_(w)
        linear.bias.copy_(torch.randn(n, generator=gen))
    with autoawq_gemm() as gemm:
        written = gemm.WQLinear_GEMM.from_linear(linear, 4, group, scales=scales, zeros=zeros)
        tensors = {
            name: getattr(written, name).detach()
            for name in ("qweight", "qzeros", "scales", "bias")
        }
        theirs = gemm.dequantize_gemm(written.qweight, written.qzeros, written.scales, 4, group)
    assert tensors["qweight"].shape == (k, n // 8)
    assert tensors["qzeros"].shape == (k // group, n // 8)
    layer = load_layer(awq_config(group), tensors, k, n, bias=True)
    ours = layer.quant_method.dequantize(layer)  # [K, N] float32
    assert torch.equal(ours.half(), theirs)  # (q - z) * s: exact in fp32, one rounding in fp16
    assert torch.equal(ours, w.t())  # the fake-quantized weight AutoAWQ packed
    x = torch.randn(5, k, generator=gen)
    assert rel_err(layer(x), x.double() @ ours.double() + tensors["bias"].double()) < 1e-5


def test_awq_zero_points_are_stored_as_they_are() -> None:
    """FORMATS.md AWQ: "Zero points are unsigned 4-bit, stored as they are (no minus one)."
    and "To read logical column `8c + j`, shift right by `4 * REV[j]`" (qzeros words
    0x86427531 hold zero points 1..8; qweight nibbles all 15)."""
    k, n = 32, 8
    tensors = {
        "qweight": words((k, n // 8), 0xFFFFFFFF),
        "qzeros": words((1, n // 8), 0x86427531),
        "scales": torch.full((1, n), 0.5, dtype=torch.float16),
    }
    layer = load_layer(awq_config(32), tensors, k, n)
    expected = (15 - torch.arange(1, 9, dtype=torch.float32)) * 0.5  # (q - z) * s, z = 1..8
    assert torch.equal(layer.quant_method.dequantize(layer), expected.expand(k, n))


def test_awq_group_size_minus_one_is_one_group_of_k() -> None:
    """FORMATS.md: "G = group size (-1 means K)" with AWQ's "`qzeros` int32 [K/G, N/8]" and
    "`scales` fp16 [K/G, N]" (read as AutoAWQ's ``dequantize_gemm`` with group K reads it)."""
    k, n = 64, 16
    gen = torch.Generator().manual_seed(1)
    q, z = torch.randint(0, 16, (k, n), generator=gen), torch.randint(0, 16, (1, n), generator=gen)
    scales = (torch.rand(1, n, generator=gen) + 0.1).half()
    tensors = {"qweight": pack_awq(q), "qzeros": pack_awq(z), "scales": scales}
    layer = load_layer(awq_config(-1), tensors, k, n)
    with autoawq_gemm() as gemm:
        theirs = gemm.dequantize_gemm(tensors["qweight"], tensors["qzeros"], scales, 4, k)
    assert torch.equal(layer.quant_method.dequantize(layer).half(), theirs)


def test_awq_out_features_not_a_multiple_of_8_is_a_clear_error() -> None:
    """FORMATS.md AWQ: "Only 4-bit. K % G == 0, N % 8 == 0." (N = 12 packs into no whole
    int32)."""
    k, n = 32, 12
    tensors = {
        "qweight": torch.zeros(k, 2, dtype=torch.int32),
        "qzeros": torch.zeros(1, 2, dtype=torch.int32),
        "scales": torch.ones(1, n, dtype=torch.float16),
    }
    with pytest.raises(
        QuantFormatError, match=rf"{re.escape(PREFIX)}: out_features 12 is not a multiple of 8"
    ):
        load_layer(awq_config(32), tensors, k, n)


# ----------------------------------------------------------------------------- GPTQ


def test_gptq_loader_reads_the_documented_check_word() -> None:
    """FORMATS.md GPTQ: "`q[k, n] = (qweight[k // (32/b), n] >> (b * (k % (32/b)))) &
    (2^b - 1)`; values 1..8 along k pack (4-bit) to `0x87654321`." (read by the loader,
    zero points 8 stored as 0x88888888 in gptq_v2, scales 1)."""
    k = n = 8
    tensors = {
        "qweight": words((1, n), 0x87654321),
        "qzeros": words((1, 1), 0x88888888),
        "scales": torch.ones(1, n, dtype=torch.float16),
        "g_idx": torch.zeros(k, dtype=torch.int32),
    }
    layer = load_layer(gptq_config(4, 8, "gptq_v2"), tensors, k, n)
    expected = (torch.arange(1, 9, dtype=torch.float32) - 8).unsqueeze(1).expand(k, n)
    assert torch.equal(layer.quant_method.dequantize(layer), expected)


ZERO_WORDS = {  # (bits, checkpoint_format, sym, every qzeros word, the zero point it means)
    "4bit-v1-sym-stores-7": (4, "gptq", True, 0x77777777, 8),
    "4bit-v2-stores-8": (4, "gptq_v2", True, 0x88888888, 8),
    "2bit-v1-sym-stores-1": (2, "gptq", True, 0x55555555, 2),
    "8bit-v1-sym-stores-127": (8, "gptq", True, 0x7F7F7F7F, 128),
    "8bit-v2-stores-128": (8, "gptq_v2", True, 0x80808080, 128),
    "4bit-v1-asym-minus-one-masks-then-adds-1": (4, "gptq", False, 0xFFFFFFFF, 16),
}


@pytest.mark.parametrize("case", sorted(ZERO_WORDS))
def test_gptq_zero_point_words(case: str) -> None:
    """FORMATS.md GPTQ: "`checkpoint_format: "gptq"` (v1, the default and most checkpoints)
    stores **z - 1**; readers mask to b bits, then add 1. `checkpoint_format: "gptq_v2"`
    stores z itself. Symmetric (`sym: true`) means z = 2^(b-1) (stored 7 for 4-bit v1). An
    asymmetric v1 checkpoint whose real zero was 0 stored -1 (all ones, spilling into the
    higher fields of the word): a known lossy corner of the format; follow "mask, then add
    1"." (all q = 0 and s = 0.5, so W = -z / 2)"""
    bits, fmt, sym, word, zero = ZERO_WORDS[case]
    k, n = 32, 16
    tensors = {
        "qweight": torch.zeros(k * bits // 32, n, dtype=torch.int32),
        "qzeros": words((1, n * bits // 32), word),
        "scales": torch.full((1, n), 0.5, dtype=torch.float16),
        "g_idx": torch.zeros(k, dtype=torch.int32),
    }
    layer = load_layer(gptq_config(bits, 32, fmt, sym), tensors, k, n)
    assert torch.equal(layer.quant_method.dequantize(layer), torch.full((k, n), -zero / 2))


def test_gptq_without_g_idx_groups_by_k_div_g() -> None:
    """FORMATS.md GPTQ: "`g_idx[k]` is the group of input channel k. With `desc_act: true`
    (act-order) it is not monotonic; without it, `g_idx[k] = k // G` and may be ignored."
    and "`qzeros` int32 [ceil(K/G), N*b/32]" (K = 96, G = 40: three groups, no g_idx)."""
    k, n, group = 96, 16, 40
    gen = torch.Generator().manual_seed(2)
    q = torch.randint(0, 16, (k, n), generator=gen)
    z = torch.randint(1, 16, (3, n), generator=gen)
    s = (torch.rand(3, n, generator=gen) + 0.1).half()
    tensors = {"qweight": pack_gptq_rows(q, 4), "qzeros": pack_gptq_cols(z - 1, 4), "scales": s}
    layer = load_layer(gptq_config(4, group, "gptq", sym=False), tensors, k, n)
    g = torch.arange(k) // group
    expected = s.float()[g] * (q - z[g]).float()
    assert torch.equal(layer.quant_method.dequantize(layer), expected)


def test_gptq_config_keys_from_quantize_config_and_quantization_config(tmp_path: Path) -> None:
    """FORMATS.md GPTQ: "Config keys (in `quantize_config.json` and/or `quantization_config`):
    `bits, group_size, desc_act, sym, static_groups, damp_percent, quant_method: "gptq",
    checkpoint_format`." (some keys in each file: all of them are read)"""
    side = {
        "bits": 4,
        "group_size": 64,
        "desc_act": True,
        "sym": False,
        "static_groups": False,
        "damp_percent": 0.01,
        "checkpoint_format": "gptq_v2",
    }
    (tmp_path / "quantize_config.json").write_text(json.dumps(side))
    config = resolve(None, tmp_path, {"quant_method": "gptq", "bits": 4, "group_size": 64}, {})
    assert isinstance(config, GPTQConfig)
    assert (config.checkpoint_format, config.desc_act, config.sym) == ("gptq_v2", True, False)
    (tmp_path / "quantize_config.json").write_text(json.dumps({"bits": 4, "group_size": 64}))
    in_config_json = {
        "quant_method": "gptq",
        "bits": 4,
        "group_size": 64,
        "sym": True,
        "checkpoint_format": "gptq_v2",
    }
    assert resolve(None, tmp_path, in_config_json, {}).checkpoint_format == "gptq_v2"


def test_awq_and_gptq_configs_as_transformers_writes_them(tmp_path: Path) -> None:
    """FORMATS.md AWQ: "Config: `quantization_config = {quant_method: "awq", bits: 4,
    group_size, zero_point: true, version: "gemm"}`"; GPTQ: "Config keys (in
    `quantize_config.json` and/or `quantization_config`): `bits, group_size, desc_act, sym,
    static_groups, damp_percent, quant_method: "gptq", checkpoint_format`." (as transformers'
    ``AwqConfig`` / ``GPTQConfig.to_dict()`` write them, with all their other keys)"""
    from transformers import AwqConfig
    from transformers import GPTQConfig as HFGPTQConfig

    def written(config) -> dict:
        return json.loads(json.dumps(config.to_dict()))  # as saved in config.json

    awq = resolve(
        None,
        tmp_path,
        written(AwqConfig(bits=4, group_size=32, zero_point=True, version="gemm")),
        {},
    )
    assert isinstance(awq, AWQConfig) and (awq.group_size, awq.zero_point) == (32, True)
    gptq = resolve(
        None, tmp_path, written(HFGPTQConfig(bits=3, group_size=64, desc_act=True, sym=False)), {}
    )
    assert isinstance(gptq, GPTQConfig)
    assert (gptq.bits, gptq.group_size, gptq.desc_act, gptq.sym) == (3, 64, True, False)
    assert gptq.checkpoint_format == "gptq"


# ----------------------------------------------------------------------------- SqueezeLLM

_UNPICKLE_CALLS: list[tuple[int, ...]] = []


def _record_unpickling(shape: tuple[int, ...]) -> torch.Tensor:
    """Runs only if a checkpoint is unpickled with code execution allowed."""
    _UNPICKLE_CALLS.append(shape)
    return torch.zeros(shape)


class _CodeInPickle:
    """Pickles as a call of ``_record_unpickling``: what a malicious ``.pt`` could do."""

    def __init__(self, shape: tuple[int, ...]) -> None:
        self.shape = shape

    def __reduce__(self):
        return _record_unpickling, (self.shape,)


def test_squeezellm_pt_is_read_with_weights_only(tmp_path: Path) -> None:
    """FORMATS.md SqueezeLLM: "The released checkpoints are `.pt` state dicts: load them with
    `torch.load(weights_only=True)`, and accept safetensors too." (a .pt whose pickle calls a
    function is refused, and the function never runs)"""
    src = build_quant_checkpoint(tmp_path / "st", QuantSpec("squeezellm", bits=4))
    pt = as_state_dict(src, tmp_path / "pt", "model.pt")
    state = torch.load(pt / "model.pt", weights_only=True)
    name = "model.norm.weight"
    state[name] = _CodeInPickle(tuple(state[name].shape))
    torch.save(state, pt / "model.pt")
    _UNPICKLE_CALLS.clear()
    quant = resolve(None, pt, ModelConfig.from_pretrained(pt).quantization_config, {})
    with pytest.raises(ValueError, match=r"model\.pt: not a PyTorch state dict"):
        load_model(pt, torch.float32, "cpu", quant=quant)
    assert _UNPICKLE_CALLS == []


def test_squeezellm_fp32_table_runs_in_fp16() -> None:
    """FORMATS.md SqueezeLLM: "`qweight` int32 [K/8, N], packed along K exactly like GPTQ
    4-bit; `lookup_table` [N, 16] (fp32 in the original files, fp16 is fine at run time); no
    scales or zeros." and "Dequant: `W[k, n] = LUT[n, (qweight[k // 8, n] >> (4 * (k % 8)))
    & 0xF]`." (an fp16 model on the CPU)"""
    k, n = 32, 8
    gen = torch.Generator().manual_seed(3)
    qweight = pack_squeezellm(torch.randint(0, 16, (k, n), generator=gen), 4)
    lut = torch.randn(n, 16, generator=gen)
    config = SqueezeLLMConfig.from_checkpoint({"wbits": 4}, "quant_config.json", {})
    layer = load_layer(config, {"qweight": qweight, "lookup_table": lut}, k, n, dtype=torch.float16)
    kk = torch.arange(k)
    index = (qweight.long()[kk // 8] >> (4 * (kk % 8)).unsqueeze(1)) & 0xF  # [K, N]
    expected = lut.half()[torch.arange(n), index]  # LUT[n, q[k, n]]
    assert torch.equal(layer.quant_method.dequantize(layer).half(), expected)
    x = torch.randn(3, k, generator=gen).half()
    y = layer(x)
    assert y.dtype == torch.float16 and rel_err(y, x.double() @ expected.double()) < 1e-3


# ----------------------------------------------------------------------------- FP8


def test_autofp8_dynamic_checkpoint(tmp_path: Path) -> None:
    """FORMATS.md FP8: "Legacy `quant_method: "fp8"` (AutoFP8): `weight` e4m3fn,
    `weight_scale` fp32 scalar, `input_scale` fp32 scalar when `activation_scheme:
    "static"`" (here dynamic: no input_scale, activations quantized per token at run time)."""
    path = qc.autofp8_checkpoint(tmp_path / "ckpt", static=False)
    stored = load_file(str(path / "model.safetensors"))
    quant = resolve(None, path, ModelConfig.from_pretrained(path).quantization_config, {})
    model = load_model(path, torch.float32, "cpu", quant=quant)
    for prefix in qc.linear_prefixes():
        layer = model.get_submodule(prefix)
        assert f"{prefix}.input_scale" not in stored and layer.input_scale is None, prefix
        assert stored[f"{prefix}.weight_scale"].shape == ()
        expected = stored[f"{prefix}.weight"].float() * stored[f"{prefix}.weight_scale"]
        assert torch.equal(layer.quant_method.dequantize(layer), expected), prefix


def test_load_time_fp8_activations_are_dynamic_per_token() -> None:
    """FORMATS.md FP8: "At load time from fp16: per-tensor scale = amax / 448; activations
    dynamic, per token where the kernel supports it." (rows 10^4 apart in size: each keeps
    its own scale)"""
    k, n = 64, 16
    gen = torch.Generator().manual_seed(4)
    w = (torch.randn(n, k, generator=gen) * 0.05).half()
    layer = load_layer(FP8Config.from_checkpoint(None, "model", {}), {"weight": w}, k, n)
    assert torch.equal(layer.weight_scale, (w.float().abs().amax() / 448).reshape(1))
    x = torch.randn(2, k, generator=gen) * torch.tensor([[100.0], [0.01]])
    sx = x.abs().amax(dim=1, keepdim=True) / torch.tensor(448.0)  # per token
    xq = (x / sx).clamp(-448, 448).to(torch.float8_e4m3fn).double() * sx.double()
    expected = xq @ layer.quant_method.dequantize(layer).double().T
    y = layer(x)
    for row in range(2):
        assert rel_err(y[row], expected[row]) < 1e-5, row


def ct_args(kind: str, strategy: str, **kw) -> Any:
    """compressed-tensors' ``QuantizationArgs``: 8-bit, ``kind`` "float" | "int"."""
    from compressed_tensors.quantization import QuantizationArgs

    return QuantizationArgs(num_bits=8, type=kind, strategy=strategy, **{"symmetric": True, **kw})


def ct_layer(
    weights: Any, acts: Any, layer: dict[str, torch.Tensor]
) -> tuple[dict, dict[str, torch.Tensor]]:
    """``(quantization_config, tensors)`` of one Linear as compressed-tensors writes them:
    its config's ``to_dict()`` and its compressor's output for ``layer`` (float weights with
    their scales and zero points from ``calculate_qparams``)."""
    from compressed_tensors.compressors.naive_quantized import (
        FloatQuantizationCompressor,
        IntQuantizationCompressor,
    )
    from compressed_tensors.quantization import QuantizationConfig, QuantizationScheme

    scheme = QuantizationScheme(targets=["Linear"], weights=weights, input_activations=acts)
    compressor = (
        FloatQuantizationCompressor if weights.type == "float" else IntQuantizationCompressor
    )
    fmt = f"{weights.type}-quantized"
    config = QuantizationConfig(config_groups={"group_0": scheme}, format=fmt, ignore=["lm_head"])
    return config.to_dict(), dict(compressor.compress(layer, scheme))


def ct_qparams(
    low: torch.Tensor, high: torch.Tensor, args: Any
) -> tuple[torch.Tensor, torch.Tensor]:
    from compressed_tensors.quantization.utils import calculate_qparams

    return calculate_qparams(low, high, args)


def test_compressed_tensors_fp8_block_grid_is_read() -> None:
    """FORMATS.md FP8: "compressed-tensors, `format: "float-quantized"`: `weight`
    float8_e4m3fn [N, K]; `weight_scale` (1,) per tensor or (N, 1) per channel (or a block
    grid)" and "dequant `W = weight.float() * weight_scale`" (the scale of block (i, j)
    multiplies its [bn, bk] tile; a requantization may cost half an e4m3 step)."""
    k, n, b = 96, 64, 32
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(9)) * 0.05
    weights = ct_args("float", "block", block_structure=[b, b])
    tiles = w.reshape(n // b, b, k // b, b)
    scale, zero = ct_qparams(tiles.amin(dim=(1, 3)), tiles.amax(dim=(1, 3)), weights)
    raw, tensors = ct_layer(
        weights,
        ct_args("float", "token", dynamic=True),
        {"weight": w, "weight_scale": scale, "weight_zero_point": zero},
    )
    assert tensors["weight_scale"].shape == (n // b, k // b)
    ref = tensors["weight"].float() * scale.repeat_interleave(b, 0).repeat_interleave(b, 1)
    layer = load_layer(FP8Config.from_checkpoint(raw, "config.json", {}), tensors, k, n)
    bound = ref.abs() * 2**-4 + ref.abs().amax(dim=1, keepdim=True) / 448 * 2**-9
    assert bool(((layer.quant_method.dequantize(layer) - ref).abs() <= bound).all())


# ----------------------------------------------------------------------------- INT8


def test_int8_static_asymmetric_activations_keep_their_zero_point() -> None:
    """FORMATS.md INT8 W8A8: "`weight` int8 [N, K]; `weight_scale` [N, 1] (channel) or (1,);
    no zero point when symmetric; `input_scale` (+ `input_zero_point`) only for static
    activations." (written by compressed-tensors: static, asymmetric activations)"""
    k, n = 64, 16
    gen = torch.Generator().manual_seed(5)
    w = torch.randn(n, k, generator=gen) * 0.05
    x = torch.rand(4, k, generator=gen) * 3 - 0.5  # mostly positive: an off-centre zero point
    weights = ct_args("int", "channel")
    acts = ct_args("int", "tensor", symmetric=False, dynamic=False)
    sw, zw = ct_qparams(w.amin(dim=1, keepdim=True), w.amax(dim=1, keepdim=True), weights)
    sx, zx = ct_qparams(x.amin(), x.amax(), acts)
    assert int(zx) != 0
    raw, tensors = ct_layer(
        weights,
        acts,
        {
            "weight": w,
            "weight_scale": sw,
            "weight_zero_point": zw,
            "input_scale": sx,
            "input_zero_point": zx,
        },
    )
    layer = load_layer(Int8Config.from_checkpoint(raw, "config.json", {}), tensors, k, n)
    assert layer.input_zero_point.tolist() == [int(zx)]
    xq = (torch.round(x.double() / sx.double()) + int(zx)).clamp(-128, 127) - int(zx)
    expected = (xq @ tensors["weight"].double().T) * sx.double() * sw.double().reshape(1, -1)
    assert rel_err(layer(x), expected) < 1e-5


def test_int8_symmetric_weights_carry_no_zero_point() -> None:
    """FORMATS.md INT8 W8A8: "`weight` int8 [N, K]; `weight_scale` [N, 1] (channel) or (1,);
    no zero point when symmetric" (an all-zero one, as older writers store, reads as none; a
    non-zero one contradicts the config and is named)."""
    k, n = 32, 8
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(10))
    weights = ct_args("int", "channel")
    scale, zero = ct_qparams(w.amin(dim=1, keepdim=True), w.amax(dim=1, keepdim=True), weights)
    raw, tensors = ct_layer(
        weights,
        ct_args("int", "token", dynamic=True),
        {"weight": w, "weight_scale": scale, "weight_zero_point": zero},
    )
    config = Int8Config.from_checkpoint(raw, "config.json", {})
    assert "weight_zero_point" not in tensors and not bool(zero.any())
    layer = load_layer(config, {**tensors, "weight_zero_point": zero}, k, n)
    assert torch.equal(layer.quant_method.dequantize(layer), tensors["weight"].float() * scale)
    zero[3] = 2
    with pytest.raises(
        QuantFormatError, match=rf"{re.escape(PREFIX)}\.weight_zero_point is non-zero"
    ):
        load_layer(config, {**tensors, "weight_zero_point": zero}, k, n)


# ----------------------------------------------------------------------------- bitsandbytes


def _bnb_4bit_layer_tensors(
    codes: torch.Tensor,
    absmax: torch.Tensor,
    quant_map: torch.Tensor,
    quant_type: str,
    shape: tuple[int, int],
) -> dict[str, torch.Tensor]:
    """A 4-bit layer's tensors written by hand from FORMATS.md (no bitsandbytes quantizer)."""
    padded = torch.cat([codes, codes.new_zeros(codes.numel() % 2)])
    pairs = padded.view(-1, 2)
    weight = (pairs[:, 0] * 16 + pairs[:, 1]).to(torch.uint8).view(-1, 1)  # first: high nibble
    state = {"quant_type": quant_type, "blocksize": 64, "dtype": "float32", "shape": list(shape)}
    packed_state = torch.tensor(list(json.dumps(state).encode()), dtype=torch.uint8)
    return {
        "weight": weight,
        "weight.absmax": absmax,
        "weight.quant_map": quant_map,
        f"weight.quant_state.bitsandbytes__{quant_type}": packed_state,
    }


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_bnb_4bit_first_element_in_the_high_nibble(quant_type: str) -> None:
    """FORMATS.md bitsandbytes: "4-bit, for a layer prefix P: `P.weight` uint8
    [ceil(N*K/2), 1] (row-major flatten of [N, K], **first element in the high nibble**,
    the opposite of GPTQ/AWQ); `P.weight.absmax`; `P.weight.quant_map` [16]; ... and
    `P.weight.quant_state.bitsandbytes__nf4` (or `__fp4`): uint8 bytes of a JSON dict"
    (N*K = 135 is odd: 68 bytes, 3 blocks of 64)."""
    import bitsandbytes.functional as bf

    n, k = 9, 15
    gen = torch.Generator().manual_seed(6)
    codes = torch.randint(0, 16, (n * k,), generator=gen)
    absmax = torch.rand(3, generator=gen) + 0.5
    quant_map = bf.get_4bit_type(quant_type, device="cpu").float()
    tensors = _bnb_4bit_layer_tensors(codes, absmax, quant_map, quant_type, (n, k))
    assert tensors["weight"].shape == ((n * k + 1) // 2, 1)
    raw = {
        "quant_method": "bitsandbytes",
        "load_in_4bit": True,
        "bnb_4bit_quant_type": quant_type,
        "bnb_4bit_quant_storage": "uint8",
    }
    layer = load_layer(BitsAndBytesConfig.from_checkpoint(raw, "config.json", {}), tensors, k, n)
    expected = (quant_map[codes] * absmax[torch.arange(n * k) // 64]).view(n, k)
    assert torch.equal(layer.quant_method.dequantize(layer).float(), expected)


def test_bnb_llm_int8_dequantizes_as_q_times_scb_over_127() -> None:
    """FORMATS.md bitsandbytes: "8-bit (LLM.int8): `P.weight` int8 [N, K], `P.SCB` fp32 [N]
    (row absmax), `P.weight_format`; dequant `W = q * SCB[:, None] / 127`." (bitsandbytes
    multiplies by a float32 1/127: within one ulp of the formula, not bit-exact)"""
    import bitsandbytes.functional as bf

    n, k = 16, 64
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(7))
    q, scb, _ = bf.int8_vectorwise_quant(w.half())
    tensors = {"weight": q, "SCB": scb, "weight_format": torch.tensor(0, dtype=torch.uint8)}
    raw = {"quant_method": "bitsandbytes", "load_in_8bit": True}
    layer = load_layer(BitsAndBytesConfig.from_checkpoint(raw, "config.json", {}), tensors, k, n)
    assert torch.equal(scb, w.half().float().abs().amax(dim=1))  # row absmax
    expected = q.float() * scb[:, None] / 127
    torch.testing.assert_close(
        layer.quant_method.dequantize(layer).float(), expected, rtol=2.5e-7, atol=0
    )


# ----------------------------------------------------------------------------- FP8 KV cache


def test_kv_cache_dtype_flag_choices() -> None:
    """FORMATS.md FP8 KV cache: "`--kv_cache_dtype auto|fp8|fp8_e4m3|fp8_e5m2`; `fp8` means
    e4m3." (the command line takes exactly these)"""
    from agent.service.settings import SettingsError, parse_settings

    for value in ("auto", "fp8", "fp8_e4m3", "fp8_e5m2"):
        settings = parse_settings(["--kv_cache_dtype", value], environ={})
        assert settings.engine_config().kv_cache_dtype == value
    with pytest.raises(
        SettingsError, match="--kv_cache_dtype must be one of auto, fp8, fp8_e4m3, fp8_e5m2"
    ):
        parse_settings(["--kv_cache_dtype", "int8"], environ={})


def test_kv_scales_are_ignored_with_auto(caplog: pytest.LogCaptureFixture) -> None:
    """FORMATS.md FP8 KV cache: "Per-tensor scales per layer: `k_scale`, `v_scale` ... With
    `auto` they are ignored" (a model-dtype cache stores and returns K/V unscaled)."""
    with caplog.at_level(logging.INFO):
        kv = PagedKVCache(2, 2, 4, 1, 8, torch.float32, "cpu", "auto", [0.5, 0.25], [2.0, 4.0])
    assert kv.k_scales == [1.0, 1.0] and kv.v_scales == [1.0, 1.0]
    assert "unused" in caplog.text
    layer = kv.layers[1]
    k = torch.randn(3, 1, 8, generator=torch.Generator().manual_seed(8))
    write_kv_ref(k, 2 * k, layer.k, layer.v, torch.tensor([0, 1, 5]), layer.k_scale, layer.v_scale)
    read = dequantize(layer.k.view(-1, 1, 8)[[0, 1, 5]], layer.k_scale, torch.float32)
    assert torch.equal(read, k)


def test_fp8_e5m2_kv_write_saturates_and_reads_times_scale() -> None:
    """FORMATS.md FP8 KV cache: "Write `fp8(x / scale)` saturating; read `float(fp8) *
    scale`." (e5m2: its largest finite value is 57344; nothing becomes inf)"""
    cache = torch.zeros(1, 4, 1, 2, dtype=torch.float8_e5m2)  # [blocks, block_size, Hkv, D]
    x = torch.tensor([[[1e9, -1e9]], [[3.0, -0.75]]])  # [T, Hkv, D]
    write_kv_ref(x, x, cache, cache.clone(), torch.tensor([0, 2]), 0.5, 0.5)
    stored = cache.view(4, 2).float()
    assert stored[0].tolist() == [57344.0, -57344.0] and stored[2].tolist() == [6.0, -1.5]
    read = dequantize(cache.view(4, 1, 2)[[2]], 0.5, torch.float32)
    assert read.flatten().tolist() == [3.0, -0.75]
