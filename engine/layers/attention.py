"""Attention over a flattened batch of sequences, through the paged KV cache.

The model sees one token axis ``T`` that concatenates every scheduled sequence's new tokens
(a prompt chunk for a prefill, one token for a decode). ``AttentionMetadata`` says where each
sequence's tokens start, how long each sequence is in the cache (this step included), its block
table, and the cache slot of every new token. ``Attention.forward`` writes this step's K/V to
its layer's cache (``PagedKVCache.bind`` attaches it), then attends through the block tables:
Triton kernels on CUDA, the torch reference of the same function elsewhere.
"""

from __future__ import annotations

import importlib.util
import logging
import math
from dataclasses import dataclass, field
from functools import cache

import torch
import torch.nn.functional as F

from deploy_kernels.paged_attention_ref import paged_attention_ref, write_kv_ref

log = logging.getLogger(__name__)


# Calibrated scales leave this factor of range above the first batch's largest value.
CALIBRATION_HEADROOM = 2.0


@dataclass
class LayerKVCache:
    """One layer's share: what an ``Attention`` module reads and writes."""

    k: torch.Tensor  # [num_blocks, block_size, Hkv, D]
    v: torch.Tensor  # [num_blocks, block_size, Hkv, D]
    k_scale: float = 1.0  # fp8 only: stored value = x / scale
    v_scale: float = 1.0
    needs_calibration: bool = False  # fp8 without checkpoint scales, not yet calibrated

    def calibrate(self, k: torch.Tensor, v: torch.Tensor) -> None:
        """Set the scales from this batch's ``k, v [T, Hkv, D]`` (skipped while all zeros)."""
        k_amax, v_amax = (float(x.detach().abs().amax().float()) if x.numel() else 0.0 for x in (k, v))
        if not (k_amax > 0 and v_amax > 0 and math.isfinite(k_amax + v_amax)):
            return
        fmax = torch.finfo(self.k.dtype).max
        self.k_scale = CALIBRATION_HEADROOM * k_amax / fmax
        self.v_scale = CALIBRATION_HEADROOM * v_amax / fmax
        self.needs_calibration = False


@dataclass
class AttentionMetadata:
    """Layout of one forward pass: sequence ``b`` has ``query_lens[b]`` new tokens, in order."""

    slot_mapping: torch.Tensor  # [T] int64: cache slot (block * block_size + offset) per token
    query_start_loc: torch.Tensor  # [B + 1] int32: prefix sums of query_lens
    seq_lens: torch.Tensor  # [B] int32: tokens in the cache per sequence, this step's included
    block_tables: torch.Tensor  # [B, max_blocks] int32, right-padded with 0
    max_query_len: int
    max_seq_len: int
    query_lens: list[int]  # host copies of the lengths
    seq_lens_list: list[int]
    decode_only: bool  # every query_len is 1
    # Per-step CPU decode plans by sliding window: built by the first layer, shared by the rest.
    _decode_plans: dict[int | None, DecodePlan | None] = field(default_factory=dict, repr=False)

    def decode_plan(self, block_size: int, sliding_window: int | None) -> DecodePlan | None:
        """The key slots and mask every layer's one-token queries read this step (None: not a
        decode-only step with valid slots, so the reference path runs)."""
        if sliding_window not in self._decode_plans:
            self._decode_plans[sliding_window] = DecodePlan.build(self, block_size, sliding_window)
        return self._decode_plans[sliding_window]

    @property
    def num_tokens(self) -> int:
        return sum(self.query_lens)

    @property
    def num_seqs(self) -> int:
        return len(self.query_lens)

    def last_token_indices(self) -> list[int]:
        """Index (on the flattened token axis) of each sequence's last new token."""
        out, pos = [], 0
        for n in self.query_lens:
            pos += n
            out.append(pos - 1)
        return out

    @classmethod
    def build(
        cls,
        query_lens: list[int],
        seq_lens: list[int],
        block_tables: list[list[int]],
        block_size: int,
        device: torch.device | str,
    ) -> AttentionMetadata:
        """From host lists: each sequence's new tokens are the last ``query_lens[b]`` of its
        ``seq_lens[b]``, and ``block_tables[b]`` must cover all ``seq_lens[b]`` tokens."""
        assert len(query_lens) == len(seq_lens) == len(block_tables)
        slots: list[int] = []
        starts = [0]
        for n, total, table in zip(query_lens, seq_lens, block_tables, strict=True):
            assert 0 < n <= total <= len(table) * block_size, (n, total, len(table), block_size)
            slots.extend(table[p // block_size] * block_size + p % block_size
                         for p in range(total - n, total))
            starts.append(starts[-1] + n)
        width = max((len(t) for t in block_tables), default=0) or 1
        padded = [t + [0] * (width - len(t)) for t in block_tables]
        return cls(
            slot_mapping=torch.tensor(slots, dtype=torch.int64, device=device),
            query_start_loc=torch.tensor(starts, dtype=torch.int32, device=device),
            seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=device),
            block_tables=torch.tensor(padded, dtype=torch.int32, device=device).view(-1, width),
            max_query_len=max(query_lens, default=0),
            max_seq_len=max(seq_lens, default=0),
            query_lens=list(query_lens),
            seq_lens_list=list(seq_lens),
            decode_only=all(n == 1 for n in query_lens),
        )


