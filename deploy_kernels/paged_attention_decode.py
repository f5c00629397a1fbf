"""Triton paged attention for decode steps (one new token per sequence), split over the keys.

Program (sequence, KV head, split): the ``GROUP`` query heads of a KV head are the rows of one
tile, and a sequence's keys are cut into ``num_splits`` partitions that separate programs run
(flash-decoding), merged by a second small kernel; so a batch of one still fills the GPU.
Same function as the reference with every query length 1; shares its inner loop with the
varlen kernel in ``deploy_kernels.paged_attention``.
"""

from __future__ import annotations

from functools import cache

import torch
import triton
import triton.language as tl

from deploy_kernels.fp8 import as_kernel_arg, fp8_kind
from deploy_kernels.host_ints import cdiv, next_power_of_2
from deploy_kernels.paged_attention import attend_range, check_inputs, dot_precision, softmax_scales


@triton.jit
def _decode_kernel(
    out_ptr, part_ptr, lse_ptr, q_ptr, k_ptr, v_ptr, bt_ptr, seq_lens_ptr, qk_scale, v_scale,
    partition, num_splits, stride_qt, stride_qh, stride_ot, stride_oh, stride_bt,
    stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
    NUM_HEADS: tl.constexpr, GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, PAGE: tl.constexpr,
    WINDOW: tl.constexpr, FP8: tl.constexpr, PREC: tl.constexpr, SPLIT: tl.constexpr,
    BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """One query per sequence; program (sequence, KV head, split of the keys)."""
    seq, kvh, split = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    seq_len = tl.load(seq_lens_ptr + seq)
    rows = tl.arange(0, BLOCK_G)
    row_ok = rows < GROUP
    head = kvh * GROUP + rows
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    io_mask = row_ok[:, None] & d_ok[None, :]
    q = tl.load(q_ptr + seq.to(tl.int64) * stride_qt + head[:, None] * stride_qh + offs_d[None, :],
                mask=io_mask, other=0)
    lo = split * partition
    hi = tl.minimum(lo + partition, seq_len)
    if WINDOW > 0:
        lo = tl.maximum(lo, seq_len - WINDOW)
    acc = tl.zeros([BLOCK_G, BLOCK_D], dtype=tl.float32)
    m_i = tl.full([BLOCK_G], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_G], dtype=tl.float32)
    q_pos = tl.zeros([BLOCK_G], dtype=tl.int32) + seq_len - 1
    acc, m_i, l_i = attend_range(
        q, acc, m_i, l_i, q_pos, lo, hi, k_ptr, v_ptr, bt_ptr + seq * stride_bt, kvh, offs_d,
        d_ok, qk_scale, stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh, PAGE,
        BLOCK_N, WINDOW, False, FP8, PREC,
    )
    if SPLIT:  # partial output (normalized) and its log2-sum-exp; an empty split has lse -inf
        empty = lo >= hi
        l_safe = tl.where(empty, 1.0, l_i)
        o = tl.where(empty, 0.0, acc / l_safe[:, None])
        lse = tl.where(empty, float("-inf"), m_i + tl.log2(l_safe))
        idx = (seq * NUM_HEADS + head).to(tl.int64) * num_splits + split  # [BLOCK_G]
        tl.store(part_ptr + idx[:, None] * HEAD_DIM + offs_d[None, :], o, mask=io_mask)
        tl.store(lse_ptr + idx, lse, mask=row_ok)
    else:
        o = acc * (v_scale / l_i)[:, None]
        o_off = seq.to(tl.int64) * stride_ot + head[:, None] * stride_oh + offs_d[None, :]
        tl.store(out_ptr + o_off, o.to(out_ptr.dtype.element_ty), mask=io_mask)


