"""Round-to-nearest group quantization of a linear weight, and its exact inverse.

Conventions (shared by the GPTQ and AWQ paths):

- A weight is ``W [N, K]`` (``nn.Linear``: y = x W^T). Groups run along K: input channel
  ``k`` belongs to group ``g_idx[k]`` (``k // G`` unless GPTQ's act-order says otherwise).
- ``q`` integers in ``[0, 2^b)``, ``scales [num_groups, N]`` float32 holding fp16 values, ``zeros
  [num_groups, N]`` integer zero points, so ``W[n, k] ~ (q[n, k] - z[g, n]) * s[g, n]``.
- Asymmetric: the range is ``[min(w, 0), max(w, 0)]`` (0 always representable, as in
  AutoGPTQ). Symmetric: ``z = 2^(b-1)`` and the range is ``+-max|w|``.
- ``min_zero=1`` (GPTQ v1 checkpoints store ``z - 1``): a group whose zero would round
  to 0 gets ``z = 1`` and a scale widened so that its maximum still fits, instead of the
  lossy "-1" that the format cannot store.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class GroupQuant:
    """One linear layer's integer weights: see the module docstring for the formula."""

    q: torch.Tensor  # [N, K] int32 in [0, 2^bits)
    scales: torch.Tensor  # [num_groups, N] float32
    zeros: torch.Tensor  # [num_groups, N] int32
    g_idx: torch.Tensor  # [K] int32
    bits: int
    group_size: int  # G, or K for one group per row

    def dequantize(self) -> torch.Tensor:
        """``W [N, K]`` float32."""
        g = self.g_idx.long()
        return (self.q.float() - self.zeros.float()[g].T) * self.scales[g].T


def group_params(
    w: torch.Tensor, bits: int, sym: bool, min_zero: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point of each row of ``w [N, group]`` -> ``(scale [N], zero [N])``,
    the zero as an integer-valued float."""
    maxq = 2**bits - 1
    w = w.float()
    wmin = w.min(dim=1).values.clamp(max=0)
    wmax = w.max(dim=1).values.clamp(min=0)
    if sym:
        wmax = torch.maximum(-wmin, wmax)
        wmin = -wmax
    flat = (wmin == 0) & (wmax == 0)  # an all-zero row: any scale works
    wmin = torch.where(flat, -1.0, wmin)
    wmax = torch.where(flat, 1.0, wmax)
    scale = _fp16_exact((wmax - wmin) / maxq)
    if sym:
        return scale, torch.full_like(scale, float((maxq + 1) // 2))
    zero = torch.round(-wmin / scale)
    if min_zero:
        low = zero < min_zero  # only when wmin is (almost) 0: widen the scale, keep wmax
        scale = torch.where(low, _fp16_exact(wmax / (maxq - min_zero)), scale)
        zero = torch.where(low, torch.full_like(zero, float(min_zero)), zero)
    return scale, zero


def _fp16_exact(scale: torch.Tensor) -> torch.Tensor:
    """The checkpoint stores fp16 scales: choose them in fp16 so that the rounding decisions
    (and GPTQ's error feedback) see the scale the reader will use."""
    return scale.clamp(min=2.0**-14, max=65504.0).half().float()


def quantize_with(
    w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int
) -> torch.Tensor:
    """``w [N, ...]`` with per-row ``scale, zero [N]`` (or broadcastable) -> integer-valued q."""
    shape = (-1,) + (1,) * (w.dim() - 1)
    return torch.clamp(torch.round(w / scale.view(shape)) + zero.view(shape), 0, 2**bits - 1)


def quantize_rtn(
    w: torch.Tensor, bits: int, group_size: int, sym: bool = False, min_zero: int = 0
) -> GroupQuant:
    """Round-to-nearest of ``w [N, K]`` in groups of ``group_size`` input channels
    (``-1``: one group per row); a last group may be shorter."""
    n, k = w.shape
    g = k if group_size == -1 else group_size
    num_groups = -(-k // g)
    q = torch.empty(n, k, dtype=torch.int32)
    scales = torch.empty(num_groups, n)
    zeros = torch.empty(num_groups, n, dtype=torch.int32)
    for i in range(num_groups):
        cols = w[:, i * g : (i + 1) * g].float()
        scale, zero = group_params(cols, bits, sym, min_zero)
        q[:, i * g : (i + 1) * g] = quantize_with(cols, scale, zero, bits).to(torch.int32)
        scales[i], zeros[i] = scale, zero.to(torch.int32)
    g_idx = (torch.arange(k) // g).to(torch.int32)
    return GroupQuant(q, scales, zeros, g_idx, bits, g)


def fake_quantize(w: torch.Tensor, bits: int, group_size: int, sym: bool = False) -> torch.Tensor:
    """``dequantize(quantize_rtn(w))`` without the bookkeeping (the AWQ search's inner loop)."""
    n, k = w.shape
    g = k if group_size == -1 else group_size
    assert k % g == 0, (k, g)
    groups = w.float().reshape(n * (k // g), g)
    scale, zero = group_params(groups, bits, sym)
    q = quantize_with(groups, scale, zero, bits)
    return ((q - zero[:, None]) * scale[:, None]).reshape(n, k)
