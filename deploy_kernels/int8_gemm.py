"""INT8 W8A8 linear: ``y[t, n] = (sum_k (xq[t, k] - zp) wq[n, k]) * sx[t] * sw[n] + bias[n]``.

Dispatch:

- CPU tensors: :func:`deploy_kernels.int8_gemm_ref.int8_linear_ref`.
- CUDA: activations quantized in one pass (the per-token Triton kernel, or the static
  per-tensor scale and zero point with torch ops), then the Triton W8A8 GEMM
  (:func:`w8a8_gemm` below): ``tl.dot`` on int8 with an int32 accumulator, the
  zero-point correction, both scales and the bias fused in its epilogue. Any M (decode
  included), any K and N (masked tails).
"""

from __future__ import annotations

import logging

import torch
import triton
import triton.language as tl

from deploy_kernels.act_quant import quantize_int8_per_token, quantize_int8_static
from deploy_kernels.host_ints import cdiv
from deploy_kernels.int8_gemm_ref import int8_linear_ref
from deploy_kernels.log_once import log_once
from deploy_kernels.w8a8_args import check_w8a8_args

log = logging.getLogger(__name__)


def int8_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    weight_scale: torch.Tensor,
    input_scale: torch.Tensor | None = None,
    input_zero_point: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """``x [M, K]``, ``weight [N, K]`` int8, ``weight_scale`` (N, 1) or (1,), ``input_scale``
    None (dynamic per token) or (1,) static with an optional (1,) ``input_zero_point``
    -> ``[M, N]`` in ``x.dtype``."""
    if x.device.type != "cuda":
        log_once(log, "int8_linear-ref", "int8_linear: torch reference path on %s", x.device.type)
        return int8_linear_ref(x, weight, weight_scale, input_scale, input_zero_point, bias)
    check_w8a8_args(
        "int8_linear", x, weight, torch.int8, weight_scale, input_scale, bias, input_zero_point
    )
    log_once(log, "int8_linear-triton", "int8_linear: Triton int8 GEMM with fused scales")
    if input_scale is None:
        xq, sx = quantize_int8_per_token(x)
        zp = None
    else:
        xq = quantize_int8_static(x, input_scale, input_zero_point)
        sx, zp = input_scale, input_zero_point
    return w8a8_gemm(xq, weight, sx, weight_scale, zp, bias, x.dtype)


# -- Triton W8A8 GEMM (int8, and fp8 on GPUs with FP8 tensor cores) ---------------------------


@triton.jit
def grouped_tile(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """``(offs_m, offs_n)`` of this program's output tile (1-D grid over the tiles): the
    program ids run down ``GROUP_M`` row tiles before the next column, so that those row tiles
    share the weight tiles in L2."""
    pid = tl.program_id(0)
    grid_m, grid_n = tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N)
    group = pid // (GROUP_M * grid_n)
    first_m = group * GROUP_M
    size_m = min(grid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % (GROUP_M * grid_n)) % size_m
    pid_n = (pid % (GROUP_M * grid_n)) // size_m
    return pid_m * BLOCK_M + tl.arange(0, BLOCK_M), pid_n * BLOCK_N + tl.arange(0, BLOCK_N)


