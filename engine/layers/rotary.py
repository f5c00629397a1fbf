"""Rotary position embedding from explicit positions (the varlen batch has no implicit ones)."""

from __future__ import annotations

import math

import torch

from engine.config import RopeConfig


def inv_frequencies(head_dim: int, rope: RopeConfig) -> torch.Tensor:
    """Per-pair rotation frequencies ``[head_dim // 2]`` in float32, scaled as ``rope`` says."""
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64, device="cpu").float() / head_dim
    inv_freq = 1.0 / (rope.theta**exponents)
    if rope.rope_type == "linear":
        return inv_freq / rope.factor
    if rope.rope_type == "llama3":
        return _llama3_scale(inv_freq, rope)
    if rope.rope_type == "freq_factors":  # llama.cpp's rope_freqs: theta_i = p * inv_freq_i / f_i
        factors = torch.tensor(rope.freq_factors, dtype=torch.float32, device="cpu")
        if factors.shape != inv_freq.shape:
            raise ValueError(f"{len(rope.freq_factors)} rope frequency factors for {inv_freq.numel()} "
                             f"frequency pairs (head_dim {head_dim})")
        return inv_freq / factors
    return inv_freq


def _llama3_scale(inv_freq: torch.Tensor, rope: RopeConfig) -> torch.Tensor:
    """Llama 3.1: keep high frequencies, divide low ones by ``factor``, blend in between."""
    old_len = rope.original_max_position_embeddings
    wavelen = 2 * math.pi / inv_freq
    short_wavelen = old_len / rope.high_freq_factor  # below: unchanged
    long_wavelen = old_len / rope.low_freq_factor  # above: divided by factor
    blend = (old_len / wavelen - rope.low_freq_factor) / (
        rope.high_freq_factor - rope.low_freq_factor
    )
    blended = (1 - blend) * inv_freq / rope.factor + blend * inv_freq
    out = torch.where(wavelen > long_wavelen, inv_freq / rope.factor, blended)
    return torch.where(wavelen < short_wavelen, inv_freq, out)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


def cos_sin(
    positions: torch.Tensor, inv_freq: torch.Tensor, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """``cos, sin [T, head_dim]`` of ``positions [T]``, computed in float32."""
    freqs = positions.float()[:, None] * inv_freq[None, :]  # [T, D/2]
    angles = torch.cat((freqs, freqs), dim=-1)  # [T, D]
    return angles.cos().to(dtype), angles.sin().to(dtype)


class RotaryEmbedding(torch.nn.Module):
    """Gives ``cos, sin [T, head_dim]`` once per forward; the layers apply them to q and k.

    On the CPU, rows come from a table of positions ``0..n-1`` (grown by doubling, per dtype)
    computed by ``cos_sin`` elementwise as a direct call would: the same values for one
    gather instead of six ops per step (there a decode step pays for every op)."""

    def __init__(self, head_dim: int, rope: RopeConfig) -> None:
        super().__init__()
        self.head_dim = head_dim
        # A plain attribute, not a buffer: it stays float32 and off the meta device.
        self.inv_freq = inv_frequencies(head_dim, rope)
        self._tables: dict[torch.dtype, tuple[torch.Tensor, torch.Tensor]] = {}

    def forward(
        self, positions: torch.Tensor, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if self.inv_freq.device != positions.device:
            self.inv_freq = self.inv_freq.to(positions.device)
        if positions.device.type != "cpu":  # a GPU computes it in a few async kernels
            return cos_sin(positions, self.inv_freq, dtype)  # (no host read: CUDA graphs)
        cos, sin = self._table(positions, dtype)
        return cos.index_select(0, positions), sin.index_select(0, positions)

    def _table(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        table = self._tables.get(dtype)
        needed = int(positions.max()) + 1 if positions.numel() else 1
        if table is None or table[0].shape[0] < needed:
            size = max(needed, 2 * table[0].shape[0] if table else 256)
            rows = torch.arange(size, device=positions.device)
            table = self._tables[dtype] = cos_sin(rows, self.inv_freq, dtype)
        return table


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """``x [T, H, D]`` rotated by ``cos, sin [T, D]``."""
    cos, sin = cos[:, None, :], sin[:, None, :]
    return x * cos + rotate_half(x) * sin


def signed_sin(sin: torch.Tensor) -> torch.Tensor:
    """``sin [T, D]`` with its first half negated, for ``apply_rotary_rolled``."""
    half = sin.shape[-1] // 2
    return torch.cat((-sin[:, :half], sin[:, half:]), dim=-1)


def apply_rotary_rolled(x: torch.Tensor, cos: torch.Tensor, sin_signed: torch.Tensor) -> torch.Tensor:
    """``apply_rotary`` in four ops instead of eight, bit-identical: ``rotate_half(x) * sin``
    is ``roll(x, D/2) * signed_sin(sin)`` (a negated product equals the product of a
    negated factor). ``x [T, H, D]`` may be a strided view (q and k of a fused projection)."""
    return x * cos[:, None, :] + x.roll(x.shape[-1] // 2, dims=-1) * sin_signed[:, None, :]
