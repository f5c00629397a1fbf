"""CPU weight-only kernels for group-wise int4 and per-channel int8 weights, bound once at load.

torch ships two CPU kernels for weight-only matmuls (the ones torchao's int4/int8
weight-only layouts call):

- ``aten._weight_int4pack_mm_for_cpu(x [M, K], w, G, scales_and_zeros [K/G, N, 2])`` on a
  weight repacked by ``aten._convert_weight_to_int4pack_for_cpu(q [N, K] int32 0..15, 1)``
  (uint8 ``[N, K/2]``, a blocked nibble layout of its own). Its dequantization is
  ``W[k, n] = (q[k, n] - 8) * scale[g, n] + zero[g, n]`` with a *float* zero. It takes
  G in {32, 64, 128, 256}, K % G == 0 and N % 16 == 0.
- ``aten._weight_int8pack_mm(x [M, K], w int8 [N, K], scales [N])``: ``y = x (w * s)^T``,
  one scale per output channel.

Both run fast only with bfloat16 activations (AVX512-BF16 paths); with float32 or float16
they fall back to scalar loops 10-500x slower than a float32 matmul (measured with torch
2.13 on this project's CPU; ``bench/cpu_gemm.py``). So they compute in bfloat16 here: inputs
are cast to bf16, outputs back to the caller's dtype. What that costs in accuracy: the
kernel rounds scales and zeros to bf16 and accumulates in float32 into a bf16 output, a
relative error of a few 1e-3 against the float32 reference (``tests/test_cpu_quant_kernels.py``).

Our formats are affine per group, ``W[k, n] = q[k, n] * scale[g, n] + offset[g, n]``
(integer zero points: ``offset = -z * scale``; GGUF: ``offset = min``), which maps exactly
onto the int4 kernel's convention with ``zero = offset + 8 * scale`` (computed in float64,
rounded once).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from deploy_kernels.log_once import log_once

log = logging.getLogger(__name__)

KERNEL_DTYPE = torch.bfloat16  # the only activation dtype with a fast kernel
INT4_GROUPS = (256, 128, 64, 32)  # what _weight_int4pack_mm_for_cpu takes
INT4_N_MULTIPLE = 16  # _convert_weight_to_int4pack_for_cpu packs 16 output channels together
INT4_MID = 8  # the kernel subtracts 8 from every 4-bit value
INT4_PACK_ROWS = 64  # the packed layout interleaves blocks of this many output channels


def log_cpu_once(kind: str, message: str, *args: object) -> None:
    """The start-up line saying which CPU path a layer kind takes (once per process)."""
    log_once(log, f"cpu-kernel-{kind}", message, *args)


def dense_cpu_weight(weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``weight [K, N]`` (``y = x W``) as a layer without a CPU kernel keeps it, dequantized
    once at load: a view of ``[N, K]`` contiguous, the layout a plain layer's matmul reads."""
    return weight.t().contiguous().to(dtype).t()


# ----------------------------------------------------------------------------- int4


def int4_kernel_group(k: int, n: int, group: int) -> int | str:
    """The group size the int4 kernel runs a ``[K, N]`` weight with ``group`` (K for one
    group) at, or the reason it cannot. A group that is a multiple of a supported one is run
    at that one, its scales repeated (one group of 576 runs as nine groups of 64)."""
    if n % INT4_N_MULTIPLE:
        return f"out_features {n} is not a multiple of {INT4_N_MULTIPLE}"
    if k % group:
        return f"in_features {k} is not a multiple of the group size {group}"
    for size in INT4_GROUPS:
        if group % size == 0:
            return size
    return f"group size {group} is not a multiple of 32 (the kernel takes {', '.join(map(str, INT4_GROUPS))})"


@dataclass(frozen=True)
class Int4Weights:
    """A weight packed for ``_weight_int4pack_mm_for_cpu``."""

    qweight: torch.Tensor  # uint8 [N, K / 2], the kernel's own layout
    scales_and_zeros: torch.Tensor  # bf16 [K / group, N, 2]
    group: int


