"""Plain torch reference of paged attention and of the KV-cache write (the CPU engine uses it).

Cache layout, per layer: ``k_cache, v_cache [num_blocks, block_size, Hkv, D]``; token ``p`` of
a sequence lives in block ``block_tables[b, p // block_size]`` at slot ``p % block_size``.
A flat *slot* is ``block * block_size + offset``; a negative slot means "do not write".

FP8 caches (``float8_e4m3fn`` / ``float8_e5m2``) hold ``x / scale`` (per-tensor scale, clamped to
the format's finite range, rounded to nearest even) and are read back as ``fp8 * scale``;
caches of other dtypes ignore ``k_scale``/``v_scale``.
The Triton kernels in ``kernels/paged_attention.py`` and ``kernels/write_kv.py`` compute the
same functions and are tested against these.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)


def is_fp8(dtype: torch.dtype) -> bool:
    return dtype in FP8_DTYPES


def quantize_fp8(x: torch.Tensor, scale: float, dtype: torch.dtype) -> torch.Tensor:
    """``x / scale`` clamped to the finite range of ``dtype`` and cast (round to nearest even)."""
    fmax = torch.finfo(dtype).max
    return (x.float() / scale).clamp(-fmax, fmax).to(dtype)


def dequantize(x: torch.Tensor, scale: float, dtype: torch.dtype) -> torch.Tensor:
    """Cache values as ``dtype``: fp8 times its scale; other dtypes only cast (scale unused)."""
    if is_fp8(x.dtype):
        return (x.float() * scale).to(dtype)
    return x.to(dtype)


def write_kv_ref(
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
) -> None:
    """Store ``k, v [T, Hkv, D]`` at ``slot_mapping [T]`` (int64) of the caches, in place."""
    assert k.shape == v.shape and k.dim() == 3 and slot_mapping.shape == (k.shape[0],)
    keep = slot_mapping >= 0
    if not bool(keep.all()):
        k, v, slot_mapping = k[keep], v[keep], slot_mapping[keep]
    for x, cache, scale in ((k, k_cache, k_scale), (v, v_cache, v_scale)):
        flat = cache.view(-1, *cache.shape[2:])  # [num_blocks * block_size, Hkv, D]
        if is_fp8(cache.dtype):  # index_put on fp8 is not implemented everywhere: write the bits
            bits = quantize_fp8(x, scale, cache.dtype).view(torch.uint8)
            flat.view(torch.uint8)[slot_mapping] = bits
        else:
            flat[slot_mapping] = x.to(cache.dtype)


def _gather(cache: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
    """Blocks ``[..., n]`` of ``cache`` laid end to end: ``[..., n * block_size, Hkv, D]``."""
    out = cache.index_select(0, blocks.reshape(-1))  # [N * n, block_size, Hkv, D]
    return out.reshape(*blocks.shape[:-1], -1, *cache.shape[2:])


def _mask(q_pos: torch.Tensor, k_pos: torch.Tensor, sliding_window: int | None) -> torch.Tensor:
    """True where a query at ``q_pos [..., 1]`` sees a key at ``k_pos [..., L]``."""
    mask = k_pos <= q_pos
    if sliding_window is not None:
        mask &= (q_pos - k_pos) < sliding_window
    return mask


def paged_attention_ref(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    sliding_window: int | None = None,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
) -> torch.Tensor:
    """Causal attention of ``q [T, Hq, D]`` over the paged caches; returns ``[T, Hq, D]``.

    Sequence ``b`` owns query rows ``query_start_loc[b]:query_start_loc[b+1]`` (its last
    ``query_len`` tokens) and ``seq_lens[b]`` tokens in the cache, this step's included. Its
    query ``i`` sits at position ``seq_len - query_len + i`` and sees keys at positions up to
    its own (and, with a window ``w``, fewer than ``w`` positions back). GQA: ``Hq % Hkv == 0``.
    """
    num_heads, num_kv_heads = q.shape[1], k_cache.shape[2]
    assert q.dim() == 3 and num_heads % num_kv_heads == 0 and k_cache.shape == v_cache.shape
    block_size = k_cache.shape[1]
    starts = query_start_loc.tolist()
    lens = seq_lens.tolist()
    if all(b - a == 1 for a, b in zip(starts, starts[1:], strict=False)):
        return _decode_batch(q, k_cache, v_cache, block_tables, seq_lens, scale,
                             sliding_window, k_scale, v_scale, max(lens, default=0))
    gqa = num_heads != num_kv_heads
    out = torch.empty_like(q)
    for b, seq_len in enumerate(lens):
        start, end = starts[b], starts[b + 1]
        if end == start:
            continue
        n_blocks = -(-seq_len // block_size)
        blocks = block_tables[b, :n_blocks].long()
        keys = dequantize(_gather(k_cache, blocks)[:seq_len], k_scale, q.dtype)  # [L, Hkv, D]
        values = dequantize(_gather(v_cache, blocks)[:seq_len], v_scale, q.dtype)
        q_pos = torch.arange(seq_len - (end - start), seq_len, device=q.device)[:, None]
        mask = _mask(q_pos, torch.arange(seq_len, device=q.device)[None, :], sliding_window)
        o = F.scaled_dot_product_attention(
            q[start:end].transpose(0, 1),  # [Hq, n, D]
            keys.transpose(0, 1),  # [Hkv, L, D]
            values.transpose(0, 1),
            attn_mask=mask,  # [n, L]
            scale=scale,
            enable_gqa=gqa,
        )
        out[start:end] = o.transpose(0, 1)
    return out


def _decode_batch(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    sliding_window: int | None,
    k_scale: float,
    v_scale: float,
    max_seq_len: int,
) -> torch.Tensor:
    """One query per sequence (``q [B, Hq, D]``): one padded SDPA call for the whole batch."""
    if q.shape[0] == 0:
        return torch.empty_like(q)
    n_blocks = -(-max_seq_len // k_cache.shape[1])
    blocks = block_tables[:, :n_blocks].long().clamp(min=0)  # padding entries are masked
    keys = dequantize(_gather(k_cache, blocks), k_scale, q.dtype)  # [B, Lmax, Hkv, D]
    values = dequantize(_gather(v_cache, blocks), v_scale, q.dtype)
    k_pos = torch.arange(keys.shape[1], device=q.device)[None, :]  # [1, Lmax]
    q_pos = (seq_lens.long() - 1)[:, None]  # [B, 1]
    mask = _mask(q_pos, k_pos, sliding_window)  # [B, Lmax]
    o = F.scaled_dot_product_attention(
        q[:, :, None, :],  # [B, Hq, 1, D]
        keys.transpose(1, 2),  # [B, Hkv, Lmax, D]
        values.transpose(1, 2),
        attn_mask=mask[:, None, None, :],
        scale=scale,
        enable_gqa=q.shape[1] != k_cache.shape[2],
    )
    return o[:, :, 0, :]  # [B, Hq, D]
