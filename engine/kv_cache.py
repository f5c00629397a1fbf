"""Per-sequence contiguous KV cache (first engine).

Each running sequence owns one growing buffer for all layers. The paged
block cache of the serving-core issue replaces this class behind the same
``AttentionContext``; the model code does not change.
"""

from __future__ import annotations

import torch


class SequenceKVCache:
    """K and V of one sequence for every layer: ``[layers, capacity, kv_heads, head_dim]``."""

    def __init__(
        self,
        num_layers: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device | str,
        initial_capacity: int = 64,
    ) -> None:
        shape = (num_layers, initial_capacity, num_kv_heads, head_dim)
        self.k = torch.empty(shape, dtype=dtype, device=device)
        self.v = torch.empty(shape, dtype=dtype, device=device)
        self.num_tokens = 0  # tokens committed (written by every layer)

    @property
    def capacity(self) -> int:
        return self.k.shape[1]

    def reserve(self, total_tokens: int) -> None:
        """Grow (doubling) so that ``total_tokens`` fit; called before a forward pass."""
        if total_tokens <= self.capacity:
            return
        new_cap = max(total_tokens, 2 * self.capacity)
        for name in ("k", "v"):
            old = getattr(self, name)
            new = torch.empty((old.shape[0], new_cap, *old.shape[2:]), dtype=old.dtype, device=old.device)
            new[:, : self.num_tokens] = old[:, : self.num_tokens]
            setattr(self, name, new)

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store this step's ``k, v [n, kv_heads, head_dim]`` after the committed tokens;
        return the layer's keys and values up to and including them."""
        start, end = self.num_tokens, self.num_tokens + k.shape[0]
        self.k[layer, start:end] = k
        self.v[layer, start:end] = v
        return self.k[layer, :end], self.v[layer, :end]

    def advance(self, n: int) -> None:
        """Commit ``n`` new tokens once every layer has written them."""
        self.num_tokens += n

    def truncate(self, n: int) -> None:
        self.num_tokens = min(self.num_tokens, n)

    def nbytes(self) -> int:
        return self.k.numel() * self.k.element_size() * 2