def pack_int4_cpu(
    q: torch.Tensor, scales: torch.Tensor, offsets: torch.Tensor, group: int, bits: int = 4
) -> Int4Weights:
    """``W[k, n] = q[k, n] * scales[k // group, n] + offsets[k // group, n]`` -> the int4
    kernel's buffers.

    ``q [K, N]`` integers in ``0 .. 2^bits - 1`` (any integer dtype; bits 2, 3 or 4),
    ``scales`` and ``offsets`` ``[K / group, N]`` float. Narrower values are stored shifted
    to centre on the kernel's 8 (``q + 8 - 2^(bits-1)``, the offset adjusted to match), so
    the bf16 zero term stays small and rounds no coarser than for 4-bit. Raises
    ``ValueError`` for a shape the kernel does not take (see :func:`int4_kernel_group`)."""
    if bits not in (2, 3, 4):
        raise ValueError(f"bits must be 2, 3 or 4, got {bits}")
    if q.dim() != 2 or q.dtype.is_floating_point:
        raise ValueError(f"q must be a 2-D integer tensor [K, N], got {q.dtype} {list(q.shape)}")
    k, n = q.shape
    kernel_group = int4_kernel_group(k, n, group)
    if isinstance(kernel_group, str):
        raise ValueError(f"int4 CPU kernel: {kernel_group}")
    groups = k // group
    for name, t in (("scales", scales), ("offsets", offsets)):
        if tuple(t.shape) != (groups, n) or not t.dtype.is_floating_point:
            raise ValueError(f"{name} must be float [{groups}, {n}], got {t.dtype} {list(t.shape)}")
    if q.numel() and (int(q.min()) < 0 or int(q.max()) >= 2**bits):
        raise ValueError(f"{bits}-bit values must lie in 0..{2**bits - 1}, got {int(q.min())}..{int(q.max())}")
    shift = INT4_MID - 2 ** (bits - 1)  # W = (q + shift) * s + (offset - shift * s)
    repeat = group // kernel_group
    s = scales.double().repeat_interleave(repeat, dim=0)
    zero = offsets.double().repeat_interleave(repeat, dim=0) + (INT4_MID - shift) * s
    stored = (q.t().to(torch.int32) + shift).contiguous()
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(stored, 1)
    scales_and_zeros = torch.stack([s, zero], dim=-1).to(KERNEL_DTYPE).contiguous()
    return Int4Weights(packed, scales_and_zeros, kernel_group)


