"""Torch references of the activation quantizers in :mod:`deploy_kernels.act_quant`.

Per-token (dynamic) scales are one float32 per row; the Triton kernels must match these
bit for bit: the same fp32 absmax, the same fp32 division, the same rounding (nearest even)
and saturation.
"""

from __future__ import annotations

import torch

FP8_MAX = 448.0  # largest finite float8_e4m3fn
INT8_MAX = 127.0
SCALE_FLOOR = 1e-12  # an all-zero row gets this absmax instead of 0 (no division by zero)


def _row_absmax(x: torch.Tensor) -> torch.Tensor:
    assert x.dim() == 2, f"expected x [M, K], got shape {list(x.shape)}"
    return x.float().abs().amax(dim=1, keepdim=True).clamp_min(SCALE_FLOOR)  # [M, 1]


def _div(a: torch.Tensor, qmax: float) -> torch.Tensor:
    """``a / qmax`` correctly rounded: CUDA torch divides by a Python scalar as a multiply
    by its reciprocal (off by an ulp at times); by a device tensor it divides exactly."""
    return a / torch.tensor(qmax, dtype=torch.float32, device=a.device)


def to_fp8_saturated(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``fp8(clamp(x / scale))``: values beyond the range saturate, never inf/NaN."""
    return (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)


def quantize_fp8_per_token_ref(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``x [M, K]`` -> ``(xq float8_e4m3fn [M, K], scale float32 [M, 1])``."""
    scale = _div(_row_absmax(x), FP8_MAX)
    return to_fp8_saturated(x, scale), scale


def quantize_int8_per_token_ref(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``x [M, K]`` -> ``(xq int8 [M, K], scale float32 [M, 1])``, symmetric, round half to even."""
    scale = _div(_row_absmax(x), INT8_MAX)
    xq = torch.round(x.float() / scale).clamp(-128.0, 127.0).to(torch.int8)
    return xq, scale


def quantize_fp8_per_tensor_ref(
    x: torch.Tensor, scale: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Static ``scale`` (1,) when given, else the dynamic ``max(amax, 1e-12) / 448``."""
    if scale is None:
        scale = _div(x.float().abs().amax().clamp_min(SCALE_FLOOR), FP8_MAX).reshape(1)
    scale = scale.float().reshape(1)
    return to_fp8_saturated(x, scale), scale


def quantize_int8_static_ref(
    x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None
) -> torch.Tensor:
    """Static per-tensor int8: ``clamp(round(x / scale) + zero_point, -128, 127)``."""
    q = torch.round(x.float() / scale.float().reshape(1))
    if zero_point is not None:
        q = q + zero_point.float().reshape(1)
    return q.clamp(-128.0, 127.0).to(torch.int8)