@dataclass(frozen=True)
class DecodePlan:
    """What a decode step's attention reads, the same for every layer: ``slots [B * L]`` (the
    flat cache slot of each sequence's key positions ``0..L-1``, padding on slot 0) and ``mask``
    (``[B, 1, 1, L]`` bool, None when every key is visible). Built once per step instead of once
    per layer: on the CPU each small op costs microseconds of dispatch."""

    slots: torch.Tensor
    mask: torch.Tensor | None
    num_keys: int  # L: the longest sequence (or window) this step

    @classmethod
    def build(
        cls, meta: AttentionMetadata, block_size: int, sliding_window: int | None,
        min_keys: int = 1, always_mask: bool = False,
    ) -> DecodePlan | None:
        """``min_keys``: pad to at least this many (masked) keys; ``always_mask``: a mask
        tensor even when every key is visible (a compiled step: one graph for both)."""
        if not meta.decode_only or not meta.seq_lens_list or min(meta.seq_lens_list) < 1:
            return None
        if bool((meta.slot_mapping < 0).any()):
            return None  # "do not write" slots: the reference path handles them
        device = meta.block_tables.device
        lens = meta.seq_lens.long()[:, None]  # [B, 1]
        start = torch.zeros_like(lens)
        if sliding_window is not None:  # keys older than the window are never read
            start = (lens - sliding_window).clamp(min=0)
        num_keys = max(int((lens - start).max()), min_keys)
        pos = start + torch.arange(num_keys, device=device)[None, :]  # [B, L] key positions
        visible = pos < lens
        pos = torch.where(visible, pos, 0)
        blocks = meta.block_tables.long().gather(1, pos // block_size)
        slots = (blocks * block_size + pos % block_size).reshape(-1)
        mask = None if bool(visible.all()) and not always_mask else visible[:, None, None, :]
        return cls(slots, mask, num_keys)


@dataclass(frozen=True)
class DecodeStep:
    """A CPU decode step as tensors only, for a compiled step (``engine.cpu_graphs``): this
    step's cache slots, the keys' slots ``[B * L]`` and visibility ``[B, 1, 1, L]`` (always a
    tensor, so one compiled graph serves both), and every layer's ``(k, v)`` cache."""

    slot_mapping: torch.Tensor
    slots: torch.Tensor
    mask: torch.Tensor
    caches: tuple[tuple[torch.Tensor, torch.Tensor], ...]


@cache
def _use_triton(device_type: str) -> bool:
    """Triton kernels on CUDA when triton is installed; logged once per device type."""
    triton = device_type == "cuda" and importlib.util.find_spec("triton") is not None
    if triton:
        log.info("attention: Triton paged-attention kernels on %s", device_type)
    else:
        log.info("attention: torch reference paged attention on %s", device_type)
    return triton


class Attention(torch.nn.Module):
    """Scaled dot-product attention with grouped KV heads over this layer's paged KV cache."""

    def __init__(
        self,
        layer_idx: int,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        scale: float,
        sliding_window: int | None = None,
    ) -> None:
        super().__init__()
        assert num_heads % num_kv_heads == 0
        self.layer_idx = layer_idx
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.scale = scale
        self.sliding_window = sliding_window
        self.kv_cache: LayerKVCache | None = None  # set by PagedKVCache.bind

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttentionMetadata
    ) -> torch.Tensor:
        # q [T, Hq, D], k/v [T, Hkv, D] -> [T, Hq * D]
        if isinstance(meta, DecodeStep):
            k_cache, v_cache = meta.caches[self.layer_idx]
            out = _decode_attention(q, k, v, k_cache, v_cache, meta.slot_mapping, meta.slots,
                                    meta.mask, self.scale)
            return out.reshape(q.shape[0], self.num_heads * self.head_dim)
        cache_ = self.kv_cache
        if cache_ is None:
            raise RuntimeError(f"layer {self.layer_idx} has no KV cache: call PagedKVCache.bind")
        if cache_.needs_calibration:
            cache_.calibrate(k, v)
        if _use_triton(q.device.type):
            attend = _attend_triton
        elif meta.decode_only and cache_.k.dtype == q.dtype:  # not fp8: no dequantize on read
            attend = _attend_torch_decode
        else:
            attend = _attend_torch
        out = attend(q, k, v, meta, cache_, self.scale, self.sliding_window)  # [T, Hq, D]
        return out.reshape(q.shape[0], self.num_heads * self.head_dim)  # [T, Hq * D]


