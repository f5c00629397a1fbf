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
from dataclasses import dataclass
from functools import cache

import torch

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
        cache_ = self.kv_cache
        if cache_ is None:
            raise RuntimeError(f"layer {self.layer_idx} has no KV cache: call PagedKVCache.bind")
        if cache_.needs_calibration:
            cache_.calibrate(k, v)
        attend = _attend_triton if _use_triton(q.device.type) else _attend_torch
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
