"""FP8 and INT8 W8A8 linears: the references against independent float64 math and against
the unquantized matmul (within a stated bound), the scale variants, saturation; the Triton
kernels in the interpreter (``tests/w8a8_interp.py``, child process) and compiled on a GPU.
"""

from __future__ import annotations

import importlib.util
import logging

import pytest
import torch

from deploy_kernels.fp8_gemm import fp8_linear
from deploy_kernels.fp8_gemm_ref import fp8_linear_ref, fp8_weight_only_ref
from deploy_kernels.int8_gemm import int8_linear
from deploy_kernels.int8_gemm_ref import int8_linear_ref

torch.set_num_threads(1)

HAS_TRITON = importlib.util.find_spec("triton") is not None
gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
SHAPES = [(1, 64, 48), (5, 96, 40), (33, 200, 72)]  # (M, K, N), odd tails


# -- helpers (also used by tests/w8a8_interp.py) ------------------------------------------------


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref||; NaN anywhere gives inf (never passes)."""
    if not torch.isfinite(out).all():
        return float("inf")
    return float((out.double() - ref.double()).norm() / ref.double().norm())


def make_x(m: int, k: int, seed: int, dtype: torch.dtype = torch.float32, device: str = "cpu") -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    rows = torch.randn(m, k, generator=g) * torch.rand(m, 1, generator=g).mul(4).add(0.1)  # row ranges differ
    return rows.to(device=device, dtype=dtype)


def make_fp8_weight(n: int, k: int, seed: int, per_channel: bool, device: str = "cpu") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(weight e4m3 [N, K], weight_scale (N, 1) or (1,), the float weight it came from)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * 0.05
    amax = w.abs().amax(dim=1, keepdim=True) if per_channel else w.abs().amax().reshape(1)
    scale = amax / 448
    q = (w / scale.reshape(-1, 1)).clamp(-448, 448).to(torch.float8_e4m3fn)
    return q.to(device), scale.to(device), w.to(device)


def make_int8_weight(n: int, k: int, seed: int, per_channel: bool, device: str = "cpu") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * 0.05
    amax = w.abs().amax(dim=1, keepdim=True) if per_channel else w.abs().amax().reshape(1)
    scale = amax / 127
    q = torch.round(w / scale.reshape(-1, 1)).clamp(-128, 127).to(torch.int8)
    return q.to(device), scale.to(device), w.to(device)


def make_bias(n: int, seed: int, device: str = "cpu") -> torch.Tensor:
    return torch.randn(n, generator=torch.Generator().manual_seed(seed)).to(device)


# -- independent float64 computations ---------------------------------------------------------


def fp8_linear_f64(x, weight, weight_scale, input_scale, bias) -> torch.Tensor:
    x64 = x.double()
    if input_scale is None:
        sx = (x.float().abs().amax(1, keepdim=True).clamp_min(1e-12) / 448).double()  # fp32 scale, as specified
    else:
        sx = input_scale.double().reshape(1, 1)
    xq = (x64 / sx).clamp(-448, 448).to(torch.float8_e4m3fn).double() * sx
    w = weight.double() * weight_scale.double().reshape(-1, 1)
    y = xq @ w.T
    return y if bias is None else y + bias.double()


def int8_linear_f64(x, weight, weight_scale, input_scale, zero_point, bias) -> torch.Tensor:
    if input_scale is None:
        sx = (x.float().abs().amax(1, keepdim=True).clamp_min(1e-12) / 127).double()
        zp = 0.0
    else:
        sx = input_scale.double().reshape(1, 1)
        zp = 0.0 if zero_point is None else float(zero_point)
    xq = (torch.round(x.double() / sx) + zp).clamp(-128, 127) - zp
    y = (xq @ weight.double().T) * sx * weight_scale.double().reshape(1, -1)
    return y if bias is None else y + bias.double()


# -- CPU: the dispatching functions (reference path) ------------------------------------------


@pytest.mark.parametrize("static", [False, True])
@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_fp8_linear_cpu_matches_float64(shape, per_channel: bool, static: bool) -> None:
    m, k, n = shape
    x = make_x(m, k, seed=m + k)
    weight, ws, _ = make_fp8_weight(n, k, seed=n, per_channel=per_channel)
    input_scale = (x.abs().amax() / 448 * 0.7).reshape(1) if static else None  # some values saturate
    bias = make_bias(n, seed=1) if m != 5 else None
    out = fp8_linear(x, weight, ws, input_scale, bias)
    assert out.dtype == torch.float32 and out.shape == (m, n)
    assert rel_err(out, fp8_linear_f64(x, weight, ws, input_scale, bias)) < 1e-5


@pytest.mark.parametrize("static", ["dynamic", "static", "static_zp"])
@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_int8_linear_cpu_matches_float64(shape, per_channel: bool, static: str) -> None:
    m, k, n = shape
    x = make_x(m, k, seed=m * k)
    weight, ws, _ = make_int8_weight(n, k, seed=n + 1, per_channel=per_channel)
    si = (x.abs().amax() / 127).reshape(1) if static != "dynamic" else None
    zp = torch.tensor([-7], dtype=torch.int8) if static == "static_zp" else None
    bias = make_bias(n, seed=2) if m != 5 else None
    out = int8_linear(x, weight, ws, si, zp, bias)
    assert out.dtype == torch.float32 and out.shape == (m, n)
    assert rel_err(out, int8_linear_f64(x, weight, ws, si, zp, bias)) < 1e-5


def test_fp16_inputs_return_fp16() -> None:
    x = make_x(7, 64, seed=5, dtype=torch.float16)
    w8, ws8, _ = make_fp8_weight(32, 64, seed=6, per_channel=True)
    wi, wsi, _ = make_int8_weight(32, 64, seed=7, per_channel=True)
    y8 = fp8_linear(x, w8, ws8)
    yi = int8_linear(x, wi, wsi)
    assert y8.dtype == yi.dtype == torch.float16
    assert rel_err(y8, fp8_linear_f64(x, w8, ws8, None, None)) < 1e-3
    assert rel_err(yi, int8_linear_f64(x, wi, wsi, None, None, None)) < 1e-3


# -- the references against the unquantized matmul -------------------------------------------
# Elementwise bounds, from the per-element quantization errors (|dx| for x, |dw| for W):
#   |y_q - y| <= sum_k (|dx| |w| + |x| |dw| + |dx| |dw|)  (+ fp32 rounding slack)
# INT8 (round to nearest): |dx| <= sx / 2, |dw| <= sw / 2.
# FP8 e4m3 (3 mantissa bits, nearest): |d| <= max(|v| * 2^-4, s * 2^-10) (normals: half an
# ulp relative; subnormals: half the spacing 2^-9 times the scale). No value saturates here.


def _bound(x, w, dx, dw) -> torch.Tensor:
    return dx @ w.abs().T + x.abs() @ dw.T + dx @ dw.T


@pytest.mark.parametrize("per_channel", [False, True])
def test_fp8_ref_within_quantization_bound(per_channel: bool) -> None:
    m, k, n = 9, 160, 56
    x = make_x(m, k, seed=11)
    weight, ws, w = make_fp8_weight(n, k, seed=12, per_channel=per_channel)
    sx = x.abs().amax(1, keepdim=True) / 448
    y = x.double() @ w.double().T
    got = fp8_linear_ref(x, weight, ws).double()
    dx = torch.maximum(x.abs() * 2**-4, sx * 2**-10).double()
    dw = torch.maximum(w.abs() * 2**-4, ws.reshape(-1, 1) * 2**-10).double()
    bound = _bound(x.double(), w.double(), dx, dw) * (1 + 1e-5) + 1e-6
    assert ((got - y).abs() <= bound).all()
    assert 0 < rel_err(got, y) < 0.06  # typically ~0.03: quantization happens, within ~2^-4


@pytest.mark.parametrize("per_channel", [False, True])
def test_int8_ref_within_quantization_bound(per_channel: bool) -> None:
    m, k, n = 9, 160, 56
    x = make_x(m, k, seed=13)
    weight, ws, w = make_int8_weight(n, k, seed=14, per_channel=per_channel)
    sx = (x.abs().amax(1, keepdim=True) / 127).double()
    y = x.double() @ w.double().T
    got = int8_linear_ref(x, weight, ws).double()
    dx = (sx / 2).expand(m, k)
    dw = (ws.double().reshape(-1, 1) / 2).expand(n, k)
    bound = _bound(x.double(), w.double(), dx, dw) * (1 + 1e-5) + 1e-6
    assert ((got - y).abs() <= bound).all()
    assert 0 < rel_err(got, y) < 0.02  # typically ~0.008


# -- static vs dynamic, per tensor vs per channel, saturation ----------------------------------


def _equal_row_ranges(m: int, k: int, amax: float) -> torch.Tensor:
    """Rows whose absmax is exactly ``amax``: a static scale then equals every token's scale."""
    x = make_x(m, k, seed=21).clamp(-0.9 * amax, 0.9 * amax)
    x[:, 3] = amax * torch.where(torch.arange(m) % 2 == 0, 1.0, -1.0)
    return x


