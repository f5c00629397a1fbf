"""Integer and LUT GEMM kernels in the Triton interpreter (CPU), against the torch references.

Run by ``tests/test_quant_gemm.py`` in a child process with ``TRITON_INTERPRET=1`` (the
interpreter is chosen when a kernel module is imported); the file name keeps the normal
collection away from it. Small shapes: the interpreter runs every program in numpy. fp32 and
fp16 only: the interpreter truncates bf16 (the GPU tests cover it).
"""

from __future__ import annotations

import os
import sys

assert os.environ.get("TRITON_INTERPRET") == "1" and "triton" not in sys.modules, (
    "run through tests/test_quant_gemm.py (needs TRITON_INTERPRET=1 before triton loads)"
)

import pytest  # noqa: E402
import torch  # noqa: E402

from deploy_kernels.int_gemm_launch import DECODE_CONFIGS, PREFILL_CONFIGS  # noqa: E402
from tests.test_quant_gemm import check_int, check_lut  # noqa: E402

F32, F16 = torch.float32, torch.float16
SPLIT = {"BLOCK_N": 16, "BLOCK_KW": 8, "WAVES": 4, "num_warps": 4}  # several K splits
SPLIT_DOT = {**SPLIT, "BLOCK_KW": 16}

INT_CASES = [  # m, k, n, bits, group, dtype, bias, launch options
    (1, 64, 24, 4, 32, F32, False, {}),
    (3, 96, 40, 4, 32, F32, True, {}),  # decode, 2..16 rows: tl.dot
    (16, 200, 37, 2, 64, F32, True, {}),  # K: not a multiple of G nor of pack; N odd
    (33, 200, 72, 8, 200, F32, False, {}),  # prefill, G = K
    (1, 200, 13, 8, 200, F32, True, {}),
    (1, 100, 24, 4, 100, F32, True, {}),  # G = K, K not a multiple of pack
    (1, 160, 40, 8, 32, F32, False, {}),  # tile over several groups: a scale row per word
    (5, 256, 24, 4, 128, F16, False, {}),  # one group per tile: exact integers in tl.dot
    (33, 256, 40, 4, 32, F16, True, {}),  # prefill, several groups per tile, fp16
    (1, 128, 24, 2, 32, F32, False, {"variant": "prefill"}),
    (2, 128, 24, 4, 64, F32, True, {"variant": "prefill"}),
    (1, 512, 37, 4, 128, F32, True, {"config": SPLIT}),
    (1, 512, 37, 4, 32, F16, False, {"config": SPLIT}),
    (4, 512, 40, 4, 64, F32, True, {"config": SPLIT_DOT}),
    (16, 384, 24, 8, 64, F16, False, {"config": SPLIT_DOT}),
]
LUT_CASES = [  # m, k, n, dtype, bias, launch options
    (1, 64, 24, F32, False, {}),
    (3, 100, 37, F32, True, {}),
    (33, 200, 40, F32, True, {}),
    (2, 128, 24, F16, False, {}),
    (1, 128, 13, F32, True, {"variant": "prefill"}),
    (1, 512, 24, F32, False, {"config": SPLIT}),
    (6, 512, 24, F16, True, {"config": SPLIT_DOT}),
]


# Every tile of the decode table (the autotuner may pick any), N not a multiple of the tile.
DECODE_TABLE = [{**c.kwargs, "num_warps": c.num_warps} for c in DECODE_CONFIGS]


@pytest.mark.parametrize("config", DECODE_TABLE, ids=str)
def test_every_decode_tile(config: dict) -> None:
    check_int(1, 512, 40, 4, 128, F16, True, seed=5, config=config)
    check_lut(1, 256, 40, F16, False, seed=6, config=config)
    if config["BLOCK_KW"] >= 16:  # tl.dot tiles: 2..16 rows
        check_int(4, 512, 40, 4, 128, F16, False, seed=7, config=config)


@pytest.mark.parametrize("config", [{**c.kwargs, "num_warps": c.num_warps} for c in PREFILL_CONFIGS],
                         ids=str)
def test_every_prefill_tile(config: dict) -> None:
    check_int(40, 256, 72, 4, 128, F16, True, seed=8, config=config)
    check_lut(40, 128, 72, F16, False, seed=9, config=config)


@pytest.mark.parametrize("case", INT_CASES, ids=str)
def test_int_gemm_kernel(case: tuple) -> None:
    m, k, n, bits, group, dtype, bias, launch = case
    check_int(m, k, n, bits, group, dtype, bias, seed=len(INT_CASES), **launch)


@pytest.mark.parametrize("case", LUT_CASES, ids=str)
def test_lut_gemm_kernel(case: tuple) -> None:
    m, k, n, dtype, bias, launch = case
    check_lut(m, k, n, dtype, bias, seed=3, **launch)


def test_repeated_split_launches_reset_counters() -> None:
    """The split-K tickets are reset by the last split: launch after launch stays right."""
    for seed in range(3):
        check_int(2, 256, 24, 4, 64, F32, seed=seed, config=SPLIT_DOT)
