"""FP8 W8A8 linear: ``y = dequant(x) @ (weight * weight_scale)^T + bias``.

Dispatch (chosen per call from the device; logged once per kind):

- CPU tensors: :func:`deploy_kernels.fp8_gemm_ref.fp8_linear_ref`.
- CUDA, compute capability >= 8.9: activations quantized to e4m3 in one Triton pass (per
  token, or with the static per-tensor ``input_scale``), then
  - M > 16: ``torch._scaled_mm`` on the fp8 tensor cores, both scales applied by it
    (row-wise when either side is per row, tensor-wise otherwise); ``weight.t()`` is the
    column-major operand it wants, so no copy;
  - M <= 16, or K or N not a multiple of 16 (``_scaled_mm`` refuses those): the Triton W8A8
    GEMM (:func:`deploy_kernels.int8_gemm.w8a8_gemm`, fp8 ``tl.dot``, scales and bias in its epilogue).
- CUDA below 8.9 (Ampere): the weight-only Triton kernel (:func:`fp8_weight_only_gemm` below):
  e4m3 weights converted in the kernel, activations unquantized.

The weight stays in the checkpoint's ``[N, K]`` row-major layout (no per-call copy).
"""

from __future__ import annotations

import logging

import torch
import triton
import triton.language as tl

from deploy_kernels.act_quant import (
    has_fp8_tensor_cores,
    quantize_fp8_per_tensor,
    quantize_fp8_per_token,
)
from deploy_kernels.fp8 import E4M3, E4M3_READ_FACTOR, fp8_bits_to_fp16
from deploy_kernels.fp8_gemm_ref import fp8_linear_ref
from deploy_kernels.host_ints import cdiv
from deploy_kernels.int8_gemm import grouped_tile, w8a8_gemm
from deploy_kernels.log_once import log_fallback_once, log_once
from deploy_kernels.w8a8_args import check_w8a8_args

log = logging.getLogger(__name__)

_E4M3 = tl.constexpr(E4M3)  # compiled kernels see only constexpr globals
_READ_FACTOR = tl.constexpr(E4M3_READ_FACTOR)

_ROWWISE_REFUSED: set[tuple[torch.device, torch.dtype]] = set()  # (device, out dtype)
TRITON_MAX_M = 16  # decode batches: the Triton W8A8 GEMM streams the weight faster than _scaled_mm


def _log_once(key: str, message: str, *args: object) -> None:
    log_once(log, f"fp8_linear-{key}", message, *args)


def prepare_fp8_weight(weight: torch.Tensor) -> torch.Tensor:
    """The layout :func:`fp8_linear` wants: the checkpoint's own ``[N, K]`` row-major
    weight (made contiguous once, at load time)."""
    return weight.contiguous()


def fp8_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    weight_scale: torch.Tensor,
    input_scale: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    force_weight_only: bool = False,
) -> torch.Tensor:
    """``x [M, K]`` (fp16/bf16/fp32), ``weight [N, K]`` e4m3, ``weight_scale`` (1,) or (N, 1),
    ``input_scale`` (1,) static or None (dynamic per token) -> ``[M, N]`` in ``x.dtype``.
    ``force_weight_only`` takes the weight-only kernel on any GPU (tests, benchmarks)."""
    if x.device.type != "cuda":
        _log_once("ref", "fp8_linear: torch reference path on %s", x.device.type)
        return fp8_linear_ref(x, weight, weight_scale, input_scale, bias)
    check_w8a8_args("fp8_linear", x, weight, torch.float8_e4m3fn, weight_scale, input_scale, bias)
    if weight.stride(1) != 1:
        raise ValueError(f"fp8_linear: weight must be row-major [N, K] (stride {weight.stride()}); "
                         "use prepare_fp8_weight at load time")
    x = x if x.stride(1) == 1 else x.contiguous()
    m, (n, k) = x.shape[0], weight.shape
    if force_weight_only or not has_fp8_tensor_cores(x.device):
        if not force_weight_only:
            log_fallback_once(
                "fp8-no-tensor-cores", "fp8_linear: GPU capability %s < 8.9 has no FP8 tensor cores; "
                "weight-only FP8 kernel (activations stay in %s)", torch.cuda.get_device_capability(x.device), x.dtype,
            )
        _log_once("weight-only", "fp8_linear: weight-only Triton FP8 kernel")
        return fp8_weight_only_gemm(x, weight, weight_scale, bias)
    if input_scale is None:
        xq, scale_a = quantize_fp8_per_token(x)  # [M, 1]
    else:
        xq, scale_a = quantize_fp8_per_tensor(x, input_scale)  # (1,)
    odd = k % 16 != 0 or n % 16 != 0
    if m <= TRITON_MAX_M or odd:
        if odd and m > TRITON_MAX_M:
            log_fallback_once(
                f"fp8-shape-{n}x{k}", "fp8_linear: weight [%d, %d] does not suit torch._scaled_mm "
                "(needs K, N multiples of 16); Triton FP8 GEMM", n, k,
            )
        _log_once("triton", "fp8_linear: Triton FP8 GEMM for M <= %d", TRITON_MAX_M)
        return w8a8_gemm(xq, weight, scale_a, weight_scale, None, bias, x.dtype)
    return _scaled_mm(xq, weight, scale_a, weight_scale, bias, x.dtype)