def _attend_torch(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    meta: AttentionMetadata,
    cache_: LayerKVCache,
    scale: float,
    sliding_window: int | None,
) -> torch.Tensor:
    write_kv_ref(k, v, cache_.k, cache_.v, meta.slot_mapping, cache_.k_scale, cache_.v_scale)
    return paged_attention_ref(
        q, cache_.k, cache_.v, meta.block_tables, meta.query_start_loc, meta.seq_lens, scale,
        sliding_window, cache_.k_scale, cache_.v_scale,
    )


def _attend_torch_decode(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    meta: AttentionMetadata,
    cache_: LayerKVCache,
    scale: float,
    sliding_window: int | None,
) -> torch.Tensor:
    """A decode-only step on the CPU: ``paged_attention_ref``'s function with the step's slots
    and mask built once (``DecodePlan``), keys gathered per token, not per block.

    Half-precision caches are read into float32 and attended there: torch's CPU attention
    in bfloat16 runs 2.7x (one sequence of 100 keys) to 6.2x (16 sequences of 400 keys)
    slower than in float32 on the same values, and its result is no closer
    (bench/cpu_attention.py)."""
    plan = meta.decode_plan(cache_.k.shape[1], sliding_window)
    if plan is None:
        return _attend_torch(q, k, v, meta, cache_, scale, sliding_window)
    return _decode_attention(q, k, v, cache_.k, cache_.v, meta.slot_mapping, plan.slots,
                             plan.mask, scale)


def _decode_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    slots: torch.Tensor,
    mask: torch.Tensor | None,
    scale: float,
) -> torch.Tensor:
    """Write this step's ``k, v [B, Hkv, D]`` at ``slot_mapping``, then attend each one-token
    query ``q [B, Hq, D]`` to the keys at ``slots [B * L]`` (``mask [B, 1, 1, L]``)."""
    b, num_kv_heads, head_dim = q.shape[0], k.shape[1], k.shape[2]
    flat_k = k_cache.view(-1, num_kv_heads, head_dim)  # [num_blocks * block_size, Hkv, D]
    flat_v = v_cache.view(-1, num_kv_heads, head_dim)
    flat_k.index_copy_(0, slot_mapping, k)
    flat_v.index_copy_(0, slot_mapping, v)
    shape = (b, slots.shape[0] // b, num_kv_heads, head_dim)
    keys = flat_k.index_select(0, slots).view(shape).transpose(1, 2)  # [B, Hkv, L, D]
    values = flat_v.index_select(0, slots).view(shape).transpose(1, 2)
    o = F.scaled_dot_product_attention(
        q[:, :, None, :].float(), keys.float(), values.float(), attn_mask=mask,
        scale=scale, enable_gqa=q.shape[1] != num_kv_heads,
    )  # [B, Hq, 1, D] float32
    return o[:, :, 0, :].to(q.dtype)


def _attend_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    meta: AttentionMetadata,
    cache_: LayerKVCache,
    scale: float,
    sliding_window: int | None,
) -> torch.Tensor:
    from deploy_kernels.paged_attention import paged_attention
    from deploy_kernels.paged_attention_decode import paged_attention_decode
    from deploy_kernels.write_kv import write_kv

    write_kv(k, v, cache_.k, cache_.v, meta.slot_mapping, cache_.k_scale, cache_.v_scale)
    if meta.decode_only:
        return paged_attention_decode(
            q, cache_.k, cache_.v, meta.block_tables, meta.seq_lens, scale, meta.max_seq_len,
            sliding_window, cache_.k_scale, cache_.v_scale,
        )
    return paged_attention(
        q, cache_.k, cache_.v, meta.block_tables, meta.query_start_loc, meta.seq_lens, scale,
        meta.max_query_len, sliding_window, cache_.k_scale, cache_.v_scale,
    )
