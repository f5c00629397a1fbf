"""Triton group-quantized integer GEMM (AWQ and GPTQ after repacking): ``y = x W (+ bias)``.

Layout and formula: ``deploy_kernels.int_gemm_ref`` (the reference these kernels are tested against).

One kernel, two autotuned launch variants chosen by M:

- decode (M <= 16): one program per (N tile, K split). The K range is split so that even a
  single N tile row fills the GPU; partial sums go to an fp32 workspace and the last split of
  an N tile to arrive (a per-tile ticket counter, reset by that program) adds them up, adds the
  bias and writes the output: one launch, no zero-fill. M = 1 dequantizes and multiplies in
  fp32 registers; 2..16 rows use ``tl.dot`` on a 16-row tile.
- prefill (M > 16): one program per (M tile, N tile) over the whole K, ``tl.dot`` on the
  dequantized tile, fp32 accumulator.

The K order inside a tile is permuted so that no unpacking reshape is needed: the tile holds
``BLOCK_KW`` packed words per column, and field ``j`` of every word (logical rows
``word * pack + j``) is multiplied with the matching strided slice of ``x``. When a tile lies
in one quantization group (``GROUP_WORDS % BLOCK_KW == 0``), ``q - zero`` (small integers,
exact in fp16/bf16) goes into the product and the scale is applied once per column after it,
so 16-bit activations lose nothing to a rounded weight.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from deploy_kernels.host_ints import cdiv
from deploy_kernels.int_gemm_launch import finish_tile, launch, tile_and_split
from deploy_kernels.int_gemm_ref import SUPPORTED_BITS
from deploy_kernels.packed_gemm_checks import check_activations, check_packed, check_param

# -- kernel -----------------------------------------------------------------------------------


@triton.jit
def _unpack(words, J: tl.constexpr, BITS: tl.constexpr):
    """Field ``J`` of every int32 word as float32 (bit trick instead of a slow int->float)."""
    q = (words >> (J * BITS)) & ((1 << BITS) - 1)
    return (q | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0


@triton.jit
def _int_gemm_kernel(
    out_ptr, x_ptr, qw_ptr, scales_ptr, zeros_ptr, bias_ptr, ws_ptr, cnt_ptr,
    M, N, K, KP, stride_xm, M_BUCKET,
    BITS: tl.constexpr, GROUP_WORDS: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_KW: tl.constexpr, WAVES: tl.constexpr,
):
    """Program (M tile, N tile, K split); ``KP`` packed rows, ``GROUP_WORDS`` rows per group."""
    PACK: tl.constexpr = 32 // BITS
    ONE_GROUP: tl.constexpr = GROUP_WORDS % BLOCK_KW == 0  # a tile never straddles groups
    offs_m, offs_n, m_ok, n_ok, lo, hi = tile_and_split(M, N, KP, BLOCK_M, BLOCK_N, BLOCK_KW)
    rows = tl.arange(0, BLOCK_KW)
    x_dtype = x_ptr.dtype.element_ty
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    acc_rows = tl.zeros([BLOCK_KW, BLOCK_N], dtype=tl.float32)  # M = 1: reduced at the end
    for r0 in range(lo, hi, BLOCK_KW):
        r = r0 + rows
        r_ok = r < hi
        w_mask = r_ok[:, None] & n_ok[None, :]
        words = tl.load(qw_ptr + r[:, None] * N + offs_n[None, :], mask=w_mask, other=0)
        if ONE_GROUP:  # one scale row per tile
            sz = (r0 // GROUP_WORDS) * N + offs_n
            s = tl.load(scales_ptr + sz, mask=n_ok, other=0.0).to(tl.float32)[None, :]
            z = tl.load(zeros_ptr + sz, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        else:  # a scale row per packed row (rows of one group hit the same cache line)
            sz = (r // GROUP_WORDS)[:, None] * N + offs_n[None, :]
            s = tl.load(scales_ptr + sz, mask=w_mask, other=0.0).to(tl.float32)
            z = tl.load(zeros_ptr + sz, mask=w_mask, other=0.0).to(tl.float32)
        if BLOCK_M == 1:  # GEMV in fp32 registers: sum_j x*q, then (. - z * sum_j x) * s
            xq = tl.zeros([BLOCK_KW, BLOCK_N], dtype=tl.float32)
            xs = tl.zeros([BLOCK_KW], dtype=tl.float32)
            for j in tl.static_range(PACK):
                k = r * PACK + j
                xj = tl.load(x_ptr + offs_m * stride_xm + k, mask=k < K, other=0.0)
                xj = xj.to(tl.float32)
                xq += xj[:, None] * _unpack(words, j, BITS)
                xs += xj
            acc_rows += (xq - z * xs[:, None]) * s
        else:
            part = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
            for j in tl.static_range(PACK):
                k = r * PACK + j
                xj = tl.load(x_ptr + offs_m[:, None] * stride_xm + k[None, :],
                             mask=m_ok[:, None] & (k < K)[None, :], other=0.0)
                qz = _unpack(words, j, BITS) - z
                if x_dtype == tl.float32:
                    if not ONE_GROUP:
                        qz = qz * s
                    part += tl.dot(xj, qz, input_precision="ieee")
                elif ONE_GROUP:  # exact integers in 16 bits
                    part += tl.dot(xj, qz.to(x_dtype))
                elif x_dtype == tl.float16:
                    part += tl.dot(xj, (qz * s).to(tl.float16))
                else:  # bf16 rounds the weight too coarsely: add a second dot on the rest
                    w = qz * s
                    w_hi = w.to(tl.bfloat16)
                    part += tl.dot(xj, w_hi)
                    part += tl.dot(xj, (w - w_hi.to(tl.float32)).to(tl.bfloat16))
            if ONE_GROUP:
                part = part * s
            acc += part
    if BLOCK_M == 1:
        acc += tl.sum(acc_rows, axis=0)[None, :]
    finish_tile(acc, out_ptr, bias_ptr, ws_ptr, cnt_ptr, offs_m, offs_n, M, N, HAS_BIAS)


# -- public wrapper ---------------------------------------------------------------------------


def int_gemm(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    bits: int,
    group_size: int,
    bias: torch.Tensor | None = None,
    *,
    variant: str | None = None,
    config: dict | None = None,
) -> torch.Tensor:
    """``x [M, K] @ W [K, N] (+ bias)`` in ``x.dtype``, W from ``qweight [ceil(K / pack), N]``,
    ``scales`` and ``zeros [ceil(K / G), N]`` as in ``deploy_kernels.int_gemm_ref``.

    ``variant`` ('decode' or 'prefill') forces a kernel variant (default: decode for
    M <= 16); ``config`` fixes the tile instead of autotuning (see
    ``deploy_kernels.int_gemm_launch.launch``).
    """
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {bits}")
    _, k = check_activations(x)
    pack = 32 // bits
    kp = cdiv(k, pack)
    n = check_packed(qweight, kp, x.device, f"ceil(K / {pack}) = {kp}")
    if not isinstance(group_size, int) or group_size <= 0:
        raise ValueError(f"group_size must be a positive int, got {group_size!r}")
    if group_size < k and group_size % pack:
        raise ValueError(f"group_size {group_size} must be a multiple of {pack} for {bits}-bit")
    groups = cdiv(k, group_size)
    for name, t in (("scales", scales), ("zeros", zeros)):
        check_param(name, t, (groups, n), x)
    # one group: a group "width" every tile divides, so each tile loads one scale row
    group_words = group_size // pack if groups > 1 else cdiv(kp, 256) * 256
    return launch(_int_gemm_kernel, x, (qweight, scales, zeros), bias, n, kp, variant, config,
                  BITS=bits, GROUP_WORDS=group_words)
