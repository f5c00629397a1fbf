"""Pack and unpack the integer layouts of AWQ, GPTQ and SqueezeLLM checkpoints.

Pairs of plain functions: ``pack_*`` writes what the tools write (the quantization tool
uses them), ``unpack_*`` reads it back as int32 values in ``[0, 2^bits)``.

GPTQ and SqueezeLLM pack a little-endian bit stream along one axis: value ``j`` of the
axis sits at stream bits ``bits * j``, word ``i`` holds stream bits ``32 i .. 32 i + 31``.
For 2, 4 and 8 bits that is "``32 / bits`` values per word, least significant first"; for
3 bits it is AutoGPTQ's 3-word layout (value 10 straddles words 0/1, value 21 words 1/2).
SqueezeLLM's ``quant.py`` (``QuantLinearLUT.pack2``) packs 3 and 4 bits with the very
same code as AutoGPTQ, so its layouts are GPTQ's along K.

AWQ (GEMM) packs 8 nibbles along N in the interleaved order ``AWQ_ORDER``.
"""

from __future__ import annotations

import math

import torch

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # nibble i holds logical column 8c + AWQ_ORDER[i]
AWQ_REVERSE_ORDER = (0, 4, 1, 5, 2, 6, 3, 7)  # logical column 8c + j is nibble AWQ_REVERSE_ORDER[j]
GPTQ_BITS = (2, 3, 4, 8)
SQUEEZELLM_BITS = (3, 4)
_MASK32 = 0xFFFFFFFF

__all__ = [
    "AWQ_ORDER",
    "AWQ_REVERSE_ORDER",
    "GPTQ_BITS",
    "SQUEEZELLM_BITS",
    "pack_awq",
    "pack_gptq_cols",
    "pack_gptq_rows",
    "pack_squeezellm",
    "unpack_awq",
    "unpack_gptq_cols",
    "unpack_gptq_rows",
    "unpack_squeezellm",
]


# ----------------------------------------------------------------------------- AWQ


