"""Integer helpers for the Python side of kernel launches (grids, tiles, K splits).

``triton.cdiv`` and ``triton.next_power_of_2`` work on the host too, but as Triton constexpr
functions each call there costs ~3 us (triton 3.9), and a launch made tens of them: most of
an eager quantized GEMM's Python overhead. These give the same results in nanoseconds.
Inside ``@triton.jit`` code, keep using ``tl.cdiv``.
"""

from __future__ import annotations


def cdiv(a: int, b: int) -> int:
    """``ceil(a / b)`` for integers, as ``triton.cdiv``."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """The smallest power of two >= ``n`` (0 for 0), as ``triton.next_power_of_2``."""
    return 0 if n <= 0 else 1 << (n - 1).bit_length()
