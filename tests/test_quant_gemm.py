"""Group-quantized integer GEMM and LUT GEMM: the Triton kernels against their torch references.

The interpreter checks (CPU) live in ``tests/quant_gemm_interp.py`` and run in a child process
with ``TRITON_INTERPRET=1``; the GPU tests run the same checks compiled, in fp16 and bf16, and
the autotuned launch. The helpers below are shared by both files.
"""

from __future__ import annotations

import importlib.util
import os
import tempfile
from pathlib import Path

import pytest
import torch

from deploy_kernels.int_gemm_ref import int_gemm_ref, pack_along_k
from deploy_kernels.lut_gemm_ref import lut_gemm_ref

torch.set_num_threads(1)
HAS_TRITON = importlib.util.find_spec("triton") is not None
gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def tolerance(dtype: torch.dtype) -> float:
    return 1e-5 if dtype == torch.float32 else 1e-3  # FORMATS.md


def rel_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    assert out.shape == ref.shape and out.dtype == ref.dtype
    assert torch.isfinite(out).all(), "NaN or inf in the kernel output"
    return float((out.float() - ref.float()).norm() / ref.float().norm())


def int_inputs(m: int, k: int, n: int, bits: int, group: int, dtype: torch.dtype, bias: bool,
               device: str, seed: int) -> tuple:
    """Fresh random ``(x, qweight, scales, zeros, bias)``: q and zeros over the full range."""
    g = torch.Generator().manual_seed(seed)
    groups = -(-k // group)
    q = torch.randint(0, 2**bits, (k, n), generator=g)
    scales = (torch.rand(groups, n, generator=g) + 0.5) / 100
    zeros = torch.randint(0, 2**bits, (groups, n), generator=g).float()
    x = torch.randn(m, k, generator=g)
    b = torch.randn(n, generator=g) if bias else None
    cast = [t.to(device, dtype) if t is not None else None for t in (x, scales, zeros, b)]
    return cast[0], pack_along_k(q, bits).to(device), cast[1], cast[2], cast[3]


def check_int(m: int, k: int, n: int, bits: int, group: int, dtype: torch.dtype = torch.float32,
              bias: bool = False, device: str = "cpu", seed: int = 0, **launch) -> float:
    from deploy_kernels.int_gemm import int_gemm

    x, qw, s, z, b = int_inputs(m, k, n, bits, group, dtype, bias, device, seed)
    out = int_gemm(x, qw, s, z, bits, group, b, **launch)
    err = rel_error(out, int_gemm_ref(x, qw, s, z, bits, group, b))
    assert err < tolerance(dtype), (m, k, n, bits, group, dtype, launch, err)
    return err


def check_lut(m: int, k: int, n: int, dtype: torch.dtype = torch.float32, bias: bool = False,
              device: str = "cpu", seed: int = 0, **launch) -> float:
    from deploy_kernels.lut_gemm import lut_gemm

    g = torch.Generator().manual_seed(seed)
    qw = pack_along_k(torch.randint(0, 16, (k, n), generator=g), 4).to(device)
    lut = torch.randn(n, 16, generator=g).to(device, dtype)
    x = torch.randn(m, k, generator=g).to(device, dtype)
    b = torch.randn(n, generator=g).to(device, dtype) if bias else None
    out = lut_gemm(x, qw, lut, b, **launch)
    err = rel_error(out, lut_gemm_ref(x, qw, lut, b))
    assert err < tolerance(dtype), (m, k, n, dtype, launch, err)
    return err


# -- Triton in the interpreter (CPU) ----------------------------------------------------------


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
def test_triton_kernels_in_interpreter(run_in_triton_interpreter) -> None:
    run_in_triton_interpreter("quant_gemm_interp.py")


# -- bad input: rejected before any launch ----------------------------------------------------


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
@pytest.mark.parametrize("change, message", [
    ({"qweight_rows": 7}, "qweight has 7 rows, expected ceil"),
    ({"scales_rows": 3}, "scales must be"),
    ({"zeros_dtype": torch.float16}, "zeros must be"),
    ({"bits": 3}, "bits must be one of"),
    ({"group_size": 12}, "multiple of 8"),
    ({"bias_len": 5}, "bias must be"),
    ({"x_3d": True}, "x must be a 2-D"),
])
def test_int_gemm_rejects_bad_input(change: dict, message: str) -> None:
    from deploy_kernels.int_gemm import int_gemm

    x, qw, s, z, _ = int_inputs(2, 64, 24, 4, 32, torch.float32, False, "cpu", seed=1)
    qw = qw[: change.get("qweight_rows", qw.shape[0])]
    s = s.repeat(2, 1) if "scales_rows" in change else s
    z = z.to(change.get("zeros_dtype", z.dtype))
    b = torch.randn(change["bias_len"]) if "bias_len" in change else None
    x = x[None] if "x_3d" in change else x
    with pytest.raises(ValueError, match=message):
        int_gemm(x, qw, s, z, change.get("bits", 4), change.get("group_size", 32), b)


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
def test_lut_gemm_rejects_bad_input() -> None:
    from deploy_kernels.lut_gemm import lut_gemm

    x, qw = torch.randn(2, 64), torch.zeros(8, 24, dtype=torch.int32)
    with pytest.raises(ValueError, match="lut must be"):
        lut_gemm(x, qw, torch.randn(24, 8))
    with pytest.raises(ValueError, match="qweight has 4 rows"):
        lut_gemm(x, qw[:4], torch.randn(24, 16))
    with pytest.raises(ValueError, match="variant must be"):
        lut_gemm(x, qw, torch.randn(24, 16), variant="fast")
    with pytest.raises(ValueError, match="decode variant takes at most 16 rows"):
        lut_gemm(torch.randn(17, 64), qw, torch.randn(24, 16), variant="decode")


# -- Triton compiled, on a GPU: bigger shapes, 16-bit activations, autotuning -----------------

GPU_INT = [  # (m, k, n, bits, group)
    (1, 4096, 4096, 4, 128), (7, 4096, 1000, 4, 128), (16, 1000, 333, 4, 40),
    (1, 5120, 777, 8, 64), (3, 2048, 1537, 2, 32), (64, 4096, 1024, 4, 128),
    (300, 1000, 333, 4, 1000), (129, 2000, 513, 8, 32), (2, 333, 257, 2, 333),
]
GPU_LUT = [(1, 4096, 4096), (9, 1000, 333), (200, 2048, 1537), (1, 333, 77)]
HALF = [torch.float16, torch.bfloat16]


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("shape", GPU_INT, ids=str)
def test_int_gemm_gpu(shape: tuple, dtype: torch.dtype) -> None:
    check_int(*shape, dtype=dtype, bias=shape[0] % 2 == 1, device="cuda")


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("dtype", [*HALF, torch.float32])
@pytest.mark.parametrize("variant", ["decode", "prefill"])
def test_int_gemm_variants_gpu(variant: str, dtype: torch.dtype) -> None:
    for m in (1, 5, 16):
        check_int(m, 2000, 999, 4, 32, dtype, bias=True, device="cuda", variant=variant)
        check_int(m, 4096, 512, 4, 128, dtype, device="cuda", variant=variant, seed=m)


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("shape", GPU_LUT, ids=str)
def test_lut_gemm_gpu(shape: tuple, dtype: torch.dtype) -> None:
    check_lut(*shape, dtype=dtype, bias=True, device="cuda")
    check_lut(*shape, dtype=dtype, device="cuda", variant="prefill", seed=1)


@pytest.mark.gpu
@gpu
def test_split_counters_survive_repeats_gpu() -> None:
    """The split-K tickets reset themselves: many launches in a row stay right."""
    for seed in range(20):
        check_int(1, 4096, 1024, 4, 128, torch.float16, device="cuda", seed=seed)


# -- compiled for real CUDA targets, without a GPU (what only the compiler sees) --------------

def compiled_without_a_gpu(test):
    """Marks a test that compiles kernels for real CUDA targets (Triton's NVIDIA backend and
    its bundled ptxas run on the CPU)."""
    marks = (
        pytest.mark.slow,
        pytest.mark.filterwarnings("ignore:TRITON_DEFAULT_FP_FUSION"),
        pytest.mark.skipif(not HAS_TRITON or os.environ.get("TRITON_INTERPRET") == "1",
                           reason="needs triton in compiled mode"),
    )
    for mark in marks:
        test = mark(test)
    return test


COMPILE_CASES = [  # kernel, activation, constexprs (besides HAS_BIAS, WAVES), capability
    ("int", "fp16", {"BITS": 4, "GROUP_WORDS": 16, "BLOCK_M": 1, "BLOCK_KW": 16}, 90),
    ("int", "bf16", {"BITS": 4, "GROUP_WORDS": 4, "BLOCK_M": 16, "BLOCK_KW": 16}, 80),
    ("int", "bf16", {"BITS": 8, "GROUP_WORDS": 32, "BLOCK_M": 64, "BLOCK_KW": 16}, 90),
    ("lut", "fp16", {"BLOCK_M": 1, "BLOCK_KW": 16}, 90),
    ("lut", "bf16", {"BLOCK_M": 64, "BLOCK_KW": 16}, 80),
]


@compiled_without_a_gpu
@pytest.mark.parametrize("case", COMPILE_CASES, ids=str)
def test_kernels_compile(case: tuple) -> None:
    name, act, constexprs, capability = case
    constexprs = {**constexprs, "HAS_BIAS": 1, "WAVES": 4, "BLOCK_N": 128}
    compile_for(_packed_kernel(name), constexprs, act, capability, num_warps=4)


def _packed_kernel(name: str):
    from deploy_kernels.int_gemm import _int_gemm_kernel
    from deploy_kernels.lut_gemm import _lut_gemm_kernel

    return _int_gemm_kernel if name == "int" else _lut_gemm_kernel


def compile_for(fn, constexprs: dict, act: str, capability: int, num_warps: int,
                num_stages: int = 3):
    """``fn`` compiled for ``sm_<capability>`` (no GPU needed): pointers to ``act`` elements
    but the packed words, ticket counters and workspace; other arguments i32."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    special = {"qw_ptr": "*i32", "cnt_ptr": "*i32", "ws_ptr": "*fp32"}
    signature = {
        a: "constexpr" if a in constexprs
        else special.get(a, f"*{act}") if a.endswith("_ptr") else "i32"
        for a in fn.arg_names
    }
    return triton.compile(ASTSource(fn, signature, constexprs),
                          target=GPUTarget("cuda", capability, 32),
                          options={"num_warps": num_warps, "num_stages": num_stages})


# Registers decide how many programs an SM holds, and a latency-bound GEMV needs many: the
# decode table must keep configs that fit in 64 registers a thread without spilling, for each
# kernel and both decode tile heights (what ptxas reports for sm_90; no GPU needed).
OCCUPANCY_CASES = [  # kernel, constexprs, BLOCK_M
    ("int", {"BITS": 4, "GROUP_WORDS": 16}, 1),
    ("int", {"BITS": 4, "GROUP_WORDS": 16}, 16),
    ("int", {"BITS": 8, "GROUP_WORDS": 32}, 1),
    ("lut", {}, 1),
    ("lut", {}, 16),
]


def _registers_and_spills(fn, constexprs: dict, act: str, num_warps: int,
                          num_stages: int = 3) -> tuple[int, int]:
    """What ptxas reports for ``fn`` on sm_90: registers a thread, bytes of spill stores."""
    import re
    import subprocess

    from triton.backends.nvidia.compiler import get_ptxas

    kernel = compile_for(fn, constexprs, act, 90, num_warps, num_stages)
    with tempfile.TemporaryDirectory() as tmp:
        ptx = Path(tmp) / "kernel.ptx"
        ptx.write_text(kernel.asm["ptx"])
        report = subprocess.run([get_ptxas(90).path, "-arch=sm_90a", "-v", "-o", os.devnull,
                                 str(ptx)], capture_output=True, text=True, check=True).stderr
    registers = int(re.search(r"Used (\d+) registers", report).group(1))
    spills = int(re.search(r"(\d+) bytes spill stores", report).group(1))
    return registers, spills


@compiled_without_a_gpu
@pytest.mark.parametrize("case", OCCUPANCY_CASES, ids=str)
def test_decode_table_keeps_configs_that_fit_in_64_registers(case: tuple) -> None:
    from deploy_kernels.int_gemm_launch import DECODE_CONFIGS, prune_configs

    name, constexprs, block_m = case
    fn = _packed_kernel(name)
    configs = prune_configs(DECODE_CONFIGS, {"M": block_m, "BLOCK_M": block_m, **constexprs})
    fitting = []
    for config in configs:
        meta = {**constexprs, **config.kwargs, "BLOCK_M": block_m, "HAS_BIAS": 0}
        registers, spills = _registers_and_spills(fn, meta, "fp16", config.num_warps)
        if registers <= 64 and spills == 0:
            fitting.append(config.kwargs)
    assert len(fitting) >= 2, fitting


PREFILL_SPILL_CASES = [  # kernel, constexprs, activation
    ("int", {"BITS": 4, "GROUP_WORDS": 16}, "fp16"),
    ("int", {"BITS": 4, "GROUP_WORDS": 16}, "bf16"),
    ("int", {"BITS": 8, "GROUP_WORDS": 32}, "fp16"),
    ("lut", {}, "fp16"),
]


@compiled_without_a_gpu
@pytest.mark.parametrize("case", PREFILL_SPILL_CASES, ids=str)
def test_no_prefill_tile_spills(case: tuple) -> None:
    """A prefill tile whose accumulators do not fit spills them to local memory at every K
    step (64 x 128 with 4 warps: 1 KB a thread; 128 x 256: 6 KB)."""
    from deploy_kernels.int_gemm_launch import PREFILL_CONFIGS

    name, constexprs, act = case
    fn = _packed_kernel(name)
    spilling = {}
    for config in PREFILL_CONFIGS:
        meta = {**constexprs, **config.kwargs, "HAS_BIAS": 0}
        _, spills = _registers_and_spills(fn, meta, act, config.num_warps, config.num_stages)
        if spills:
            spilling[str(config.kwargs)] = spills
    assert spilling == {}