def test_static_scale_equal_to_token_scales_gives_dynamic_result() -> None:
    x = _equal_row_ranges(6, 64, amax=3.0)
    w8, ws8, _ = make_fp8_weight(24, 64, seed=22, per_channel=True)
    wi, wsi, _ = make_int8_weight(24, 64, seed=23, per_channel=True)
    s8 = (torch.tensor([3.0]) / 448).float()
    si = (torch.tensor([3.0]) / 127).float()
    assert torch.equal(fp8_linear(x, w8, ws8, s8), fp8_linear(x, w8, ws8))
    assert torch.equal(int8_linear(x, wi, wsi, si), int8_linear(x, wi, wsi))
    # rows of different ranges: one static scale quantizes the small rows more coarsely
    x = make_x(6, 64, seed=24)
    static = (x.abs().amax() / 127).reshape(1)
    _, _, w = make_int8_weight(24, 64, seed=23, per_channel=True)
    y = x @ w.T
    assert rel_err(int8_linear(x, wi, wsi), y) < rel_err(int8_linear(x, wi, wsi, static), y)


def test_per_channel_scales_equal_to_per_tensor() -> None:
    x = make_x(5, 96, seed=31)
    w8, ws8, _ = make_fp8_weight(40, 96, seed=32, per_channel=False)
    wi, wsi, _ = make_int8_weight(40, 96, seed=33, per_channel=False)
    assert torch.equal(fp8_linear(x, w8, ws8), fp8_linear(x, w8, ws8.expand(40).reshape(40, 1)))
    assert torch.equal(int8_linear(x, wi, wsi), int8_linear(x, wi, wsi.expand(40).reshape(40, 1)))