def _scaled_mm(
    xq: torch.Tensor,
    weight: torch.Tensor,
    scale_a: torch.Tensor,
    weight_scale: torch.Tensor,
    bias: torch.Tensor | None,
    dtype: torch.dtype,
) -> torch.Tensor:
    m, n = xq.shape[0], weight.shape[0]
    scale_b = weight_scale.float()
    rowwise = scale_a.numel() != 1 or scale_b.numel() != 1
    if rowwise:  # both operands row-wise: scale_a [M, 1], scale_b [1, N]
        scale_a = scale_a.reshape(-1, 1).expand(m, 1).contiguous()
        scale_b = scale_b.reshape(1, -1).expand(1, n).contiguous()
    else:
        scale_a, scale_b = scale_a.reshape(()), scale_b.reshape(())
    _log_once(f"scaled_mm-{rowwise}", "fp8_linear: torch._scaled_mm (%s scales)", "row-wise" if rowwise else "tensor-wise")
    out_dtype = dtype
    if rowwise and out_dtype != torch.bfloat16 and (xq.device, out_dtype) in _ROWWISE_REFUSED:
        out_dtype = torch.bfloat16
    try:
        y = _mm(xq, weight, scale_a, scale_b, bias, out_dtype)
    except RuntimeError as err:
        if not rowwise or out_dtype == torch.bfloat16:
            raise
        # some torch versions take row-wise scales only with a bf16 output
        _ROWWISE_REFUSED.add((xq.device, out_dtype))
        log_fallback_once(
            f"fp8-rowwise-{out_dtype}", "fp8_linear: row-wise _scaled_mm refused %s output (%s); "
            "computing in bf16 and casting", out_dtype, str(err).splitlines()[0],
        )
        out_dtype = torch.bfloat16
        y = _mm(xq, weight, scale_a, scale_b, bias, out_dtype)
    return y if y.dtype == dtype else y.to(dtype)


def _mm(
    xq: torch.Tensor,
    weight: torch.Tensor,
    scale_a: torch.Tensor,
    scale_b: torch.Tensor,
    bias: torch.Tensor | None,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    if out_dtype == torch.float32 and bias is not None:  # cuBLASLt takes no bias with fp32 out
        y = torch._scaled_mm(xq, weight.t(), scale_a, scale_b, out_dtype=out_dtype)
        return y.add_(bias.float())
    b = None if bias is None else bias.to(out_dtype)
    return torch._scaled_mm(xq, weight.t(), scale_a, scale_b, bias=b, out_dtype=out_dtype)


# -- Weight-only FP8 kernel (GPUs without FP8 tensor cores) -------------------------------------


@triton.jit
def _fp8_weight_only_kernel(
    x_ptr, w_ptr, c_ptr, sw_ptr, bias_ptr, M, N, K, stride_xm, stride_wn, stride_cm,
    SW_COLS: tl.constexpr, HAS_BIAS: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    # x [M, K] (fp16/bf16/fp32), w e4m3 bits uint8 [N, K] (read as [K, N] tiles), c [M, N]
    offs_m, offs_n = grouped_tile(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_k = tl.arange(0, BLOCK_K)
    m_ok, n_ok = offs_m < M, offs_n < N
    x_ptrs = x_ptr + offs_m[:, None].to(tl.int64) * stride_xm + offs_k[None, :]
    w_ptrs = w_ptr + offs_n[None, :].to(tl.int64) * stride_wn + offs_k[:, None]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_ok = offs_k < K - k0
        x = tl.load(x_ptrs, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        bits = tl.load(w_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0)
        w = fp8_bits_to_fp16(bits, _E4M3).to(x.dtype)  # exact: value / 256
        acc = tl.dot(x, w, acc, input_precision=PRECISION)
        x_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    sw = tl.load(sw_ptr + offs_n, mask=n_ok, other=0.0)[None, :] if SW_COLS else tl.load(sw_ptr)
    y = acc * (sw * _READ_FACTOR)
    if HAS_BIAS:
        y += tl.load(bias_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    c_ptrs = c_ptr + offs_m[:, None].to(tl.int64) * stride_cm + offs_n[None, :]
    tl.store(c_ptrs, y.to(c_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


def _weight_only_tiles(m: int) -> tuple[int, int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) by the number of tokens."""
    if m <= 16:
        return 16, 64, 128, 4, 4
    if m <= 64:
        return 64, 64, 64, 4, 4
    return 128, 128, 64, 8, 3


def fp8_weight_only_gemm(
    x: torch.Tensor,
    weight: torch.Tensor,
    weight_scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    tiles: tuple[int, int, int, int, int] | None = None,
) -> torch.Tensor:
    """``x [M, K] @ (weight.float() * weight_scale)^T + bias`` with x unquantized; the e4m3
    weight is converted to ``x.dtype`` in the kernel, accumulated in fp32 -> ``[M, N]``."""
    m, k = x.shape
    n = weight.shape[0]
    assert weight.shape[1] == k and weight.dtype == torch.float8_e4m3fn, (x.shape, weight.shape, weight.dtype)
    assert x.stride(1) == 1 and weight.stride(1) == 1, "x and weight need unit inner strides"
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    if m == 0:
        return out
    bm, bn, bk, warps, stages = tiles or _weight_only_tiles(m)
    sw = weight_scale.float().reshape(-1)
    _fp8_weight_only_kernel[(cdiv(m, bm) * cdiv(n, bn),)](
        x, weight.view(torch.uint8), out, sw, bias if bias is not None else sw, m, n, k,
        x.stride(0), weight.stride(0), out.stride(0),
        SW_COLS=sw.numel() > 1, HAS_BIAS=bias is not None,
        PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8, num_warps=warps, num_stages=stages,
    )
    return out
