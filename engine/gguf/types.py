"""GGUF tensor types: which load as plain floats, which map onto our group-wise int formats.

Every block type we read is affine per group, ``w = q * scale + min`` with an unsigned
integer ``q``, once its fields are combined (``GroupAffine``). The combination is exact in
float32: each product below needs at most 24 significant bits, so ``q * scale + min``
equals the ``gguf`` package's own dequantization bit for bit (``tests/test_gguf.py``).

=======  =====  ======  ===============================  =======================================
type     group  q bits  llama.cpp's formula              scale, min (float32)
=======  =====  ======  ===============================  =======================================
Q4_0     32     4       d * (q - 8)                      d, -8 d
Q4_1     32     4       d * q + m                        d, m
Q8_0     32     8       d * x (x signed int8, q=x+128)   d, -128 d
Q4_K     32     4       d sc_s q - dmin m_s  (256/block) d sc_s, -(dmin m_s)
Q5_K     32     5       d sc_s q - dmin m_s  (256/block) d sc_s, -(dmin m_s)
Q6_K     16     6       d sc_s (q - 32)      (256/block) d sc_s, -32 d sc_s
=======  =====  ======  ===============================  =======================================

The block layouts are ggml's (``ggml-common.h``), as ``gguf.quants`` reads them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from engine.api import UnsupportedError

T = GGMLQuantizationType
PLAIN_TYPES: dict[int, torch.dtype] = {T.F32: torch.float32, T.F16: torch.float16, T.BF16: torch.bfloat16}
# type -> (group size, bits of q)
GROUP_TYPES: dict[int, tuple[int, int]] = {
    T.Q4_0: (32, 4), T.Q4_1: (32, 4), T.Q8_0: (32, 8),
    T.Q4_K: (32, 4), T.Q5_K: (32, 5), T.Q6_K: (16, 6),
}
QK_K = 256


class GGUFTypeError(UnsupportedError, ValueError):
    """A GGUF tensor of a type this engine does not read; names the tensor and the type."""


def type_name(ggml_type: int) -> str:
    try:
        return T(ggml_type).name
    except ValueError:
        return f"unknown ggml type {ggml_type}"


def supported_type_names() -> str:
    return ", ".join(type_name(t) for t in (*PLAIN_TYPES, *GROUP_TYPES))


def check_type(ggml_type: int, tensor: str) -> None:
    if ggml_type not in PLAIN_TYPES and ggml_type not in GROUP_TYPES:
        raise GGUFTypeError(
            f"GGUF tensor {tensor!r} has type {type_name(ggml_type)}, which this engine does not "
            f"read; supported: {supported_type_names()}"
        )


@dataclass(frozen=True)
class GroupAffine:
    """One weight ``[N, K]`` as ``W[n, k] = q[n, k] * scales[n, k // group] + mins[n, k // group]``."""

    q: torch.Tensor  # uint8 [N, K], values in [0, 2^bits)
    scales: torch.Tensor  # float32 [N, K / group]
    mins: torch.Tensor  # float32 [N, K / group]
    group: int
    bits: int

    def dequantize(self) -> torch.Tensor:
        """``W [N, K]`` in float32, exactly as ``gguf.quants.dequantize``."""
        n, k = self.q.shape
        q = self.q.float().view(n, k // self.group, self.group)
        return (q * self.scales[..., None] + self.mins[..., None]).view(n, k)


def to_group_affine(raw: np.ndarray, ggml_type: int, shape: tuple[int, int], tensor: str) -> GroupAffine:
    """The blocks ``raw`` (uint8, one row of blocks per output row) of a ``[N, K]`` weight."""
    check_type(ggml_type, tensor)
    if ggml_type not in GROUP_TYPES:
        raise GGUFTypeError(f"GGUF tensor {tensor!r} is {type_name(ggml_type)}: plain, not blocks")
    n, k = shape
    block, nbytes = GGML_QUANT_SIZES[ggml_type]
    if k % block:
        raise GGUFTypeError(
            f"GGUF tensor {tensor!r}: rows of {k} values are not whole {type_name(ggml_type)} "
            f"blocks of {block}"
        )
    blocks = np.ascontiguousarray(raw, dtype=np.uint8).reshape(n * (k // block), nbytes)
    q, scales, mins = _UNPACK[ggml_type](blocks)
    group, bits = GROUP_TYPES[ggml_type]
    return GroupAffine(
        torch.from_numpy(q.reshape(n, k)),
        torch.from_numpy(scales.reshape(n, k // group).astype(np.float32)),
        torch.from_numpy(mins.reshape(n, k // group).astype(np.float32)),
        group,
        bits,
    )


# -- block layouts -----------------------------------------------------------------------------


def _half(blocks: np.ndarray, start: int) -> np.ndarray:
    """The fp16 at byte ``start`` of every block, as float32 ``[blocks, 1]``."""
    return blocks[:, start : start + 2].copy().view(np.float16).astype(np.float32)


def _nibbles(qs: np.ndarray, width: int) -> np.ndarray:
    """Bytes ``[B, c * width]`` -> ``[B, c * 2 * width]``: per chunk of ``width`` bytes, the
    low nibbles first, then the high ones (ggml's order for Q4_0, Q4_1, Q4_K, Q5_K, Q6_K)."""
    b = qs.shape[0]
    chunks = qs.reshape(b, -1, 1, width) >> np.array([0, 4], dtype=np.uint8).reshape(1, 1, 2, 1)
    return (chunks & 0x0F).reshape(b, -1)


def _q4_0(blocks: np.ndarray):
    d = _half(blocks, 0)
    return _nibbles(blocks[:, 2:], 16), d, -8 * d


def _q4_1(blocks: np.ndarray):
    return _nibbles(blocks[:, 4:], 16), _half(blocks, 0), _half(blocks, 2)


def _q8_0(blocks: np.ndarray):
    d = _half(blocks, 0)
    q = (blocks[:, 2:].view(np.int8).astype(np.int16) + 128).astype(np.uint8)
    return q, d, -128 * d


def _k_scale_min(packed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The 8 six-bit sub-block scales and mins of a Q4_K/Q5_K super-block (12 bytes)."""
    b = packed.shape[0]
    d, m, m_d = np.split(packed.reshape(b, 3, 4), 3, axis=1)
    sc = np.concatenate([d & 0x3F, (m_d & 0x0F) | ((d >> 2) & 0x30)], axis=-1)
    mn = np.concatenate([m & 0x3F, (m_d >> 4) | ((m >> 2) & 0x30)], axis=-1)
    return sc.reshape(b, 8).astype(np.float32), mn.reshape(b, 8).astype(np.float32)


def _q4_k(blocks: np.ndarray):
    d, dmin = _half(blocks, 0), _half(blocks, 2)
    sc, mn = _k_scale_min(blocks[:, 4:16])
    return _nibbles(blocks[:, 16:], 32), d * sc, -(dmin * mn)


def _q5_k(blocks: np.ndarray):
    d, dmin = _half(blocks, 0), _half(blocks, 2)
    sc, mn = _k_scale_min(blocks[:, 4:16])
    qh, qs = blocks[:, 16:48], blocks[:, 48:]
    b = blocks.shape[0]
    high = (qh.reshape(b, 1, 32) >> np.arange(8, dtype=np.uint8).reshape(1, 8, 1)) & 1  # [B, 8, 32]
    return _nibbles(qs, 32) | (high.reshape(b, -1) << 4), d * sc, -(dmin * mn)


def _q6_k(blocks: np.ndarray):
    b = blocks.shape[0]
    ql, qh = blocks[:, :128], blocks[:, 128:192]
    sc = blocks[:, 192:208].view(np.int8).astype(np.float32)  # 16 sub-blocks of 16
    d = _half(blocks, 208)
    low = _nibbles(ql, 64)  # [B, 256]: per 128 values, low nibbles of 64 bytes, then high
    high = (qh.reshape(b, 2, 1, 32) >> np.array([0, 2, 4, 6], dtype=np.uint8).reshape(1, 1, 4, 1)) & 3
    scale = d * sc
    return low | (high.reshape(b, -1) << 4), scale, -32 * scale


_UNPACK = {T.Q4_0: _q4_0, T.Q4_1: _q4_1, T.Q8_0: _q8_0, T.Q4_K: _q4_k, T.Q5_K: _q5_k, T.Q6_K: _q6_k}