def test_static_scale_saturates() -> None:
    x = make_x(4, 64, seed=41)
    x[0, 0], x[1, 5] = 1e4, -1e6  # far beyond the static ranges
    w8, ws8, _ = make_fp8_weight(16, 64, seed=42, per_channel=True)
    wi, wsi, _ = make_int8_weight(16, 64, seed=43, per_channel=True)
    s8, si = torch.tensor([0.01]), torch.tensor([0.02])
    y8 = fp8_linear(x, w8, ws8, s8)
    assert torch.isfinite(y8).all()
    assert torch.equal(y8, fp8_linear(x.clamp(-448 * 0.01, 448 * 0.01), w8, ws8, s8))
    zp = torch.tensor([5], dtype=torch.int8)
    yi = int8_linear(x, wi, wsi, si, zp)
    assert torch.isfinite(yi).all()
    lo, hi = (-128 - 5) * 0.02, (127 - 5) * 0.02  # the representable range around the zero point
    assert torch.equal(yi, int8_linear(x.clamp(lo, hi), wi, wsi, si, zp))


def test_bad_arguments_are_named() -> None:
    x = make_x(2, 64, seed=51)
    wi, wsi, _ = make_int8_weight(16, 64, seed=52, per_channel=True)
    with pytest.raises(ValueError, match="float8_e4m3fn"):
        fp8_linear(x, wi, wsi)
    with pytest.raises(ValueError, match="K=64"):
        int8_linear(make_x(2, 32, seed=53), wi, wsi)
    with pytest.raises(ValueError, match="weight_scale"):
        int8_linear(x, wi, torch.ones(3, 1))
    with pytest.raises(ValueError, match="input_zero_point"):
        int8_linear(x, wi, wsi, None, torch.tensor([1], dtype=torch.int8))


# -- Triton in the interpreter (CPU) ----------------------------------------------------------


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
def test_triton_kernels_in_interpreter(run_in_triton_interpreter) -> None:
    run_in_triton_interpreter("w8a8_interp.py")


# -- compiled, on a GPU --------------------------------------------------------------------------

