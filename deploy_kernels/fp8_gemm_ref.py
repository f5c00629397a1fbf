"""Torch references of the FP8 linear (:mod:`deploy_kernels.fp8_gemm`), in float32."""

from __future__ import annotations

import torch

from deploy_kernels.act_quant_ref import quantize_fp8_per_tensor_ref, quantize_fp8_per_token_ref
from deploy_kernels.w8a8_args import check_w8a8_args


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
    check_w8a8_args("fp8_linear", x, weight, torch.float8_e4m3fn, weight_scale, input_scale, bias)
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
    check_w8a8_args("fp8_linear", x, weight, torch.float8_e4m3fn, weight_scale, None, bias)
    y = x.float() @ dequantize_fp8_weight(weight, weight_scale).T
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)