@triton.jit
def _w8a8_gemm_kernel(
    a_ptr, b_ptr, c_ptr, sa_ptr, sb_ptr, zp_ptr, bias_ptr, M, N, K,
    stride_am, stride_bn, stride_cm,
    FP8: tl.constexpr, SA_ROWS: tl.constexpr, SB_COLS: tl.constexpr, HAS_ZP: tl.constexpr,
    HAS_BIAS: tl.constexpr, EVEN_K: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    # a [M, K] row-major, b [N, K] row-major (read as [K, N] tiles), both int8 or both e4m3
    offs_m, offs_n = grouped_tile(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_k = tl.arange(0, BLOCK_K)
    m_ok, n_ok = offs_m < M, offs_n < N
    a_ptrs = a_ptr + tl.where(m_ok, offs_m, 0)[:, None].to(tl.int64) * stride_am + offs_k[None, :]
    b_ptrs = b_ptr + tl.where(n_ok, offs_n, 0)[None, :].to(tl.int64) * stride_bn + offs_k[:, None]
    if FP8:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    wsum = tl.zeros((BLOCK_N,), dtype=tl.int32)
    for k0 in range(0, K, BLOCK_K):
        if EVEN_K:  # rows past M / N read row 0 (clamped above): their results are not stored
            a = tl.load(a_ptrs)
            b = tl.load(b_ptrs)
        else:
            k_ok = offs_k < K - k0
            a = tl.load(a_ptrs, mask=k_ok[None, :], other=0.0)  # 0.0: castable to int8 and e4m3
            b = tl.load(b_ptrs, mask=k_ok[:, None], other=0.0)
        if FP8:  # noqa: SIM108 (constexpr branches)
            acc = tl.dot(a, b, acc)
        else:
            acc = tl.dot(a, b, acc, out_dtype=tl.int32)
        if HAS_ZP:
            wsum += tl.sum(b.to(tl.int32), axis=0)
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K
    if HAS_ZP:  # sum_k (xq - zp) w = sum_k xq w - zp * sum_k w, exact in int32
        acc -= tl.load(zp_ptr).to(tl.int32) * wsum[None, :]
    sa = tl.load(sa_ptr + offs_m, mask=m_ok, other=0.0) if SA_ROWS else tl.load(sa_ptr)
    sb = tl.load(sb_ptr + offs_n, mask=n_ok, other=0.0) if SB_COLS else tl.load(sb_ptr)
    y = acc.to(tl.float32) * (sa[:, None] if SA_ROWS else sa)
    y = y * (sb[None, :] if SB_COLS else sb)
    if HAS_BIAS:
        y += tl.load(bias_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    c_ptrs = c_ptr + offs_m[:, None].to(tl.int64) * stride_cm + offs_n[None, :]
    tl.store(c_ptrs, y.to(c_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


def _tiles(m: int, n: int) -> tuple[int, int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages), picked from sweeps on an H100
    (4096x11008, 5120x27648, 11008x4096; M 1, 16, 256), the same for int8 and fp8."""
    if m <= 16:  # weight streaming: enough column tiles to cover the SMs
        return (16, 128, 256, 4, 4) if cdiv(n, 128) >= 80 else (16, 64, 256, 4, 4)
    if m <= 64:
        return 64, 128, 128, 4, 4
    if cdiv(m, 128) * cdiv(n, 128) < 132:  # fewer 128x128 tiles than H100 SMs
        return 128, 64, 128, 4, 5
    return 128, 128, 128, 8, 3


def w8a8_gemm(
    xq: torch.Tensor,
    weight: torch.Tensor,
    x_scale: torch.Tensor,
    weight_scale: torch.Tensor,
    zero_point: torch.Tensor | None,
    bias: torch.Tensor | None,
    out_dtype: torch.dtype,
    tiles: tuple[int, int, int, int, int] | None = None,
) -> torch.Tensor:
    """``xq [M, K]`` and ``weight [N, K]`` both int8 (int32 accumulation) or both e4m3 (fp32
    accumulation; GPUs with FP8 tensor cores), ``x_scale`` [M, 1] or (1,), ``weight_scale``
    (N, 1) or (1,), optional (1,) int ``zero_point`` of xq -> ``[M, N]`` in ``out_dtype``."""
    m, k = xq.shape
    n = weight.shape[0]
    fp8 = xq.dtype == torch.float8_e4m3fn
    assert weight.shape[1] == k and xq.dtype == weight.dtype and (fp8 or xq.dtype == torch.int8), (
        xq.shape, xq.dtype, weight.shape, weight.dtype)
    assert xq.stride(1) == 1 and weight.stride(1) == 1, "xq and weight need unit inner strides"
    assert x_scale.numel() in (1, m) and weight_scale.numel() in (1, n), (x_scale.shape, weight_scale.shape)
    assert zero_point is None or not fp8, "zero points are for int8 activations"
    out = torch.empty(m, n, dtype=out_dtype, device=xq.device)
    if m == 0:
        return out
    bm, bn, bk, warps, stages = tiles or _tiles(m, n)
    sa, sb = x_scale.float().reshape(-1), weight_scale.float().reshape(-1)
    _w8a8_gemm_kernel[(cdiv(m, bm) * cdiv(n, bn),)](
        xq, weight, out, sa, sb, zero_point if zero_point is not None else sa,
        bias if bias is not None else sb, m, n, k, xq.stride(0), weight.stride(0), out.stride(0),
        FP8=fp8, SA_ROWS=sa.numel() > 1, SB_COLS=sb.numel() > 1, HAS_ZP=zero_point is not None,
        HAS_BIAS=bias is not None, EVEN_K=k % bk == 0,
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8, num_warps=warps, num_stages=stages,
    )
    return out
