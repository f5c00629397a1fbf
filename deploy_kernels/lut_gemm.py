"""Triton lookup-table GEMM (SqueezeLLM): ``y = x W (+ bias)`` with ``W[k, n] = lut[n, q[k, n]]``.

Layout and formula: ``deploy_kernels.lut_gemm_ref``. Same program layout, K order and decode/prefill
launch as ``deploy_kernels.int_gemm`` (the launcher and split-K finish of ``deploy_kernels.int_gemm_launch``,
the input checks of ``deploy_kernels.packed_gemm_checks``); the weight of each packed field is a
gathered load from the column's 16-entry table, which is tiny and stays in cache. The table is
in the activation dtype, so the gathered weights are exact in the ``tl.dot`` operands.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from deploy_kernels.host_ints import cdiv
from deploy_kernels.int_gemm_launch import finish_tile, launch, tile_and_split
from deploy_kernels.packed_gemm_checks import check_activations, check_packed, check_param


@triton.jit
def _lut_gemm_kernel(
    out_ptr, x_ptr, qw_ptr, lut_ptr, bias_ptr, ws_ptr, cnt_ptr,
    M, N, K, KP, stride_xm, M_BUCKET,
    HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_KW: tl.constexpr, WAVES: tl.constexpr,
):
    """Program (M tile, N tile, K split) over ``KP`` rows of eight 4-bit indices."""
    offs_m, offs_n, m_ok, n_ok, lo, hi = tile_and_split(M, N, KP, BLOCK_M, BLOCK_N, BLOCK_KW)
    rows = tl.arange(0, BLOCK_KW)
    x_dtype = x_ptr.dtype.element_ty
    table = lut_ptr + offs_n[None, :] * 16  # [1, BLOCK_N]
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    acc_rows = tl.zeros([BLOCK_KW, BLOCK_N], dtype=tl.float32)  # M = 1: reduced at the end
    for r0 in range(lo, hi, BLOCK_KW):
        r = r0 + rows
        w_mask = (r < hi)[:, None] & n_ok[None, :]
        words = tl.load(qw_ptr + r[:, None] * N + offs_n[None, :], mask=w_mask, other=0)
        for j in tl.static_range(8):
            k = r * 8 + j
            w = tl.load(table + ((words >> (4 * j)) & 15), mask=w_mask, other=0.0)
            if BLOCK_M == 1:
                xj = tl.load(x_ptr + offs_m * stride_xm + k, mask=k < K, other=0.0)
                acc_rows += xj.to(tl.float32)[:, None] * w.to(tl.float32)
            else:
                xj = tl.load(x_ptr + offs_m[:, None] * stride_xm + k[None, :],
                             mask=m_ok[:, None] & (k < K)[None, :], other=0.0)
                if x_dtype == tl.float32:
                    acc += tl.dot(xj, w, input_precision="ieee")
                else:
                    acc += tl.dot(xj, w)
    if BLOCK_M == 1:
        acc += tl.sum(acc_rows, axis=0)[None, :]
    finish_tile(acc, out_ptr, bias_ptr, ws_ptr, cnt_ptr, offs_m, offs_n, M, N, HAS_BIAS)


def lut_gemm(
    x: torch.Tensor,
    qweight: torch.Tensor,
    lut: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    variant: str | None = None,
    config: dict | None = None,
) -> torch.Tensor:
    """``x [M, K] @ W [K, N] (+ bias)`` in ``x.dtype``; ``qweight [ceil(K / 8), N]`` int32 of
    4-bit indices, ``lut [N, 16]`` in ``x.dtype``. ``variant`` and ``config`` as in
    ``deploy_kernels.int_gemm.int_gemm``."""
    _, k = check_activations(x)
    kp = cdiv(k, 8)
    n = check_packed(qweight, kp, x.device, f"ceil(K / 8) = {kp}")
    check_param("lut", lut, (n, 16), x)
    return launch(_lut_gemm_kernel, x, (qweight, lut), bias, n, kp, variant, config)
