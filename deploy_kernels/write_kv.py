"""Triton reshape-and-cache: store this step's K/V into the paged caches (fp8: quantize on write).

Same function as :func:`deploy_kernels.paged_attention_ref.write_kv_ref`: ``k, v [T, Hkv, D]`` go to
flat slots ``slot_mapping [T]`` (``block * block_size + offset``; negative = skip) of
``k_cache, v_cache [num_blocks, block_size, Hkv, D]``. One program per token writes all heads.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from deploy_kernels.fp8 import as_kernel_arg, fp8_kind, fp32_to_fp8_bits
from deploy_kernels.host_ints import next_power_of_2


@triton.jit
def _store_one(
    x_ptr, cache_ptr, t, blk, off, scale,
    stride_xt, stride_xh, stride_cb, stride_cs, stride_ch,
    NUM_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr, FP8: tl.constexpr,
):
    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_h[:, None] < NUM_HEADS) & (offs_d[None, :] < HEAD_DIM)
    x = tl.load(x_ptr + t * stride_xt + offs_h[:, None] * stride_xh + offs_d[None, :], mask=mask)
    if FP8 != 0:
        y = fp32_to_fp8_bits(x.to(tl.float32) / scale, FP8)
    else:
        y = x.to(cache_ptr.dtype.element_ty)
    dst = cache_ptr + blk * stride_cb + off * stride_cs + offs_h[:, None] * stride_ch
    tl.store(dst + offs_d[None, :], y, mask=mask)


@triton.jit
def _write_kv_kernel(
    k_ptr, v_ptr, k_cache_ptr, v_cache_ptr, slot_ptr, k_scale, v_scale,
    stride_kt, stride_kh, stride_vt, stride_vh,
    stride_kcb, stride_kcs, stride_kch, stride_vcb, stride_vcs, stride_vch,
    NUM_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, PAGE: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr, FP8: tl.constexpr,
):
    t = tl.program_id(0)
    slot = tl.load(slot_ptr + t)
    if slot >= 0:
        blk = slot // PAGE
        off = slot % PAGE
        _store_one(k_ptr, k_cache_ptr, t, blk, off, k_scale, stride_kt, stride_kh,
                   stride_kcb, stride_kcs, stride_kch, NUM_HEADS, HEAD_DIM, BLOCK_H, BLOCK_D, FP8)
        _store_one(v_ptr, v_cache_ptr, t, blk, off, v_scale, stride_vt, stride_vh,
                   stride_vcb, stride_vcs, stride_vch, NUM_HEADS, HEAD_DIM, BLOCK_H, BLOCK_D, FP8)


def write_kv(
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
) -> None:
    """Store ``k, v [T, Hkv, D]`` at ``slot_mapping [T]`` (int64) of the caches, in place."""
    num_tokens, num_heads, head_dim = k.shape
    assert v.shape == k.shape, (k.shape, v.shape)
    assert k_cache.shape == v_cache.shape and k_cache.dtype == v_cache.dtype
    assert k_cache.dim() == 4 and k_cache.shape[2:] == (num_heads, head_dim), (k_cache.shape, k.shape)
    assert slot_mapping.shape == (num_tokens,) and slot_mapping.dtype == torch.int64
    assert k.stride(2) == 1 and v.stride(2) == 1, "head_dim must be contiguous"
    assert k_cache.stride(3) == 1 and v_cache.stride(3) == 1
    assert k.device == k_cache.device == slot_mapping.device
    assert k_scale > 0 and v_scale > 0
    if num_tokens == 0:
        return
    kind = fp8_kind(k_cache.dtype)
    kc, vc = as_kernel_arg(k_cache), as_kernel_arg(v_cache)
    _write_kv_kernel[(num_tokens,)](
        k, v, kc, vc, slot_mapping, k_scale, v_scale,
        k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        kc.stride(0), kc.stride(1), kc.stride(2), vc.stride(0), vc.stride(1), vc.stride(2),
        NUM_HEADS=num_heads, HEAD_DIM=head_dim, PAGE=k_cache.shape[1],
        BLOCK_H=next_power_of_2(num_heads), BLOCK_D=next_power_of_2(head_dim),
        FP8=kind,
    )
