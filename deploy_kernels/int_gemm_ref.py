"""Torch reference of the group-quantized integer GEMM (AWQ and GPTQ after repacking).

Runtime layout (what ``engine.quantization`` repacks AWQ and GPTQ checkpoints into):

- ``qweight`` int32 ``[ceil(K / pack), N]``, ``pack = 32 // bits``, bits 2, 4 or 8
  (3-bit checkpoints are widened to 4): the value of logical ``(k, n)`` sits at bits
  ``bits * (k % pack)`` of ``qweight[k // pack, n]``, least significant first, like
  GPTQ's own packing. Rows past ``K`` are zero.
- ``scales`` and ``zeros`` ``[ceil(K / G), N]`` in the activation dtype; ``zeros`` holds
  the integer zero points as floats.
- ``W[k, n] = (q[k, n] - zeros[k // G, n]) * scales[k // G, n]`` and ``y = x W (+ bias)``.
"""

from __future__ import annotations

import torch

SUPPORTED_BITS = (2, 4, 8)


def pack_along_k(q: torch.Tensor, bits: int) -> torch.Tensor:
    """``q [K, N]`` integers in ``[0, 2^bits)`` -> ``qweight [ceil(K / pack), N]`` int32."""
    assert bits in SUPPORTED_BITS, bits
    pack = 32 // bits
    k, n = q.shape
    rows = -(-k // pack)
    padded = torch.zeros(rows * pack, n, dtype=torch.int64, device=q.device)
    padded[:k] = q.to(torch.int64)
    assert int(padded.min()) >= 0 and int(padded.max()) < 2**bits, "values out of range"
    shifts = (torch.arange(pack, device=q.device, dtype=torch.int64) * bits).view(1, pack, 1)
    words = (padded.view(rows, pack, n) << shifts).sum(dim=1)  # fields do not overlap
    return _to_int32(words)


def unpack_along_k(qweight: torch.Tensor, bits: int, k: int) -> torch.Tensor:
    """``qweight [ceil(K / pack), N]`` int32 -> ``q [K, N]`` int32 in ``[0, 2^bits)``."""
    assert bits in SUPPORTED_BITS and qweight.dtype == torch.int32, (bits, qweight.dtype)
    pack = 32 // bits
    shifts = (torch.arange(pack, device=qweight.device, dtype=torch.int32) * bits).view(1, pack, 1)
    q = (qweight.unsqueeze(1) >> shifts) & (2**bits - 1)  # [rows, pack, N]
    return q.reshape(-1, qweight.shape[1])[:k]


def dequantize_int(
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    bits: int,
    group_size: int,
    k: int,
) -> torch.Tensor:
    """``W [K, N]`` in float32: ``(q - zeros[k // G]) * scales[k // G]``."""
    q = unpack_along_k(qweight, bits, k).float()
    group = torch.arange(k, device=qweight.device) // group_size
    return (q - zeros.float()[group]) * scales.float()[group]


def int_gemm_ref(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    bits: int,
    group_size: int,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """``x [M, K] @ W [K, N] (+ bias)`` in float32, returned in ``x.dtype``."""
    w = dequantize_int(qweight, scales, zeros, bits, group_size, x.shape[-1])
    y = x.float() @ w
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


def _to_int32(words: torch.Tensor) -> torch.Tensor:
    """int64 words holding 32-bit patterns -> the int32 with the same bits."""
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)
