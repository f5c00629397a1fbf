"""Paged attention: the torch reference against naive dense attention, the Triton kernels
against the reference (in the Triton interpreter on the CPU, and compiled on a GPU).

The interpreter tests live in ``tests/paged_attention_interp.py`` and run in a child process
with ``TRITON_INTERPRET=1``, so this process (and the rest of the suite) never has triton
switched to its interpreter.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from deploy_kernels.paged_attention_ref import paged_attention_ref, quantize_fp8, write_kv_ref
from tests.paged_attention_cases import (
    Case,
    check_decode,
    check_varlen,
    check_write_kv,
    dense_attention,
    make_inputs,
)

ROOT = Path(__file__).resolve().parent.parent
HAS_TRITON = importlib.util.find_spec("triton") is not None
gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

REFERENCE_CASES = [
    Case((5, 1, 40), (5, 30, 70)),  # a prefill, a decode, a chunk over cached context
    Case((1, 1, 1), (5, 30, 70), num_heads=8, num_kv_heads=2),  # decode-only: batched path
    Case((1, 1), (17, 40), num_heads=8, num_kv_heads=2, window=6),
    Case((7, 20), (40, 20), num_heads=4, num_kv_heads=1, head_dim=128, window=8),
    Case((7, 1, 20), (40, 9, 33), num_heads=8, num_kv_heads=2, cache="fp8_e4m3"),
    Case((3, 1), (50, 9), num_heads=4, num_kv_heads=2, window=5, cache="fp8_e5m2"),
    # several prefill chunks padded into one call (fresh and over cached context), with decodes
    Case((6, 5, 1, 8), (30, 5, 12, 20), num_heads=8, num_kv_heads=2, window=7),
    Case((4, 4, 4, 1), (4, 20, 12, 3)),
]


@pytest.mark.parametrize("case", REFERENCE_CASES, ids=str)
def test_reference_matches_dense_attention(case: Case) -> None:
    inp = make_inputs(case, "cpu", seed=3)
    got = paged_attention_ref(
        inp.q, inp.k_cache, inp.v_cache, inp.block_tables, inp.query_start_loc, inp.seq_lens,
        inp.scale, case.window, inp.k_scale, inp.v_scale,
    )
    torch.testing.assert_close(got.double(), dense_attention(case, inp), atol=2e-6, rtol=0)


def test_write_kv_ref_quantizes_and_skips_negative_slots() -> None:
    k = torch.tensor([[[1.0, -500.0, 1e-9, 0.3]]]).expand(3, 1, 4).contiguous()  # [T, Hkv, D]
    k_cache = torch.zeros(2, 2, 1, 4, dtype=torch.float8_e4m3fn)
    v_cache = torch.zeros_like(k_cache)
    write_kv_ref(k, 2 * k, k_cache, v_cache, torch.tensor([3, -1, 0]), k_scale=0.5, v_scale=2.0)
    stored = k_cache.view(4, 4).float()
    assert stored[3].tolist() == [2.0, -448.0, 0.0, 0.625]  # x / 0.5, clamped, rounded (0.6)
    assert stored[0].tolist() == stored[3].tolist() and stored[1:3].abs().sum() == 0
    assert torch.equal(v_cache.view(4, 4)[3], quantize_fp8(2 * k[0, 0], 2.0, torch.float8_e4m3fn))


# -- Triton in the interpreter (CPU) ----------------------------------------------------------


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
def test_triton_kernels_in_interpreter() -> None:
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
           str(ROOT / "tests" / "paged_attention_interp.py")]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]


# -- Triton compiled, on a GPU: bigger shapes, 16-bit activations -----------------------------

GPU_MIXED = [
    Case((1, 300, 1, 37, 1), (1500, 300, 2049, 1000, 77), num_heads=32, num_kv_heads=8,
         head_dim=128, dtype=torch.bfloat16),
    Case((64, 1, 513), (64, 4000, 1700), num_heads=16, num_kv_heads=16, head_dim=64,
         dtype=torch.float16),
    Case((200, 1, 5), (900, 3000, 905), num_heads=28, num_kv_heads=4, head_dim=128,
         window=256, dtype=torch.bfloat16),
    Case((129, 1, 16), (1000, 2500, 16), num_heads=32, num_kv_heads=8, head_dim=128,
         cache="fp8_e4m3", dtype=torch.bfloat16),
    Case((33, 1), (700, 1200), num_heads=8, num_kv_heads=2, head_dim=64, cache="fp8_e5m2",
         dtype=torch.float16),
    Case((50, 3), (50, 70), num_heads=4, num_kv_heads=2, head_dim=64),  # fp32: ieee dots
]
GPU_DECODES = [
    Case((1,) * 4, (1, 17, 2048, 5000), num_heads=32, num_kv_heads=8, head_dim=128,
         dtype=torch.bfloat16),
    Case((1,) * 64, tuple(range(100, 6500, 100)), num_heads=28, num_kv_heads=4, head_dim=128,
         dtype=torch.bfloat16),
    Case((1,), (8000,), num_heads=16, num_kv_heads=16, head_dim=64, window=1024,
         dtype=torch.float16),
    Case((1,) * 8, (3000,) * 8, num_heads=32, num_kv_heads=8, head_dim=128, cache="fp8_e4m3",
         dtype=torch.bfloat16),
    Case((1,) * 3, (900, 40, 4000), num_heads=8, num_kv_heads=1, head_dim=128, cache="fp8_e5m2",
         dtype=torch.float16),
]


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("case", GPU_MIXED + GPU_DECODES, ids=str)
def test_varlen_kernel_gpu(case: Case) -> None:
    check_varlen(case, "cuda")


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("num_splits", [1, 7, None])
@pytest.mark.parametrize("case", GPU_DECODES, ids=str)
def test_decode_kernel_gpu(case: Case, num_splits: int | None) -> None:
    check_decode(case, "cuda", num_splits=num_splits)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("cache", ["auto", "fp8_e4m3", "fp8_e5m2"])
def test_write_kv_kernel_gpu(cache: str, dtype: torch.dtype) -> None:
    check_write_kv(cache, dtype, "cuda", tokens=100)
