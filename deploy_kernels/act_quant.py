"""Activation quantization (FP8 e4m3 and INT8) in one pass, in Triton: per token (dynamic)
or with a static per-tensor scale (and int8 zero point).

Each program reads one row once (the whole row sits in registers: ``BLOCK_K >= K``),
takes its absmax, and writes the quantized row and its float32 scale. The math matches
:mod:`deploy_kernels.act_quant_ref` bit for bit: fp32 absmax, IEEE division (``div_rn``), rounding
to nearest even (fp8 through :func:`deploy_kernels.fp8.fp32_to_fp8_bits`, int8 with the fp32
magic-number trick), saturation. fp8 is written as its ``uint8`` bits (runs on any GPU and in the
interpreter), or on sm89+ GPUs through the hardware conversion (cheaper, same rounding).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from deploy_kernels.act_quant_ref import FP8_MAX, INT8_MAX, SCALE_FLOOR, quantize_fp8_per_tensor_ref
from deploy_kernels.fp8 import E4M3, fp32_to_fp8_bits
from deploy_kernels.host_ints import next_power_of_2

_E4M3 = tl.constexpr(E4M3)  # compiled kernels see only constexpr globals


def has_fp8_tensor_cores(device: torch.device) -> bool:
    """Compute capability >= 8.9 (Ada, Hopper): fp8 tensor cores and conversions."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    found = _FP8_CORES.get(index)
    if found is None:
        found = _FP8_CORES[index] = torch.cuda.get_device_capability(index) >= (8, 9)
    return found


_FP8_CORES: dict[int, bool] = {}


@triton.jit
def _quant_rows_kernel(
    x_ptr, q_ptr, s_ptr, zp_ptr, K, stride_xm, stride_qm,
    QMAX: tl.constexpr, FLOOR: tl.constexpr, INT8: tl.constexpr, STATIC: tl.constexpr,
    HAS_ZP: tl.constexpr, HW_FP8: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # one row per program; the scale is the row's (written to s_ptr[row]) or STATIC (read)
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_K)
    mask = offs < K
    x = tl.load(x_ptr + row * stride_xm + offs, mask=mask, other=0.0).to(tl.float32)
    if STATIC:
        scale = tl.load(s_ptr)
    else:
        scale = tl.math.div_rn(tl.maximum(tl.max(tl.abs(x), axis=0), FLOOR), QMAX)
        tl.store(s_ptr + row, scale)
    v = tl.math.div_rn(x, scale)
    if INT8:
        v = (v + 12582912.0) - 12582912.0  # 1.5 * 2^23: rounds |v| < 2^22 to nearest even
        if HAS_ZP:
            v += tl.load(zp_ptr).to(tl.float32)
        q = tl.minimum(tl.maximum(v, -128.0), 127.0).to(tl.int8)
    elif HW_FP8:  # sm89+: the hardware conversion (round to nearest even), q_ptr is e4m3
        q = tl.minimum(tl.maximum(v, -448.0), 448.0).to(tl.float8e4nv)
    else:
        q = fp32_to_fp8_bits(v, _E4M3)  # clamps to +-448, q_ptr is uint8
    tl.store(q_ptr + row * stride_qm + offs, q, mask=mask)


def _quant_rows(
    x: torch.Tensor,
    int8: bool,
    static_scale: torch.Tensor | None = None,
    zero_point: torch.Tensor | None = None,
    num_warps: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    assert x.dim() == 2 and x.stride(1) == 1, f"x must be [M, K] with unit inner stride, got {list(x.shape)}"
    m, k = x.shape
    xq = torch.empty(m, k, dtype=torch.int8 if int8 else torch.float8_e4m3fn, device=x.device)
    if static_scale is None:
        scale = torch.empty(m, 1, dtype=torch.float32, device=x.device)
    else:
        scale = static_scale.float().reshape(1)
    if m == 0:
        return xq, scale
    block = next_power_of_2(k)
    hw_fp8 = not int8 and x.is_cuda and has_fp8_tensor_cores(x.device)
    _quant_rows_kernel[(m,)](
        x, xq if int8 or hw_fp8 else xq.view(torch.uint8), scale, zero_point if zero_point is not None else scale,
        k, x.stride(0), xq.stride(0),
        QMAX=INT8_MAX if int8 else FP8_MAX, FLOOR=SCALE_FLOOR, INT8=int8, STATIC=static_scale is not None,
        HAS_ZP=zero_point is not None, HW_FP8=hw_fp8, BLOCK_K=block, num_warps=num_warps or max(1, min(16, block // 512)),
    )
    return xq, scale


def quantize_fp8_per_token(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``x [M, K]`` -> ``(xq float8_e4m3fn [M, K], scale float32 [M, 1])``,
    ``scale = max(absmax_row, 1e-12) / 448``."""
    return _quant_rows(x, int8=False)


def quantize_int8_per_token(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``x [M, K]`` -> ``(xq int8 [M, K], scale float32 [M, 1])``,
    ``scale = max(absmax_row, 1e-12) / 127``, round half to even, saturating."""
    return _quant_rows(x, int8=True)


def quantize_fp8_per_tensor(x: torch.Tensor, scale: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Static ``scale`` (1,) when given (one pass in Triton), else dynamic
    ``max(amax, 1e-12) / 448`` (torch ops) -> ``(xq [M, K], scale float32 (1,))``."""
    if scale is None:
        return quantize_fp8_per_tensor_ref(x, None)
    return _quant_rows(x, int8=False, static_scale=scale)


def quantize_int8_static(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None) -> torch.Tensor:
    """Static per-tensor int8, one pass: ``clamp(round(x / scale) + zero_point, -128, 127)``."""
    return _quant_rows(x, int8=True, static_scale=scale, zero_point=zero_point)[0]
