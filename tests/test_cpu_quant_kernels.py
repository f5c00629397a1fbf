"""The CPU paths of the weight-only formats (engine.quantization.cpu_kernels / cpu_bind):
torch's int4 and int8 CPU kernels bound once at load, against dequantize-then-matmul.

Tolerance for the bf16 kernels (``BF16_TOL``): the kernels compute in bfloat16, so on top of
the reference's float32 maths there are up to three roundings of 2^-9 relative each (the
float zero term to bf16, the dequantized weight inside the kernel, the output to bf16); a
norm-wise bound of 4 x 2^-9 ~ 8e-3 covers them with room, and a wrong nibble, zero or group
(errors of order 1) is far above it. float32 layers must stay exact (1e-5, FORMATS.md).
"""

from __future__ import annotations

import logging
from contextlib import contextmanager

import pytest
import torch

from deploy_kernels import log_once
from deploy_kernels.fp8_gemm_ref import fp8_linear_ref, fp8_weight_only_ref
from deploy_kernels.int8_gemm_ref import int8_linear_ref
from engine.layers.linear import Linear
from engine.quantization.awq import AWQConfig
from engine.quantization.base import TensorSet
from engine.quantization.cpu_kernels import (
    bind_int4_cpu,
    int4_kernel_group,
    int8_mm_cpu,
    int8_pair_mm_cpu,
    pack_int4_cpu,
    pack_int8_cpu,
    pack_int8_pair_cpu,
    unpack_int4_cpu,
)
from engine.quantization.gptq import GPTQConfig
from engine.quantization.packing import pack_awq, pack_gptq_cols, pack_gptq_rows

BF16_TOL = 8e-3
FP32_TOL = 1e-5
PREFIX = "model.layers.0.mlp.up_proj"


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    assert not torch.isnan(y).any()
    return float((y.double() - ref.double()).norm() / ref.double().norm())


@contextmanager
def no_per_call_dequant():
    """Make every whole-weight dequantization the old forward used raise (load is done)."""

    def boom(*args, **kwargs):
        raise AssertionError("the whole weight was dequantized during forward")

    import engine.quantization.fp8 as fp8_mod
    import engine.quantization.int_linear as int_linear

    with pytest.MonkeyPatch.context() as mp:
        for target in (int_linear, fp8_mod):
            for name in ("dequantize_int", "int_gemm_ref", "dequantize_lut", "lut_gemm_ref",
                         "dequantize_fp8_weight"):
                if hasattr(target, name):
                    mp.setattr(target, name, boom)
        mp.setattr("deploy_kernels.fp8_gemm_ref.dequantize_fp8_weight", boom)
        mp.setattr("deploy_kernels.int8_gemm_ref.int8_linear_ref", boom)
        mp.setattr("engine.quantization.cpu_kernels.unpack_int4_cpu", boom)
        yield


def _load(method, tensors: dict[str, torch.Tensor], k: int, n: int, dtype: torch.dtype, bias: bool = False) -> Linear:
    with torch.device("meta"):
        layer = Linear(k, n, bias=bias, quant_method=method)
    ts = TensorSet(PREFIX, tensors)
    layer.quant_method.load(layer, ts, torch.device("cpu"), dtype)
    ts.finish()
    return layer


# ----------------------------------------------------------------------------- layers


