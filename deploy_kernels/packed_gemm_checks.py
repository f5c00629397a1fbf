"""Input checks of the packed GEMMs (``deploy_kernels.int_gemm``, ``deploy_kernels.lut_gemm``): clear
``ValueError`` messages naming the tensor and what was expected, before any launch."""

from __future__ import annotations

import torch


def check_activations(x: torch.Tensor) -> tuple[int, int]:
    """``x [M, K]`` fp16/bf16/fp32 with unit stride along K -> (M, K)."""
    if x.dim() != 2 or x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"x must be a 2-D fp16/bf16/fp32 tensor, got {tuple(x.shape)} {x.dtype}")
    if x.stride(1) != 1 and x.shape[1] > 1:
        raise ValueError(f"x must be contiguous along K, got strides {x.stride()}")
    if x.shape[1] == 0:
        raise ValueError("x has K = 0")
    return x.shape[0], x.shape[1]


def check_packed(qweight: torch.Tensor, rows: int, device: torch.device, what: str) -> int:
    """``qweight`` int32 ``[rows, N]``, contiguous, on ``device`` -> N."""
    if qweight.dtype != torch.int32 or qweight.dim() != 2:
        raise ValueError(f"qweight must be 2-D int32, got {tuple(qweight.shape)} {qweight.dtype}")
    if qweight.shape[0] != rows:
        raise ValueError(f"qweight has {qweight.shape[0]} rows, expected {what}")
    if not qweight.is_contiguous() or qweight.device != device:
        raise ValueError(f"qweight must be contiguous and on {device}")
    return qweight.shape[1]


def check_param(name: str, t: torch.Tensor, shape: tuple[int, ...], x: torch.Tensor) -> None:
    """A per-column parameter: exact shape, ``x.dtype``, contiguous, on x's device."""
    if tuple(t.shape) != shape or t.dtype != x.dtype:
        raise ValueError(f"{name} must be {x.dtype} of shape {shape}, got "
                         f"{t.dtype} of shape {tuple(t.shape)}")
    if not t.is_contiguous() or t.device != x.device:
        raise ValueError(f"{name} must be contiguous and on {x.device}")


def check_bias(bias: torch.Tensor | None, n: int, device: torch.device) -> None:
    if bias is None:
        return
    if tuple(bias.shape) != (n,) or not bias.is_floating_point():
        raise ValueError(f"bias must be a float tensor of shape ({n},), got "
                         f"{bias.dtype} of shape {tuple(bias.shape)}")
    if not bias.is_contiguous() or bias.device != device:
        raise ValueError(f"bias must be contiguous and on {device}")
