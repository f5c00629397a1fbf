"""Torch reference of the INT8 W8A8 linear (:mod:`deploy_kernels.int8_gemm`).

``y[t, n] = (sum_k (xq[t, k] - zp) wq[n, k]) * sx[t] * sw[n] + bias[n]``: ``sx`` per token
(dynamic, symmetric, ``zp = 0``) or one static scale with an optional zero point.
"""

from __future__ import annotations

import torch

from deploy_kernels.act_quant_ref import quantize_int8_per_token_ref, quantize_int8_static_ref
from deploy_kernels.w8a8_args import check_w8a8_args


def quantize_int8_input_ref(
    x: torch.Tensor, input_scale: torch.Tensor | None, input_zero_point: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(xq int8 [M, K], scale float32 [M, 1] or (1, 1))`` as the fast path quantizes."""
    if input_scale is None:
        return quantize_int8_per_token_ref(x)
    return quantize_int8_static_ref(x, input_scale, input_zero_point), input_scale.float().reshape(1, 1)


def int8_linear_ref(
    x: torch.Tensor,
    weight: torch.Tensor,
    weight_scale: torch.Tensor,
    input_scale: torch.Tensor | None = None,
    input_zero_point: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """Integer products summed exactly (float64 holds them: |sum| < 2^53), scaled in float32."""
    check_w8a8_args(
        "int8_linear", x, weight, torch.int8, weight_scale, input_scale, bias, input_zero_point
    )
    xq, sx = quantize_int8_input_ref(x, input_scale, input_zero_point)
    xi = xq.double()
    if input_zero_point is not None:
        xi = xi - input_zero_point.double().reshape(1)
    acc = (xi @ weight.double().T).float()  # [M, N], exact integers (rounded to fp32 once)
    y = acc * sx * weight_scale.float().reshape(1, -1)
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)