def int4_mm_cpu(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales_and_zeros: torch.Tensor,
    group: int,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """``x [M, K] @ W [K, N] (+ bias)`` on the packed weight, returned in ``x.dtype``."""
    if x.dtype == KERNEL_DTYPE and x.is_contiguous():  # the serving case: no casts to dispatch
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(x, qweight, group, scales_and_zeros)
    else:
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(
            x.to(KERNEL_DTYPE).contiguous(), qweight, group, scales_and_zeros
        ).to(x.dtype)
    return y if bias is None else y + bias.to(x.dtype)


@dataclass(frozen=True)
class Int8PairWeights:
    """A group-wise 8-bit weight as two int4 kernel weights, its high and low nibbles."""

    high: Int4Weights
    low: Int4Weights


def pack_int8_pair_cpu(
    q: torch.Tensor, scales: torch.Tensor, offsets: torch.Tensor, group: int
) -> Int8PairWeights:
    """``W = q * scales + offsets`` per group with ``q [K, N]`` in ``0..255`` -> two int4
    kernel weights whose products add up to ``x W``.

    torch's only CPU int8 kernel takes one scale per output channel, so a weight with a
    scale per group (GGUF Q8_0 and Q5_K, group-wise 8-bit GPTQ) would otherwise be
    dequantized to bf16 (2 bytes a value); as nibbles it reads 1 byte a value plus scales.
    With ``q = 16 h + l``: ``W = (16 s) h + (offset + 8 s)`` plus ``s l - 8 s``, each centred
    on the kernel's 8, so neither half carries a large constant that the other cancels.
    Raises ``ValueError`` for a shape the int4 kernel does not take."""
    if q.dtype.is_floating_point or q.dim() != 2:
        raise ValueError(f"q must be a 2-D integer tensor [K, N], got {q.dtype} {list(q.shape)}")
    if q.numel() and (int(q.min()) < 0 or int(q.max()) > 255):
        raise ValueError(f"8-bit values must lie in 0..255, got {int(q.min())}..{int(q.max())}")
    q = q.to(torch.int32)
    s = scales.double()
    high = pack_int4_cpu(q >> 4, 16 * s, offsets.double() + 8 * s, group)
    low = pack_int4_cpu(q & 15, s, -8 * s, group)
    return Int8PairWeights(high, low)


def int8_pair_mm_cpu(x: torch.Tensor, pair: Int8PairWeights, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x [M, K] @ W [K, N] (+ bias)`` for a weight packed by :func:`pack_int8_pair_cpu`."""
    y = int4_mm_cpu(x, pair.high.qweight, pair.high.scales_and_zeros, pair.high.group)
    y = y + int4_mm_cpu(x, pair.low.qweight, pair.low.scales_and_zeros, pair.low.group)
    return y if bias is None else y + bias.to(x.dtype)


def bind_int8_pair_cpu(
    q: torch.Tensor, scales: torch.Tensor, offsets: torch.Tensor, group: int,
    bias: torch.Tensor | None = None,
):
    """As :func:`bind_int4_cpu`, for group-wise 8-bit weights (:func:`pack_int8_pair_cpu`)."""
    packed = pack_int8_pair_cpu(q, scales, offsets, group)

    def kernel(x: torch.Tensor) -> torch.Tensor:
        return int8_pair_mm_cpu(x, packed, bias)

    kernel.pair = packed  # type: ignore[attr-defined]
    return kernel


def unpack_int4_cpu(qweight: torch.Tensor, scales_and_zeros: torch.Tensor, group: int) -> torch.Tensor:
    """``W [K, N]`` float32 of the packed buffers, ``(q - 8) * scale + zero`` with the bf16
    scales and zeros the kernel uses (tests and debugging: it runs the kernel on an identity).

    The kernel is its own oracle for its layout: with scale 1 and zero 8 it returns q exactly
    (small integers are exact in bf16)."""
    n, k = qweight.shape[0], qweight.shape[1] * 2
    unit = torch.tensor([1.0, float(INT4_MID)], dtype=KERNEL_DTYPE).expand(k // group, n, 2).contiguous()
    rows = []
    for start in range(0, k, 1024):  # bounded memory for the identity
        eye = torch.eye(k, dtype=KERNEL_DTYPE)[start : start + 1024]
        rows.append(torch.ops.aten._weight_int4pack_mm_for_cpu(eye, qweight, group, unit))
    q = torch.cat(rows).float()  # [K, N]
    sz = scales_and_zeros.float().repeat_interleave(group, dim=0)
    return (q - INT4_MID) * sz[..., 0] + sz[..., 1]


def bind_int4_cpu(
    q: torch.Tensor,
    scales: torch.Tensor,
    offsets: torch.Tensor,
    group: int,
    bias: torch.Tensor | None = None,
    bits: int = 4,
):
    """A callable ``x [M, K] -> y [M, N]`` (bias included) for ``W = q * scales + offsets``
    per group (see :func:`pack_int4_cpu`), for layers that keep their own kernel (GGUF)."""
    packed = pack_int4_cpu(q, scales, offsets, group, bits)

    def kernel(x: torch.Tensor) -> torch.Tensor:
        return int4_mm_cpu(x, packed.qweight, packed.scales_and_zeros, packed.group, bias)

    kernel.weights = packed  # type: ignore[attr-defined]
    return kernel


# ----------------------------------------------------------------------------- int8


@dataclass(frozen=True)
class Int8Weights:
    """A per-output-channel int8 weight for ``_weight_int8pack_mm``:
    ``W[k, n] = qweight[n, k] * scales[n] + offsets[n]``."""

    qweight: torch.Tensor  # int8 [N, K]
    scales: torch.Tensor  # bf16 [N]
    offsets: torch.Tensor | None  # float32 [N]; None when all zero (symmetric)


def pack_int8_cpu(q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor) -> Int8Weights:
    """Unsigned 8-bit ``q [K, N]`` (0..255) with ``W = (q - zeros[n]) * scales[n]`` (one
    group) -> signed ``q - 128`` and ``offsets = (128 - zeros) * scales``: the kernel takes
    the first term, a rank-one correction ``sum_k x[m, k] * offsets[n]`` adds the second."""
    if q.dim() != 2 or q.dtype.is_floating_point:
        raise ValueError(f"q must be a 2-D integer tensor [K, N], got {q.dtype} {list(q.shape)}")
    k, n = q.shape
    for name, t in (("scales", scales), ("zeros", zeros)):
        if t.numel() != n:
            raise ValueError(f"{name} must hold one value per output channel ({n}), got {list(t.shape)}")
    if q.numel() and (int(q.min()) < 0 or int(q.max()) > 255):
        raise ValueError(f"8-bit values must lie in 0..255, got {int(q.min())}..{int(q.max())}")
    signed = (q.to(torch.int32) - 128).to(torch.int8).t().contiguous()
    s = scales.double().reshape(n)
    offsets = (128 - zeros.double().reshape(n)) * s
    return Int8Weights(signed, s.to(KERNEL_DTYPE), None if bool((offsets == 0).all()) else offsets.float())


def int8_mm_cpu(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    offsets: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """``x [M, K] @ W [K, N] (+ bias)``, ``W[k, n] = qweight[n, k] * scales[n] + offsets[n]``,
    returned in ``x.dtype``."""
    y = torch.ops.aten._weight_int8pack_mm(x.to(KERNEL_DTYPE).contiguous(), qweight, scales).to(x.dtype)
    if offsets is not None:
        y = y + (x.float().sum(dim=-1, keepdim=True) * offsets).to(x.dtype)
    return y if bias is None else y + bias.to(x.dtype)


def int8_products_cpu(xi: torch.Tensor, weight: torch.Tensor, ones: torch.Tensor) -> torch.Tensor:
    """``xi [M, K]`` small integers (quantized activations, exact in bf16) times an int8
    ``weight [N, K]``: the integer sums in float32, rounded once to bf16 by the kernel."""
    return torch.ops.aten._weight_int8pack_mm(xi.to(KERNEL_DTYPE).contiguous(), weight, ones).float()
