"""Triton paged-attention kernels in the Triton interpreter (CPU), against the torch reference.

Run by ``tests/test_paged_attention.py`` in a child process with ``TRITON_INTERPRET=1`` (the
interpreter is chosen when a kernel module is imported, so it cannot share a process with
compiled kernels); the file name keeps the normal collection away from it. Small shapes: the
interpreter runs every program in numpy.
"""

from __future__ import annotations

import os
import sys

assert os.environ.get("TRITON_INTERPRET") == "1" and "triton" not in sys.modules, (
    "run through tests/test_paged_attention.py (needs TRITON_INTERPRET=1 before triton loads)"
)

import pytest  # noqa: E402
import torch  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from deploy_kernels.fp8 import fp8_bits_to_fp16, fp8_kind, fp32_to_fp8_bits, read_factor  # noqa: E402
from tests.paged_attention_cases import (  # noqa: E402
    FP8,
    Case,
    check_decode,
    check_varlen,
    check_write_kv,
)

MIXED = [  # any mix of query lengths: prefills, chunks over cached context, decodes
    Case((5, 1, 40), (5, 30, 70)),
    Case((1, 17, 3), (33, 17, 50), num_heads=8, num_kv_heads=2, head_dim=128),
    Case((7, 20), (40, 20), num_heads=4, num_kv_heads=1, window=8),
    Case((7, 1, 20), (40, 9, 33), num_heads=8, num_kv_heads=2, cache="fp8_e4m3"),
    Case((3, 1), (50, 9), num_heads=4, num_kv_heads=2, window=5, cache="fp8_e5m2"),
    # 16-bit activations: fp16 only, the interpreter's tl.dot garbles bf16 (the GPU tests have it)
    Case((9, 2), (9, 30), num_heads=4, num_kv_heads=1, head_dim=32, dtype=torch.float16),
    Case((9, 1), (20, 30), num_heads=4, num_kv_heads=2, cache="fp8_e4m3", dtype=torch.float16),
]
DECODES = [
    Case((1, 1, 1), (5, 30, 70)),
    Case((1, 1), (130, 17), num_heads=8, num_kv_heads=2, head_dim=128, window=40),
    Case((1, 1, 1), (40, 9, 33), num_heads=8, num_kv_heads=2, cache="fp8_e4m3"),
    Case((1, 1), (50, 9), num_heads=4, num_kv_heads=1, cache="fp8_e5m2", window=20),
]


@pytest.mark.parametrize("case", MIXED, ids=str)
def test_varlen_kernel(case: Case) -> None:
    check_varlen(case, "cpu", block_m=16, block_n=16)


@pytest.mark.parametrize("case", DECODES, ids=str)
def test_varlen_kernel_on_decodes(case: Case) -> None:
    check_varlen(case, "cpu", block_m=16, block_n=32)


@pytest.mark.parametrize("num_splits", [1, 3, None])
@pytest.mark.parametrize("case", DECODES, ids=str)
def test_decode_kernel(case: Case, num_splits: int | None) -> None:
    check_decode(case, "cpu", num_splits=num_splits, block_n=16)


def test_default_tiles() -> None:
    check_varlen(MIXED[1], "cpu")
    check_decode(DECODES[1], "cpu")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("cache", ["auto", *FP8])
def test_write_kv_kernel(cache: str, dtype: torch.dtype) -> None:
    check_write_kv(cache, dtype, "cpu")


@triton.jit
def _roundtrip_kernel(x_ptr, bits_ptr, back_ptr, n, FP8_KIND: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    ok = offs < n
    bits = fp32_to_fp8_bits(tl.load(x_ptr + offs, mask=ok, other=0.0), FP8_KIND)
    tl.store(bits_ptr + offs, bits, mask=ok)
    tl.store(back_ptr + offs, fp8_bits_to_fp16(bits, FP8_KIND).to(tl.float32), mask=ok)


@pytest.mark.parametrize("name", sorted(FP8))
def test_fp8_bit_conversions_match_torch(name: str) -> None:
    """Every finite fp8 value, the midpoints between neighbours (ties to even), values past
    the range (clamped) and values just inside a binade edge (rounding carries)."""
    dtype = FP8[name]
    values = torch.arange(256, dtype=torch.uint8).view(dtype).float()
    values = values[values.isfinite()].unique()  # sorted, -max .. max
    x = torch.cat([
        values, (values[1:] + values[:-1]) / 2, torch.tensor([1e6, -1e6, 31.9, -0.0]),
        values * (1 - 2**-12), values * (1 + 2**-12),
    ])
    bits = torch.empty(x.shape, dtype=torch.uint8)
    back = torch.empty(x.shape)
    block = triton.next_power_of_2(x.numel())
    _roundtrip_kernel[(1,)](x, bits, back, x.numel(), FP8_KIND=fp8_kind(dtype), BLOCK=block)
    fmax = torch.finfo(dtype).max
    want = x.clamp(-fmax, fmax).to(dtype)
    assert torch.equal(bits, want.view(torch.uint8))
    assert torch.equal(back * read_factor(dtype), want.float())
