"""Torch reference of the lookup-table GEMM (SqueezeLLM's non-uniform 3/4-bit weights).

Runtime layout: ``qweight`` int32 ``[ceil(K / 8), N]``, 4-bit indices packed along K
least significant first (as ``deploy_kernels.int_gemm_ref.pack_along_k(q, 4)``; 3-bit
checkpoints are widened), ``lut [N, 16]`` (a 3-bit table fills the first 8 entries);
``W[k, n] = lut[n, q[k, n]]`` and ``y = x W (+ bias)``.
"""

from __future__ import annotations

import torch

from deploy_kernels.int_gemm_ref import unpack_along_k


def dequantize_lut(qweight: torch.Tensor, lut: torch.Tensor, k: int) -> torch.Tensor:
    """``W [K, N]`` in float32."""
    q = unpack_along_k(qweight, 4, k).long()  # [K, N]
    return torch.gather(lut.float(), 1, q.t().contiguous()).t()


def lut_gemm_ref(
    x: torch.Tensor, qweight: torch.Tensor, lut: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """``x [M, K] @ W [K, N] (+ bias)`` in float32, returned in ``x.dtype``."""
    y = x.float() @ dequantize_lut(qweight, lut, x.shape[-1])
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)
