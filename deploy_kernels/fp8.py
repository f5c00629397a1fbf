"""FP8 <-> float conversions for Triton kernels, on the raw bits (``uint8``).

The kernels take fp8 caches as ``uint8`` views and convert by hand instead of using Triton's
fp8 types, for two reasons:

- Triton's ``float8e4nv`` (e4m3) needs an sm_89+ GPU; bit twiddling runs on any GPU Triton
  supports (Ampere and Jetson Orin included).
- The Triton interpreter (CPU, ``TRITON_INTERPRET=1``) rounds fp32 -> fp8 wrongly when the
  rounding carries into the exponent (e.g. 31.9 -> 16 instead of 32), so a kernel that uses
  its own rounding is the same code on the GPU and in the CPU tests.

Encoding: round the fp32 value to the fp8 grid (nearest even, done with one fp32 addition),
then the rounded value is exact in fp16 and its fp16 bits shift into the fp8 byte. Decoding is
the reverse, exact: e5m2 is the top byte of an fp16; e4m3 becomes an fp16 of value / 256, so
readers multiply by :data:`E4M3_READ_FACTOR` (folded into their scales).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

NONE, E4M3, E5M2 = 0, 1, 2  # values of the ``FP8`` constexpr
E4M3_READ_FACTOR = 256.0


def fp8_kind(dtype: torch.dtype) -> int:
    """The ``FP8`` constexpr for a cache dtype."""
    return {torch.float8_e4m3fn: E4M3, torch.float8_e5m2: E5M2}.get(dtype, NONE)


def read_factor(dtype: torch.dtype) -> float:
    """What :func:`fp8_bits_to_fp16` leaves out of the value (multiply it back in)."""
    return E4M3_READ_FACTOR if dtype == torch.float8_e4m3fn else 1.0


def as_kernel_arg(cache: torch.Tensor) -> torch.Tensor:
    """fp8 caches go to kernels as their ``uint8`` bits; others unchanged."""
    return cache.view(torch.uint8) if fp8_kind(cache.dtype) else cache


@triton.jit
def fp8_bits_to_fp16(bits, FP8: tl.constexpr):
    """``uint8`` fp8 bits -> fp16 (exact). e4m3 comes out divided by 256."""
    b = bits.to(tl.int32)
    # e4m3: s eeee mmm -> s 0eeee mmm0000000 (exponent bias 7 -> 15); e5m2: the fp16 high byte
    h = (((b & 0x80) << 8) | ((b & 0x7F) << 7)) if FP8 == 1 else (b << 8)
    return h.to(tl.uint16).to(tl.float16, bitcast=True)


@triton.jit
def fp32_to_fp8_bits(x, FP8: tl.constexpr):
    """fp32 -> fp8 bits (``uint8``), clamped to the finite range, rounded to nearest even."""
    if FP8 == 1:
        FMAX: tl.constexpr = 448.0
        EMIN: tl.constexpr = -6  # smallest normal exponent
        MANT: tl.constexpr = 3
    else:
        FMAX: tl.constexpr = 57344.0
        EMIN: tl.constexpr = -14
        MANT: tl.constexpr = 2
    x = tl.minimum(tl.maximum(x, -FMAX), FMAX)
    sign = (x.to(tl.int32, bitcast=True) >> 24) & 0x80
    mag = tl.abs(x)
    # c = 2^(e + 23 - MANT) for mag's exponent e (at least EMIN): mag + c has exactly the
    # fp8 spacing at mag as its fp32 ulp, so (mag + c) - c is mag rounded to the fp8 grid.
    e = tl.maximum(mag.to(tl.int32, bitcast=True) >> 23, EMIN + 127)
    c = ((e + 23 - MANT) << 23).to(tl.float32, bitcast=True)
    rounded = (mag + c) - c
    if FP8 == 1:  # value / 256 is exact in fp16; its bits 7..14 are the e4m3 exponent+mantissa
        h = (rounded * (1.0 / 256.0)).to(tl.float16).to(tl.int16, bitcast=True).to(tl.int32)
        b = (h >> 7) & 0x7F
    else:
        h = rounded.to(tl.float16).to(tl.int16, bitcast=True).to(tl.int32)
        b = (h >> 8) & 0x7F
    return (b | sign).to(tl.uint8)
