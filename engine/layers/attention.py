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
from torch.nn.utils.rnn import pad_sequence

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
        decode_rows: list[int] = []
        decode_kv: list[tuple[torch.Tensor, torch.Tensor]] = []
        start = 0
        for n, cache in zip(ctx.query_lens, ctx.caches, strict=True):
            end = start + n
            keys, values = cache.write(self.layer_idx, k[start:end], v[start:end])  # [L, Hkv, D]
            if n == 1:  # decodes are gathered into one padded call below
                decode_rows.append(start)
                decode_kv.append((keys, values))
            else:
                out[start:end] = self._attend(q[start:end], keys, values)
            start = end
        if len(decode_rows) == 1:
            keys, values = decode_kv[0]
            out[decode_rows[0] : decode_rows[0] + 1] = self._attend(q[decode_rows[0]][None], keys, values)
        elif decode_rows:
            rows = torch.tensor(decode_rows, device=q.device)
            out[rows] = self._attend_decodes(q[rows], decode_kv)
        return out.reshape(q.shape[0], self.num_heads * self.head_dim)

    def _attend(self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """One sequence: ``q [n, Hq, D]`` at the end of ``keys/values [L, Hkv, D]``."""
        mask = causal_mask(q.shape[0], keys.shape[0], self.sliding_window, q.device)
        o = F.scaled_dot_product_attention(
            q.transpose(0, 1),  # [Hq, n, D]
            keys.transpose(0, 1),  # [Hkv, L, D]
            values.transpose(0, 1),
            attn_mask=mask,
            scale=self.scale,
            enable_gqa=self.num_heads != self.num_kv_heads,
        )
        return o.transpose(0, 1)

    def _attend_decodes(
        self, q: torch.Tensor, kv: list[tuple[torch.Tensor, torch.Tensor]]
    ) -> torch.Tensor:
        """Many one-token queries ``q [B, Hq, D]`` in one call, keys right-padded to the longest."""
        lens = torch.tensor([keys.shape[0] for keys, _ in kv], device=q.device)
        keys = pad_sequence([keys for keys, _ in kv], batch_first=True)  # [B, Lmax, Hkv, D]
        values = pad_sequence([values for _, values in kv], batch_first=True)
        k_pos = torch.arange(keys.shape[1], device=q.device)[None, :]
        mask = k_pos < lens[:, None]  # [B, Lmax]
        if self.sliding_window is not None:
            mask &= k_pos >= (lens[:, None] - self.sliding_window)
        o = F.scaled_dot_product_attention(
            q[:, :, None, :],  # [B, Hq, 1, D]
            keys.transpose(1, 2),  # [B, Hkv, Lmax, D]
            values.transpose(1, 2),
            attn_mask=mask[:, None, None, :],
            scale=self.scale,
            enable_gqa=self.num_heads != self.num_kv_heads,
        )
        return o[:, :, 0, :]  # [B, Hq, D]
