"""Triton paged attention for any mix of query lengths (prefill chunks over cached context,
prefix-cache hits, decodes). Same function as :func:`deploy_kernels.paged_attention_ref.paged_attention_ref`;
the decode-only variant (split over the keys) is ``deploy_kernels.paged_attention_decode``.

Both read K/V only from the paged caches ``[num_blocks, block_size, Hkv, D]`` through the block
tables (this step's K/V are written first, by ``deploy_kernels.write_kv``), with an online softmax in
base 2. A program owns one KV head and the ``GROUP = Hq // Hkv`` query heads that share it:
its rows are (query token, head in group) pairs, so each K/V tile is loaded once per group.
fp8 caches come in as ``uint8`` bits (see ``deploy_kernels.fp8``); their per-tensor scales are folded
into the softmax scale (K) and the output (V).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from deploy_kernels.fp8 import as_kernel_arg, fp8_bits_to_fp16, fp8_kind, read_factor
from deploy_kernels.host_ints import cdiv, next_power_of_2

_LOG2E = 1.4426950408889634  # the kernels use exp2


@triton.jit
def _load_tile(cache_ptr, bt_row_ptr, offs_n, n_ok, kvh, offs_d, d_ok, stride_b, stride_s,
               stride_h, PAGE: tl.constexpr, FP8: tl.constexpr):
    """Tokens ``offs_n`` of one sequence, one KV head: ``[BLOCK_N, BLOCK_D]`` (fp8: as fp16)."""
    blk = tl.load(bt_row_ptr + offs_n // PAGE, mask=n_ok, other=0).to(tl.int64)
    row = blk * stride_b + (offs_n % PAGE) * stride_s + kvh * stride_h
    x = tl.load(cache_ptr + row[:, None] + offs_d[None, :], mask=n_ok[:, None] & d_ok[None, :],
                other=0)
    if FP8 != 0:
        x = fp8_bits_to_fp16(x, FP8)
    return x


@triton.jit
def attend_range(q, acc, m_i, l_i, q_pos, lo, hi, k_ptr, v_ptr, bt_row_ptr, kvh, offs_d, d_ok,
                 qk_scale, stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
                 PAGE: tl.constexpr, BLOCK_N: tl.constexpr, WINDOW: tl.constexpr,
                 CAUSAL: tl.constexpr, FP8: tl.constexpr, PREC: tl.constexpr):
    """Online softmax of rows ``q [M, D]`` (at positions ``q_pos [M]``) over keys ``[lo, hi)``."""
    for start in range(lo, hi, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        n_ok = offs_n < hi
        k = _load_tile(k_ptr, bt_row_ptr, offs_n, n_ok, kvh, offs_d, d_ok, stride_kb, stride_ks,
                       stride_kh, PAGE, FP8).to(q.dtype)
        s = tl.dot(q, tl.trans(k), input_precision=PREC) * qk_scale  # [M, N], base-2 logits
        ok = n_ok[None, :]
        if CAUSAL:
            ok = ok & (offs_n[None, :] <= q_pos[:, None])
        if WINDOW > 0:
            ok = ok & ((q_pos[:, None] - offs_n[None, :]) < WINDOW)
        s = tl.where(ok, s, -1.0e30)  # finite: an all-masked first tile makes no NaN
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = _load_tile(v_ptr, bt_row_ptr, offs_n, n_ok, kvh, offs_d, d_ok, stride_vb, stride_vs,
                       stride_vh, PAGE, FP8).to(q.dtype)
        acc = acc * alpha[:, None] + tl.dot(p.to(q.dtype), v, input_precision=PREC)
        m_i = m_new
    return acc, m_i, l_i


@triton.jit
def _varlen_kernel(
    out_ptr, q_ptr, k_ptr, v_ptr, bt_ptr, qsl_ptr, seq_lens_ptr, qk_scale, v_scale,
    stride_qt, stride_qh, stride_ot, stride_oh, stride_bt,
    stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, PAGE: tl.constexpr, WINDOW: tl.constexpr,
    FP8: tl.constexpr, PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    seq, tile, kvh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    q_start = tl.load(qsl_ptr + seq)
    q_len = tl.load(qsl_ptr + seq + 1) - q_start
    if tile * BLOCK_M < q_len * GROUP:
        seq_len = tl.load(seq_lens_ptr + seq)
        rows = tile * BLOCK_M + tl.arange(0, BLOCK_M)
        tok = rows // GROUP
        head = kvh * GROUP + rows % GROUP
        row_ok = tok < q_len
        q_pos = seq_len - q_len + tok
        offs_d = tl.arange(0, BLOCK_D)
        d_ok = offs_d < HEAD_DIM
        q_off = (q_start + tok).to(tl.int64)[:, None] * stride_qt + head[:, None] * stride_qh
        io_mask = row_ok[:, None] & d_ok[None, :]
        q = tl.load(q_ptr + q_off + offs_d[None, :], mask=io_mask, other=0)
        # keys this tile can see: from the window start of its first query to its last query
        hi = tl.minimum(seq_len - q_len + (tile * BLOCK_M + BLOCK_M - 1) // GROUP + 1, seq_len)
        lo = 0
        if WINDOW > 0:
            lo = tl.maximum(seq_len - q_len + (tile * BLOCK_M) // GROUP - WINDOW + 1, 0)
            lo = (lo // BLOCK_N) * BLOCK_N
        acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc, m_i, l_i = attend_range(
            q, acc, m_i, l_i, q_pos, lo, hi, k_ptr, v_ptr, bt_ptr + seq * stride_bt, kvh,
            offs_d, d_ok, qk_scale, stride_kb, stride_ks, stride_kh, stride_vb, stride_vs,
            stride_vh, PAGE, BLOCK_N, WINDOW, True, FP8, PREC,
        )
        o = acc * (v_scale / l_i)[:, None]
        o_off = (q_start + tok).to(tl.int64)[:, None] * stride_ot + head[:, None] * stride_oh
        tl.store(out_ptr + o_off + offs_d[None, :], o.to(out_ptr.dtype.element_ty), mask=io_mask)


# -- wrapper ------------------------------------------------------------------------------------


def check_inputs(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
) -> tuple[int, int]:
    """Shared launch checks; returns (GROUP, BLOCK_D)."""
    assert q.dim() == 3 and q.stride(2) == 1, (q.shape, q.stride())
    assert q.dtype in (torch.float16, torch.bfloat16, torch.float32), q.dtype
    assert k_cache.dim() == 4 and k_cache.shape == v_cache.shape, (k_cache.shape, v_cache.shape)
    assert k_cache.dtype == v_cache.dtype
    assert fp8_kind(k_cache.dtype) or k_cache.dtype == q.dtype, (k_cache.dtype, q.dtype)
    assert k_cache.stride(3) == 1 and v_cache.stride(3) == 1
    num_heads, head_dim = q.shape[1], q.shape[2]
    num_kv_heads = k_cache.shape[2]
    assert k_cache.shape[3] == head_dim and num_heads % num_kv_heads == 0
    assert block_tables.dtype == torch.int32 and block_tables.dim() == 2
    assert block_tables.stride(1) == 1
    assert seq_lens.dtype == torch.int32 and seq_lens.shape == (block_tables.shape[0],)
    assert q.device == k_cache.device == block_tables.device == seq_lens.device
    return num_heads // num_kv_heads, max(16, next_power_of_2(head_dim))


def dot_precision(q: torch.Tensor) -> str:
    """fp32 inputs get exact fp32 dots (Triton's default there is tf32)."""
    return "ieee" if q.dtype == torch.float32 else "tf32"


def softmax_scales(
    k_cache: torch.Tensor, scale: float, k_scale: float, v_scale: float
) -> tuple[float, float]:
    """(qk_scale in base 2, v_scale), with fp8 read factors folded in; only fp8 has scales."""
    if not fp8_kind(k_cache.dtype):
        return scale * _LOG2E, 1.0
    f = read_factor(k_cache.dtype)
    return scale * k_scale * f * _LOG2E, v_scale * f


def paged_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    max_query_len: int,
    sliding_window: int | None = None,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
    out: torch.Tensor | None = None,
    block_m: int = 64,
    block_n: int | None = None,
    num_warps: int = 8,
) -> torch.Tensor:
    """Any mix of query lengths: ``q [T, Hq, D]`` -> ``[T, Hq, D]`` (see the reference).

    Rows of a tile are (token, head of the group) pairs: ``block_m`` of them. The default tiles
    (64 x 64, 8 warps; 64 x 32 for fp32) compile for sm_90 without register spills at head_dim
    64 and 128; they are not tuned by timing yet.
    """
    block_n = block_n or (32 if q.dtype == torch.float32 else 64)
    group, block_d = check_inputs(q, k_cache, v_cache, block_tables, seq_lens)
    num_seqs = seq_lens.shape[0]
    assert query_start_loc.dtype == torch.int32 and query_start_loc.shape == (num_seqs + 1,)
    assert block_m >= 16 and block_n >= 16, "tl.dot needs tiles of at least 16"
    out = torch.empty_like(q) if out is None else out
    assert out.shape == q.shape and out.stride(2) == 1
    if num_seqs == 0 or q.shape[0] == 0 or max_query_len <= 0:
        return out
    qk_scale, v_sc = softmax_scales(k_cache, scale, k_scale, v_scale)
    kc, vc = as_kernel_arg(k_cache), as_kernel_arg(v_cache)
    grid = (num_seqs, cdiv(max_query_len * group, block_m), k_cache.shape[2])
    _varlen_kernel[grid](
        out, q, kc, vc, block_tables, query_start_loc, seq_lens, qk_scale, v_sc,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1), block_tables.stride(0),
        kc.stride(0), kc.stride(1), kc.stride(2), vc.stride(0), vc.stride(1), vc.stride(2),
        GROUP=group, HEAD_DIM=q.shape[2], PAGE=k_cache.shape[1], WINDOW=sliding_window or 0,
        FP8=fp8_kind(k_cache.dtype), PREC=dot_precision(q), BLOCK_M=block_m, BLOCK_N=block_n,
        BLOCK_D=block_d, num_warps=num_warps,
    )
    return out