@triton.jit
def _combine_kernel(out_ptr, part_ptr, lse_ptr, v_scale, num_splits, stride_ot, stride_oh,
                    NUM_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr,
                    BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr):
    """Merge the splits of one (sequence, head): weights ``2^(lse - max lse)``."""
    seq, head = tl.program_id(0), tl.program_id(1)
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    s_ok = offs_s < num_splits
    base = (seq * NUM_HEADS + head).to(tl.int64) * num_splits
    lse = tl.load(lse_ptr + base + offs_s, mask=s_ok, other=float("-inf"))
    w = tl.exp2(lse - tl.max(lse, 0))  # [S]; empty splits weigh 0
    mask = s_ok[:, None] & (offs_d[None, :] < HEAD_DIM)
    part = tl.load(part_ptr + (base + offs_s)[:, None] * HEAD_DIM + offs_d[None, :], mask=mask,
                   other=0.0)
    o = tl.sum(part * w[:, None], 0) * (v_scale / tl.sum(w, 0))
    o_ptr = out_ptr + seq.to(tl.int64) * stride_ot + head * stride_oh + offs_d
    tl.store(o_ptr, o.to(out_ptr.dtype.element_ty), mask=offs_d < HEAD_DIM)


def paged_attention_decode(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    max_seq_len: int,
    sliding_window: int | None = None,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
    out: torch.Tensor | None = None,
    num_splits: int | None = None,
    block_n: int = 32,
    num_warps: int = 4,
) -> torch.Tensor:
    """One new token per sequence: ``q [B, Hq, D]`` (row b = sequence b) -> ``[B, Hq, D]``.

    The keys of a sequence are cut into ``num_splits`` partitions run by separate programs
    and merged after (flash-decoding), so a small batch still fills the GPU; ``None`` picks a
    count from the batch and ``max_seq_len``. Pass a fixed count for a CUDA-graph capture.
    ``max_seq_len`` must be at least every ``seq_lens[b]`` (keys past the splits are not read);
    every ``seq_lens[b]`` must be at least 1. The default tile (32 keys, 4 warps) compiles for
    sm_90 without register spills at head_dim 64 and 128; not tuned by timing yet.
    """
    group, block_d = check_inputs(q, k_cache, v_cache, block_tables, seq_lens)
    num_seqs, num_heads, head_dim = q.shape
    assert seq_lens.shape == (num_seqs,) and block_n >= 16
    out = torch.empty_like(q) if out is None else out
    assert out.shape == q.shape and out.stride(2) == 1
    if num_seqs == 0:
        return out
    num_kv_heads = k_cache.shape[2]
    if num_splits is None:
        num_splits = _default_splits(num_seqs * num_kv_heads, max_seq_len, q.device)
    partition = cdiv(cdiv(max(max_seq_len, 1), num_splits), block_n) * block_n
    qk_scale, v_sc = softmax_scales(k_cache, scale, k_scale, v_scale)
    kc, vc = as_kernel_arg(k_cache), as_kernel_arg(v_cache)
    split = num_splits > 1
    part = lse = out  # unused placeholders without a split
    if split:
        part = torch.empty(num_seqs, num_heads, num_splits, head_dim, dtype=torch.float32,
                           device=q.device)
        lse = torch.empty(num_seqs, num_heads, num_splits, dtype=torch.float32, device=q.device)
    _decode_kernel[(num_seqs, num_kv_heads, num_splits)](
        out, part, lse, q, kc, vc, block_tables, seq_lens, qk_scale, v_sc, partition, num_splits,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1), block_tables.stride(0),
        kc.stride(0), kc.stride(1), kc.stride(2), vc.stride(0), vc.stride(1), vc.stride(2),
        NUM_HEADS=num_heads, GROUP=group, HEAD_DIM=head_dim, PAGE=k_cache.shape[1],
        WINDOW=sliding_window or 0, FP8=fp8_kind(k_cache.dtype), PREC=dot_precision(q),
        SPLIT=split, BLOCK_G=max(16, next_power_of_2(group)), BLOCK_N=block_n,
        BLOCK_D=block_d, num_warps=num_warps,
    )
    if split:
        _combine_kernel[(num_seqs, num_heads)](
            out, part, lse, v_sc, num_splits, out.stride(0), out.stride(1), NUM_HEADS=num_heads,
            HEAD_DIM=head_dim, BLOCK_S=next_power_of_2(num_splits), BLOCK_D=block_d,
        )
    return out


@cache
def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 4  # the interpreter: a few splits, so the tests cover the merge
    return torch.cuda.get_device_properties(device).multi_processor_count


def _default_splits(programs: int, max_seq_len: int, device: torch.device) -> int:
    """Enough splits for about two programs per SM, each with at least 256 keys."""
    sms = _num_sms(device)
    want = cdiv(2 * sms, max(programs, 1))
    return max(1, min(want, cdiv(max_seq_len, 256), 64))