def pack_awq(q: torch.Tensor) -> torch.Tensor:
    """``q [R, N]`` 4-bit values -> int32 ``[R, N / 8]`` (AWQ ``qweight`` [K, N/8] or
    ``qzeros`` [K/G, N/8])."""
    rows, n = q.shape
    if n % 8:
        raise ValueError(f"AWQ packs 8 columns per int32; {n} columns is not a multiple of 8")
    values = _checked(q, 4, allow_minus_one=False).view(rows, n // 8, 8)
    words = torch.zeros(rows, n // 8, dtype=torch.int64, device=q.device)
    for nibble, column in enumerate(AWQ_ORDER):
        words |= values[:, :, column] << (4 * nibble)
    return _to_int32(words)


def unpack_awq(packed: torch.Tensor) -> torch.Tensor:
    """int32 ``[R, N / 8]`` -> ``q [R, N]`` int32 in ``[0, 16)``."""
    _check_words(packed)
    rows, cols = packed.shape
    words = packed.to(torch.int64) & _MASK32
    shifts = torch.tensor(
        [4 * i for i in AWQ_REVERSE_ORDER], dtype=torch.int64, device=packed.device
    )
    q = (words.unsqueeze(-1) >> shifts) & 0xF  # [R, N/8, 8], logical column order
    return q.reshape(rows, cols * 8).to(torch.int32)


# ----------------------------------------------------------------------------- GPTQ


def pack_gptq_rows(q: torch.Tensor, bits: int) -> torch.Tensor:
    """``q [K, N]`` -> GPTQ ``qweight`` int32 ``[K * bits / 32, N]`` (packed along K)."""
    _check_bits(bits, GPTQ_BITS)
    return _pack_stream(_checked(q, bits, allow_minus_one=False), bits)


def unpack_gptq_rows(qweight: torch.Tensor, bits: int, k: int) -> torch.Tensor:
    """GPTQ ``qweight [K * bits / 32, N]`` -> ``q [K, N]`` int32 in ``[0, 2^bits)``."""
    _check_bits(bits, GPTQ_BITS)
    q = _unpack_stream(qweight, bits)
    if q.shape[0] != k:
        raise ValueError(
            f"qweight with {qweight.shape[0]} rows holds {q.shape[0]} values, not K={k}"
        )
    return q


def pack_gptq_cols(z: torch.Tensor, bits: int) -> torch.Tensor:
    """``z [G, N]`` -> GPTQ ``qzeros`` int32 ``[G, N * bits / 32]`` (packed along N).

    Pass the values to store (``z - 1`` for the v1 format). ``-1`` is accepted and written
    as AutoGPTQ writes it (an all-ones 32-bit pattern OR-ed in, spilling into the higher
    fields of its word): the lossy v1 corner of a real zero point of 0.
    """
    _check_bits(bits, GPTQ_BITS)
    return _pack_stream(_checked(z, bits, allow_minus_one=True).t(), bits).t().contiguous()


def unpack_gptq_cols(qzeros: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """GPTQ ``qzeros [G, N * bits / 32]`` -> stored values ``[G, N]`` int32 in
    ``[0, 2^bits)`` (add 1 for the v1 format)."""
    _check_bits(bits, GPTQ_BITS)
    z = _unpack_stream(qzeros.t(), bits).t().contiguous()
    if z.shape[1] != n:
        raise ValueError(
            f"qzeros with {qzeros.shape[1]} columns holds {z.shape[1]} values, not N={n}"
        )
    return z


# ----------------------------------------------------------------------------- SqueezeLLM


def pack_squeezellm(q: torch.Tensor, bits: int) -> torch.Tensor:
    """LUT indices ``q [K, N]`` -> ``qweight`` int32 ``[K * bits / 32, N]`` (GPTQ's layout)."""
    _check_bits(bits, SQUEEZELLM_BITS)
    return pack_gptq_rows(q, bits)


def unpack_squeezellm(qweight: torch.Tensor, bits: int, k: int) -> torch.Tensor:
    _check_bits(bits, SQUEEZELLM_BITS)
    return unpack_gptq_rows(qweight, bits, k)


# ----------------------------------------------------------------------------- bit stream


def _stream_geometry(bits: int) -> tuple[int, int]:
    """(values, words) of the smallest whole chunk: (32 / bits, 1), or (32, 3) for 3 bits."""
    chunk_bits = math.lcm(32, bits)
    return chunk_bits // bits, chunk_bits // 32


def _pack_stream(values: torch.Tensor, bits: int) -> torch.Tensor:
    """int64 ``[L, M]`` -> int32 ``[L * bits / 32, M]``: value ``j`` at stream bits ``bits * j``."""
    per, words_per = _stream_geometry(bits)
    length, m = values.shape
    if length % per:
        raise ValueError(
            f"{bits}-bit packing needs a multiple of {per} values along the packed axis, got {length}"
        )
    v = (values & _MASK32).view(length // per, per, m)  # -1 -> the uint32 all-ones pattern
    words = torch.zeros(length // per, words_per, m, dtype=torch.int64, device=values.device)
    for j in range(per):
        word, shift = divmod(bits * j, 32)
        words[:, word] |= (v[:, j] << shift) & _MASK32
        if shift + bits > 32:  # straddles into the next word: its high bits only
            words[:, word + 1] |= (v[:, j] >> (32 - shift)) & ((1 << (shift + bits - 32)) - 1)
    return _to_int32(words.view(-1, m))


def _unpack_stream(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """int32 ``[W, M]`` -> int32 ``[W * 32 / bits, M]`` in ``[0, 2^bits)``."""
    _check_words(packed)
    per, words_per = _stream_geometry(bits)
    rows, m = packed.shape
    if rows % words_per:
        raise ValueError(f"{bits}-bit values come in groups of {words_per} words; got {rows} words")
    words = (packed.to(torch.int64) & _MASK32).view(rows // words_per, words_per, m)
    out = torch.empty(rows // words_per, per, m, dtype=torch.int64, device=packed.device)
    for j in range(per):
        word, shift = divmod(bits * j, 32)
        value = words[:, word] >> shift
        if shift + bits > 32:
            value = value | (words[:, word + 1] << (32 - shift))
        out[:, j] = value & ((1 << bits) - 1)
    return out.view(-1, m).to(torch.int32)


# ----------------------------------------------------------------------------- helpers


def _check_bits(bits: int, allowed: tuple[int, ...]) -> None:
    if bits not in allowed:
        raise ValueError(f"bits must be one of {allowed}, got {bits}")


def _checked(q: torch.Tensor, bits: int, allow_minus_one: bool) -> torch.Tensor:
    if q.dim() != 2 or q.dtype.is_floating_point or q.dtype == torch.bool:
        raise ValueError(f"expected a 2-D integer tensor, got {q.dtype} {list(q.shape)}")
    values = q.to(torch.int64)
    if values.numel():
        low, high = int(values.min()), int(values.max())
        floor = -1 if allow_minus_one else 0
        if low < floor or high >= 2**bits:
            raise ValueError(
                f"{bits}-bit values must lie in [{floor}, {2**bits}), got [{low}, {high}]"
            )
    return values


def _check_words(packed: torch.Tensor) -> None:
    if packed.dtype != torch.int32 or packed.dim() != 2:
        raise ValueError(
            f"expected 2-D int32 packed words, got {packed.dtype} {list(packed.shape)}"
        )


def _to_int32(words: torch.Tensor) -> torch.Tensor:
    """int64 words holding 32-bit patterns -> int32 with the same bits."""
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)
