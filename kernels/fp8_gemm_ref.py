"""Torch references of the FP8 linear (:mod:`kernels.fp8_gemm`), in float32."""

from __future__ import annotations

import torch

from kernels.act_quant_ref import quantize_fp8_per_tensor_ref, quantize_fp8_per_token_ref


def check_fp8_args(
    x: torch.Tensor,
    weight: torch.Tensor,
    weight_scale: torch.Tensor,
    input_scale: torch.Tensor | None,
    bias: torch.Tensor | None,
) -> None:
    """Clear errors for what a loader can get wrong."""
    if x.dim() != 2:
        raise ValueError(f"fp8_linear: x must be [M, K], got shape {list(x.shape)}")
    if weight.dtype != torch.float8_e4m3fn or weight.dim() != 2:
        raise ValueError(f"fp8_linear: weight must be float8_e4m3fn [N, K], got {weight.dtype} {list(weight.shape)}")
    n, k = weight.shape
    if x.shape[1] != k:
        raise ValueError(f"fp8_linear: x has K={x.shape[1]} but weight [N, K] has K={k}")
    if weight_scale.numel() not in (1, n):
        raise ValueError(f"fp8_linear: weight_scale must be (1,) or ({n}, 1), got {list(weight_scale.shape)}")
    if input_scale is not None and input_scale.numel() != 1:
        raise ValueError(f"fp8_linear: input_scale must be (1,), got {list(input_scale.shape)}")
    if bias is not None and bias.shape != (n,):
        raise ValueError(f"fp8_linear: bias must be ({n},), got {list(bias.shape)}")


def dequantize_fp8_weight(weight: torch.Tensor, weight_scale: torch.Tensor) -> torch.Tensor:
    """``W [N, K]`` float32 = ``weight.float() * weight_scale`` (per tensor or per channel)."""
    scale = weight_scale.float().reshape(-1, 1)  # (1, 1) or (N, 1)
    return weight.float() * scale


def fp8_linear_ref(
    x: torch.Tensor,
    weight: torch.Tensor,
    weight_scale: torch.Tensor,
    input_scale: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """``y = dequant(quant(x)) @ W^T + bias``: x quantized per token (``input_scale`` None) or
    with the static per-tensor scale, exactly as the fast path does."""
    check_fp8_args(x, weight, weight_scale, input_scale, bias)
    if input_scale is None:
        xq, sx = quantize_fp8_per_token_ref(x)
    else:
        xq, sx = quantize_fp8_per_tensor_ref(x, input_scale)
    y = (xq.float() * sx) @ dequantize_fp8_weight(weight, weight_scale).T
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


def fp8_weight_only_ref(
    x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """What the weight-only kernel (GPUs without FP8 tensor cores) computes: activations
    unquantized, ``y = x @ W^T + bias`` in float32."""
    check_fp8_args(x, weight, weight_scale, None, bias)
    y = x.float() @ dequantize_fp8_weight(weight, weight_scale).T
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)