GPU_SHAPES = [(1, 4096, 1024), (7, 512, 384), (33, 1024, 2816), (256, 2048, 1536), (130, 200, 72)]


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("static", [False, True])
@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("shape", GPU_SHAPES, ids=str)
def test_fp8_linear_gpu(shape, dtype: torch.dtype, per_channel: bool, static: bool) -> None:
    m, k, n = shape
    x = make_x(m, k, seed=m + n, dtype=dtype, device="cuda")
    weight, ws, _ = make_fp8_weight(n, k, seed=n, per_channel=per_channel, device="cuda")
    bias = make_bias(n, seed=3, device="cuda").to(dtype)
    si = (x.float().abs().amax() / 448).reshape(1) if static else None
    out = fp8_linear(x, weight, ws, si, bias)
    assert out.dtype == dtype and out.shape == (m, n)
    assert rel_err(out, fp8_linear_ref(x, weight, ws, si, bias)) < 2e-2


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", GPU_SHAPES, ids=str)
def test_fp8_weight_only_forced_gpu(shape, dtype: torch.dtype, per_channel: bool) -> None:
    m, k, n = shape
    x = make_x(m, k, seed=m * 3, dtype=dtype, device="cuda")
    weight, ws, _ = make_fp8_weight(n, k, seed=n + 9, per_channel=per_channel, device="cuda")
    bias = make_bias(n, seed=4, device="cuda").to(dtype)
    out = fp8_linear(x, weight, ws, None, bias, force_weight_only=True)
    assert rel_err(out, fp8_weight_only_ref(x, weight, ws, bias)) < (1e-3 if dtype == torch.float16 else 4e-3)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("static", ["dynamic", "static", "static_zp"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", GPU_SHAPES, ids=str)
def test_int8_linear_gpu(shape, dtype: torch.dtype, static: str) -> None:
    m, k, n = shape
    x = make_x(m, k, seed=m + 2 * n, dtype=dtype, device="cuda")
    weight, ws, _ = make_int8_weight(n, k, seed=n + 5, per_channel=static != "static", device="cuda")
    bias = make_bias(n, seed=5, device="cuda").to(dtype) if m != 7 else None
    si = (x.float().abs().amax() / 127).reshape(1) if static != "dynamic" else None
    zp = torch.tensor([3], dtype=torch.int8, device="cuda") if static == "static_zp" else None
    out = int8_linear(x, weight, ws, si, zp, bias)
    assert out.dtype == dtype and out.shape == (m, n)
    assert rel_err(out, int8_linear_ref(x, weight, ws, si, zp, bias)) < 1e-2


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_act_quant_bit_exact_gpu(dtype: torch.dtype) -> None:
    from deploy_kernels.act_quant import quantize_fp8_per_token, quantize_int8_per_token
    from deploy_kernels.act_quant_ref import quantize_fp8_per_token_ref, quantize_int8_per_token_ref

    x = make_x(300, 5120, seed=61, dtype=dtype, device="cuda")
    x[3] = 0.0  # the guard
    for fast, ref in ((quantize_fp8_per_token, quantize_fp8_per_token_ref), (quantize_int8_per_token, quantize_int8_per_token_ref)):
        (q, s), (q_ref, s_ref) = fast(x), ref(x)
        assert torch.equal(s, s_ref)
        assert torch.equal(q.view(torch.int8), q_ref.view(torch.int8))
    from deploy_kernels.act_quant import quantize_fp8_per_tensor, quantize_int8_static
    from deploy_kernels.act_quant_ref import quantize_fp8_per_tensor_ref, quantize_int8_static_ref

    scale = (x.float().abs().amax() / 448 / 4).reshape(1)  # some values saturate
    q, q_ref = quantize_fp8_per_tensor(x, scale)[0], quantize_fp8_per_tensor_ref(x, scale)[0]
    assert torch.equal(q.view(torch.int8), q_ref.view(torch.int8))
    zp = torch.tensor([6], dtype=torch.int8, device="cuda")
    assert torch.equal(quantize_int8_static(x, scale * 3.5, zp), quantize_int8_static_ref(x, scale * 3.5, zp))


@pytest.mark.gpu
@gpu
def test_fp8_shape_fallback_is_logged(caplog: pytest.LogCaptureFixture) -> None:
    x = make_x(40, 200, seed=71, dtype=torch.float16, device="cuda")  # K = 200: not a multiple of 16
    weight, ws, _ = make_fp8_weight(88, 200, seed=72, per_channel=True, device="cuda")
    with caplog.at_level(logging.INFO):
        out = fp8_linear(x, weight, ws)
    if torch.cuda.get_device_capability() >= (8, 9):  # the Triton FP8 GEMM takes it
        assert "does not suit torch._scaled_mm" in caplog.text
        assert rel_err(out, fp8_linear_ref(x, weight, ws)) < 2e-2
    else:
        assert rel_err(out, fp8_weight_only_ref(x, weight, ws)) < 1e-3