def awq_layer(k: int, n: int, group: int, dtype: torch.dtype, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    g = k if group == -1 else group
    q = torch.randint(0, 16, (k, n), generator=gen, dtype=torch.int32)
    z = torch.randint(0, 16, (k // g, n), generator=gen, dtype=torch.int32)
    s = (torch.rand(k // g, n, generator=gen) * 0.02 + 0.005).half()
    config = AWQConfig.from_checkpoint(
        {"quant_method": "awq", "bits": 4, "group_size": group, "zero_point": True, "version": "gemm"},
        "config.json", {})
    layer = _load(config.linear_method(PREFIX), {"qweight": pack_awq(q), "qzeros": pack_awq(z), "scales": s},
                  k, n, dtype)
    idx = torch.arange(k) // g
    return layer, (q - z[idx]).float() * s.to(dtype).float()[idx]


def gptq_layer(k: int, n: int, bits: int, group: int, sym: bool, act_order: bool, dtype: torch.dtype,
               seed: int = 0, bias: bool = False):
    gen = torch.Generator().manual_seed(seed)
    g = k if group == -1 else group
    groups = -(-k // g)
    q = torch.randint(0, 2**bits, (k, n), generator=gen, dtype=torch.int32)
    if sym:
        z = torch.full((groups, n), 2 ** (bits - 1), dtype=torch.int32)
    else:
        z = torch.randint(1, 2**bits, (groups, n), generator=gen, dtype=torch.int32)
    s = (torch.rand(groups, n, generator=gen) * 0.02 + 0.005).half()
    g_idx = torch.arange(k) // g
    if act_order:
        g_idx = g_idx[torch.randperm(k, generator=gen)]
    tensors = {"qweight": pack_gptq_rows(q, bits), "qzeros": pack_gptq_cols(z - 1, bits), "scales": s,
               "g_idx": g_idx.to(torch.int32)}
    if bias:
        tensors["bias"] = torch.randn(n, generator=gen).half()
    config = GPTQConfig.from_raw({"bits": bits, "group_size": group, "desc_act": act_order, "sym": sym}, "cfg")
    layer = _load(config.linear_method(PREFIX), tensors, k, n, dtype, bias=bias)
    w = (q - z[g_idx]).float() * s.to(dtype).float()[g_idx]
    return layer, w


INT4_CASES = {  # name -> (builder, kind the CPU binds)
    "awq-g32": (lambda d: awq_layer(256, 128, 32, d), "int4"),
    "awq-g128": (lambda d: awq_layer(256, 64, 128, d, seed=1), "int4"),
    "awq-one-group-576": (lambda d: awq_layer(576, 64, -1, d, seed=2), "int4"),  # run as 9 x 64
    "gptq-4bit-sym": (lambda d: gptq_layer(256, 128, 4, 64, True, False, d, seed=3), "int4"),
    "gptq-4bit-asym": (lambda d: gptq_layer(256, 128, 4, 32, False, False, d, seed=4), "int4"),
    "gptq-4bit-act-order-bias": (lambda d: gptq_layer(256, 128, 4, 64, False, True, d, seed=5, bias=True), "int4"),
    "gptq-3bit-act-order": (lambda d: gptq_layer(256, 64, 3, 32, False, True, d, seed=6), "int4"),
    "gptq-2bit": (lambda d: gptq_layer(256, 64, 2, 64, False, False, d, seed=7), "int4"),
    "gptq-8bit-sym-one-group": (lambda d: gptq_layer(256, 64, 8, -1, True, False, d, seed=8), "int8"),
    "gptq-8bit-asym-one-group": (lambda d: gptq_layer(256, 64, 8, -1, False, False, d, seed=9), "int8"),
    "gptq-8bit-act-order-grouped": (lambda d: gptq_layer(256, 64, 8, 64, True, True, d, seed=10), "int8_pair"),
    "gptq-8bit-asym-g32": (lambda d: gptq_layer(256, 64, 8, 32, False, False, d, seed=13), "int8_pair"),
    "gptq-8bit-g16": (lambda d: gptq_layer(256, 64, 8, 16, False, False, d, seed=14), "dense"),
    "gptq-4bit-g48": (lambda d: gptq_layer(192, 64, 4, 48, False, False, d, seed=11), "dense"),
    "awq-n-not-16": (lambda d: awq_layer(128, 24, 32, d, seed=12), "dense"),
}


@pytest.mark.parametrize("case", sorted(INT4_CASES))
@pytest.mark.parametrize("m", [1, 16])
@torch.inference_mode()
def test_bf16_layers_run_on_cpu_kernels(case: str, m: int) -> None:
    build, kind = INT4_CASES[case]
    layer, w = build(torch.bfloat16)
    assert layer.quant_method.cpu_kind == kind
    assert getattr(layer, "qweight", None) is None  # the packed GPU layout is not kept too
    x = torch.randn(m, layer.in_features, generator=torch.Generator().manual_seed(m)).bfloat16()
    ref = x.float() @ w + (layer.bias.float() if layer.bias is not None else 0)
    with no_per_call_dequant():
        y = layer(x)
    assert y.dtype == torch.bfloat16 and y.shape == (m, layer.out_features)
    assert rel_err(y, ref) < BF16_TOL, rel_err(y, ref)


@pytest.mark.parametrize("case", ["awq-g32", "gptq-4bit-act-order-bias", "gptq-8bit-asym-one-group"])
@torch.inference_mode()
def test_float32_layers_are_exact_and_dequantized_once(case: str) -> None:
    layer, w = INT4_CASES[case][0](torch.float32)
    assert layer.quant_method.cpu_kind == "dense" and getattr(layer, "perm", None) is None
    for m in (1, 16):
        x = torch.randn(m, layer.in_features)
        ref = x @ w + (layer.bias.float() if layer.bias is not None else 0)
        with no_per_call_dequant():
            y = layer(x)
        assert rel_err(y, ref) < FP32_TOL


@pytest.mark.parametrize("case", ["awq-g32", "gptq-4bit-act-order-bias", "gptq-8bit-asym-one-group",
                                  "gptq-8bit-act-order-grouped", "gptq-8bit-asym-g32"])
@torch.inference_mode()
def test_dequantize_reads_the_bound_buffers(case: str) -> None:
    """``dequantize`` of a layer bound to a CPU kernel gives its runtime weight, in the
    checkpoint's channel order: the reference weight up to the bf16 zero term."""
    layer, w = INT4_CASES[case][0](torch.bfloat16)
    got = layer.quant_method.dequantize(layer)
    assert got.shape == w.shape and rel_err(got, w) < 2**-8


def test_fp16_layers_use_the_bf16_kernel() -> None:
    layer, w = awq_layer(256, 64, 64, torch.float16, seed=13)
    assert layer.quant_method.cpu_kind == "int4"
    x = torch.randn(3, 256).half()
    y = layer(x)
    assert y.dtype == torch.float16 and rel_err(y, x.float() @ w) < BF16_TOL


def test_memory_stays_packed() -> None:
    """A 4096 x 4096 int4 layer bound for the CPU kernel: packed nibbles + bf16 scale/zero
    pairs, at most 0.27 of its fp16 bytes (nothing dense beside it)."""
    layer, _ = awq_layer(4096, 4096, 128, torch.bfloat16, seed=14)
    nbytes = sum(t.numel() * t.element_size() for t in layer.buffers())
    assert nbytes / (2 * 4096 * 4096) <= 0.27


# ----------------------------------------------------------------------------- kernels API


@pytest.mark.parametrize(("k", "n", "group"), [(576, 1536, 64), (1536, 576, 128), (256, 32, 256), (512, 16, -1)])
@pytest.mark.parametrize("m", [1, 16])
def test_bind_int4_cpu_with_float_offsets(k: int, n: int, group: int, m: int) -> None:
    """The GGUF form ``W = q * scale + min`` (float mins, not integer zeros)."""
    gen = torch.Generator().manual_seed(k + n + m)
    g = k if group == -1 else group
    q = torch.randint(0, 16, (k, n), generator=gen, dtype=torch.uint8)
    scales = torch.rand(k // g, n, generator=gen) * 0.02 + 0.001
    mins = -torch.rand(k // g, n, generator=gen) * 0.1
    bias = torch.randn(n, generator=gen)
    kernel = bind_int4_cpu(q, scales, mins, g, bias)
    idx = torch.arange(k) // g
    w = q.float() * scales[idx] + mins[idx]
    x = torch.randn(m, k, generator=gen)
    y = kernel(x)
    assert y.dtype == torch.float32
    assert rel_err(y, x.bfloat16().float() @ w + bias) < BF16_TOL


def test_unpack_int4_cpu_is_the_packing_inverse() -> None:
    gen = torch.Generator().manual_seed(1)
    q = torch.randint(0, 16, (128, 32), generator=gen)
    scales = torch.rand(4, 32, generator=gen) + 0.1
    offsets = torch.randn(4, 32, generator=gen)
    packed = pack_int4_cpu(q, scales, offsets, 32)
    sz = packed.scales_and_zeros.float().repeat_interleave(32, 0)
    expected = (q.float() - 8) * sz[..., 0] + sz[..., 1]
    assert torch.equal(unpack_int4_cpu(packed.qweight, packed.scales_and_zeros, 32), expected)


def test_int8_pack_and_mm() -> None:
    gen = torch.Generator().manual_seed(2)
    k, n = 384, 48
    q = torch.randint(0, 256, (k, n), generator=gen)
    zeros = torch.randint(0, 256, (n,), generator=gen).float()
    scales = torch.rand(n, generator=gen) * 0.01 + 0.001
    packed = pack_int8_cpu(q, scales, zeros)
    x = torch.randn(16, k, generator=gen).bfloat16()
    w = (q.float() - zeros) * packed.scales.float()
    assert rel_err(int8_mm_cpu(x, packed.qweight, packed.scales, packed.offsets), x.float() @ w) < BF16_TOL
    assert pack_int8_cpu(q, scales, torch.full((n,), 128.0)).offsets is None  # symmetric


@pytest.mark.parametrize("m", [1, 16])
def test_int8_pair_pack_and_mm(m: int) -> None:
    """A scale per group of 8-bit values (GGUF Q8_0's form, float mins) through two int4
    products, one per nibble: the exact weight up to bf16 rounding, no large cancelling terms."""
    gen = torch.Generator().manual_seed(3 + m)
    k, n, group = 256, 96, 32
    q = torch.randint(0, 256, (k, n), generator=gen)
    scales = torch.rand(k // group, n, generator=gen) * 0.01 + 0.001
    mins = -128 * scales + torch.randn(k // group, n, generator=gen) * 0.01
    idx = torch.arange(k) // group
    w = q.float() * scales[idx] + mins[idx]
    pair = pack_int8_pair_cpu(q, scales, mins, group)
    halves = [unpack_int4_cpu(h.qweight, h.scales_and_zeros, h.group) for h in (pair.high, pair.low)]
    assert rel_err(halves[0] + halves[1], w) < 2**-8
    assert halves[1].abs().max() <= 8 * scales.max() * 1.01  # the low half stays small
    x = torch.randn(m, k, generator=gen).bfloat16()
    bias = torch.randn(n, generator=gen)
    y = int8_pair_mm_cpu(x, pair, bias)
    assert y.dtype == torch.bfloat16 and rel_err(y, x.float() @ w + bias) < BF16_TOL
    with pytest.raises(ValueError, match="0..255"):
        pack_int8_pair_cpu(q + 1, scales, mins, group)
    with pytest.raises(ValueError, match="not a multiple of 32"):
        pack_int8_pair_cpu(q, torch.ones(k // 16, n), torch.zeros(k // 16, n), 16)


def test_kernel_shape_rules_and_bad_input() -> None:
    assert int4_kernel_group(576, 64, 576) == 64 and int4_kernel_group(4096, 64, 128) == 128
    assert "multiple of 16" in int4_kernel_group(64, 24, 32)
    assert "not a multiple of 32" in int4_kernel_group(96, 32, 48)
    assert "in_features" in int4_kernel_group(100, 32, 32)
    with pytest.raises(ValueError, match="0..15"):
        pack_int4_cpu(torch.full((64, 16), 16), torch.ones(2, 16), torch.zeros(2, 16), 32)
    with pytest.raises(ValueError, match="scales must be float"):
        pack_int4_cpu(torch.zeros(64, 16, dtype=torch.int32), torch.ones(3, 16), torch.zeros(2, 16), 32)
    with pytest.raises(ValueError, match="2-D integer"):
        pack_int4_cpu(torch.zeros(64, 16), torch.ones(2, 16), torch.zeros(2, 16), 32)
    with pytest.raises(ValueError, match="0..255"):
        pack_int8_cpu(torch.full((8, 4), 256), torch.ones(4), torch.zeros(4))


def test_each_choice_is_logged_once(caplog: pytest.LogCaptureFixture) -> None:
    for key in [k for k in log_once._LOGGED if k.startswith("cpu-bind-")]:
        log_once._LOGGED.discard(key)
    with caplog.at_level(logging.INFO, logger="engine.quantization.cpu_bind"):
        for seed in range(3):
            awq_layer(128, 32, 32, torch.bfloat16, seed=seed)
            gptq_layer(192, 64, 4, 48, False, False, torch.bfloat16, seed=seed)
            awq_layer(128, 32, 32, torch.float32, seed=seed)
    lines = [r.getMessage() for r in caplog.records]
    assert sum("int4 weight-only kernel" in line for line in lines) == 1
    assert sum("group size 48 is not a multiple of 32" in line for line in lines) == 1
    assert sum("float32 activations" in line for line in lines) == 1


# ----------------------------------------------------------------------------- fp8 / int8 W8A8


def _ct_layer(kind: str, dynamic: bool | None, dtype: torch.dtype):
    from engine.quantization.compressed_tensors import CTScheme
    from engine.quantization.fp8 import FP8LinearMethod, quantize_fp8
    from engine.quantization.int8 import Int8LinearMethod, quantize_int8_per_channel

    gen = torch.Generator().manual_seed(3)
    k, n = 256, 64
    w = torch.randn(n, k, generator=gen) * 0.05
    if dynamic is None:
        scheme = CTScheme("channel", None, False, True)
    else:
        scheme = CTScheme("channel", "token" if dynamic else "tensor", dynamic, True)
    tensors = {}
    if kind == "fp8":
        q, scale = quantize_fp8(w, per_channel=True)
        method = FP8LinearMethod(scheme, "compressed-tensors")
    else:
        q, scale = quantize_int8_per_channel(w)
        method = Int8LinearMethod(scheme)
    tensors = {"weight": q, "weight_scale": scale}
    if dynamic is False:
        tensors["input_scale"] = torch.tensor([0.02])
    layer = _load(method, tensors, k, n, dtype)
    return layer, tensors


@pytest.mark.parametrize(("kind", "dynamic"), [("fp8", None), ("fp8", True), ("fp8", False), ("int8", True),
                                               ("int8", False)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@torch.inference_mode()
def test_w8_formats_on_the_cpu(kind: str, dynamic: bool | None, dtype: torch.dtype) -> None:
    """FP8: dequantized once at load; INT8 W8A8: integer products by the int8 kernel (bf16)
    or a float32 matmul on the exact integer weights (float32). Against the reference
    linear (activation quantization included), with the reference restored."""
    refs = {"fp8": fp8_linear_ref, "int8": int8_linear_ref}
    layer, t = _ct_layer(kind, dynamic, dtype)
    for m in (1, 16):
        x = torch.randn(m, 256, generator=torch.Generator().manual_seed(m)).to(dtype)
        with no_per_call_dequant():
            y = layer(x)
        if kind == "fp8" and dynamic is None:
            ref = fp8_weight_only_ref(x.float(), t["weight"], t["weight_scale"])
        else:
            ref = refs[kind](x.float(), t["weight"], t["weight_scale"], t.get("input_scale"))
        tol = FP32_TOL if dtype == torch.float32 else (2e-2 if kind == "fp8" else 1e-2)
        assert y.dtype == dtype and rel_err(y, ref) < tol, rel_err(y, ref)
