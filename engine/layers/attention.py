"""Attention over a flattened batch of sequences (variable lengths, no padding).

The model sees one token axis ``T`` that concatenates every scheduled
sequence's new tokens (a whole prompt for a prefill, one token for a decode).
``AttentionContext`` tells the attention layer where each sequence starts and
which KV cache it writes to; this is the seam the paged cache and the Triton
kernels plug into.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from engine.kv_cache import SequenceKVCache


@dataclass
class AttentionContext:
    """Layout of one forward pass. ``query_lens[i]`` new tokens of sequence i, in order."""

    query_lens: list[int]
    caches: list[SequenceKVCache]

    def __post_init__(self) -> None:
        assert len(self.query_lens) == len(self.caches)

    @property
    def num_tokens(self) -> int:
        return sum(self.query_lens)

    def last_token_indices(self) -> list[int]:
        """Index (on the flattened token axis) of each sequence's last new token."""
        out, pos = [], 0
        for n in self.query_lens:
            pos += n
            out.append(pos - 1)
        return out


def causal_mask(q_len: int, kv_len: int, sliding_window: int | None, device) -> torch.Tensor | None:
    """Boolean mask ``[q_len, kv_len]`` (True = attend) for queries at the end of the keys."""
    if q_len == 1 and (sliding_window is None or kv_len <= sliding_window):
        return None
    q_pos = torch.arange(kv_len - q_len, kv_len, device=device)[:, None]
    k_pos = torch.arange(kv_len, device=device)[None, :]
    mask = k_pos <= q_pos
    if sliding_window is not None:
        mask &= (q_pos - k_pos) < sliding_window
    return mask


class Attention(torch.nn.Module):
    """Scaled dot-product attention with grouped KV heads, reading and writing the KV cache."""

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

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: AttentionContext
    ) -> torch.Tensor:
        # q [T, Hq, D], k/v [T, Hkv, D] -> [T, Hq * D]
        out = torch.empty_like(q)
        start = 0
        for n, cache in zip(ctx.query_lens, ctx.caches, strict=True):
            end = start + n
            keys, values = cache.write(self.layer_idx, k[start:end], v[start:end])  # [L, Hkv, D]
            mask = causal_mask(n, keys.shape[0], self.sliding_window, q.device)
            o = F.scaled_dot_product_attention(
                q[start:end].transpose(0, 1),  # [Hq, n, D]
                keys.transpose(0, 1),  # [Hkv, L, D]
                values.transpose(0, 1),
                attn_mask=mask,
                scale=self.scale,
                enable_gqa=self.num_heads != self.num_kv_heads,
            )
            out[start:end] = o.transpose(0, 1)
            start = end
        return out.reshape(q.shape[0], self.num_heads * self.head_dim)
