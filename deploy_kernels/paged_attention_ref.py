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

    On the CPU the cost is mostly per call, so sequences are batched: all one-token queries
    (decodes) in one padded call, and the longer ones (prefill chunks) in another when
    padding them to the longest wastes at most half the work, else one call each.
    """
    num_heads, num_kv_heads = q.shape[1], k_cache.shape[2]
    assert q.dim() == 3 and num_heads % num_kv_heads == 0 and k_cache.shape == v_cache.shape
    starts = query_start_loc.tolist()
    lens = seq_lens.tolist()
    q_lens = [b - a for a, b in zip(starts, starts[1:], strict=False)]
    args = (k_cache, v_cache, scale, sliding_window, k_scale, v_scale)
    if all(n == 1 for n in q_lens):
        return _decode_batch(q, block_tables, seq_lens, max(lens, default=0), *args)
    out = torch.empty_like(q)
    decodes = [b for b, n in enumerate(q_lens) if n == 1]
    if decodes:
        rows = torch.tensor([starts[b] for b in decodes], device=q.device)
        picked = torch.tensor(decodes, device=q.device)
        out[rows] = _decode_batch(q[rows], block_tables[picked], seq_lens[picked],
                                  max(lens[b] for b in decodes), *args)
    prefills = [b for b, n in enumerate(q_lens) if n > 1]
    padded = len(prefills) * max((q_lens[b] for b in prefills), default=0) * max(
        (lens[b] for b in prefills), default=0)
    if len(prefills) > 1 and padded <= 2 * sum(q_lens[b] * lens[b] for b in prefills):
        _prefill_batch(q, out, prefills, starts, q_lens, lens, block_tables, *args)
    else:
        for b in prefills:
            _prefill_batch(q, out, [b], starts, q_lens, lens, block_tables, *args)
    return out


def _prefill_batch(
    q: torch.Tensor,
    out: torch.Tensor,
    seqs: list[int],
    starts: list[int],
    q_lens: list[int],
    lens: list[int],
    block_tables: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    scale: float,
    sliding_window: int | None,
    k_scale: float,
    v_scale: float,
) -> None:
    """Sequences ``seqs`` in one call, queries and keys right-padded to the longest; writes
    their rows of ``out``."""
    device = q.device
    max_q, max_len = max(q_lens[b] for b in seqs), max(lens[b] for b in seqs)
    qn = torch.tensor([q_lens[b] for b in seqs], device=device)[:, None]  # [B, 1]
    sl = torch.tensor([lens[b] for b in seqs], device=device)[:, None]  # [B, 1]
    i = torch.arange(max_q, device=device)[None, :]  # [1, max_q]
    valid = i < qn  # [B, max_q]
    first = torch.tensor([starts[b] for b in seqs], device=device)[:, None]
    rows = (first + i).clamp(max=q.shape[0] - 1)  # [B, max_q]; padding rows are dropped below
    n_blocks = -(-max_len // k_cache.shape[1])
    blocks = block_tables[torch.tensor(seqs, device=device), :n_blocks].long().clamp(min=0)
    keys = dequantize(_gather(k_cache, blocks)[:, :max_len], k_scale, q.dtype)  # [B, L, Hkv, D]
    values = dequantize(_gather(v_cache, blocks)[:, :max_len], v_scale, q.dtype)
    q_pos = (sl - qn + i)[:, :, None]  # [B, max_q, 1]
    k_pos = torch.arange(max_len, device=device)[None, None, :]  # [1, 1, L]
    mask = _mask(q_pos, k_pos, sliding_window) & (k_pos < sl[:, :, None])
    mask |= ~valid[:, :, None] & (k_pos == 0)  # padding rows see one key: no all-masked NaN
    o = F.scaled_dot_product_attention(
        q[rows].transpose(1, 2),  # [B, Hq, max_q, D]
        keys.transpose(1, 2),  # [B, Hkv, L, D]
        values.transpose(1, 2),
        attn_mask=mask[:, None],  # [B, 1, max_q, L]
        scale=scale,
        enable_gqa=q.shape[1] != k_cache.shape[2],
    ).transpose(1, 2)  # [B, max_q, Hq, D]
    out[rows[valid]] = o[valid]


def _decode_batch(
    q: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    max_seq_len: int,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    scale: float,
    sliding_window: int | None,
    k_scale: float,
    v_scale: float,
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
