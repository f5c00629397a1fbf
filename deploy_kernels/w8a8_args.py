"""Argument checks shared by the W8A8 linears (FP8 and INT8) and their torch references."""

from __future__ import annotations

import torch


def check_w8a8_args(
    op: str,
    x: torch.Tensor,
    weight: torch.Tensor,
    weight_dtype: torch.dtype,
    weight_scale: torch.Tensor,
    input_scale: torch.Tensor | None,
    bias: torch.Tensor | None,
    input_zero_point: torch.Tensor | None = None,
) -> None:
    """Clear errors (prefixed with ``op``, e.g. ``fp8_linear``) for what a loader can get
    wrong: ``x [M, K]``, ``weight [N, K]`` of ``weight_dtype``, ``weight_scale`` (1,) or
    (N, 1), ``input_scale`` None or (1,), ``input_zero_point`` (int8) only beside a static
    ``input_scale``, ``bias`` (N,)."""
    if x.dim() != 2:
        raise ValueError(f"{op}: x must be [M, K], got shape {list(x.shape)}")
    if weight.dtype != weight_dtype or weight.dim() != 2:
        expected = str(weight_dtype).removeprefix("torch.")
        raise ValueError(
            f"{op}: weight must be {expected} [N, K], got {weight.dtype} {list(weight.shape)}"
        )
    n, k = weight.shape
    if x.shape[1] != k:
        raise ValueError(f"{op}: x has K={x.shape[1]} but weight [N, K] has K={k}")
    if weight_scale.numel() not in (1, n):
        raise ValueError(
            f"{op}: weight_scale must be (1,) or ({n}, 1), got {list(weight_scale.shape)}"
        )
    if input_scale is not None and input_scale.numel() != 1:
        raise ValueError(f"{op}: input_scale must be (1,), got {list(input_scale.shape)}")
    if input_zero_point is not None and (input_scale is None or input_zero_point.numel() != 1):
        raise ValueError(f"{op}: input_zero_point needs a static input_scale and must be (1,)")
    if bias is not None and bias.shape != (n,):
        raise ValueError(f"{op}: bias must be ({n},), got {list(bias.shape)}")
