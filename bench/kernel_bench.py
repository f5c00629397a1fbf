"""Quantized GEMM kernels against torch fp16 matmul and the memory-bandwidth bound, one run.

    python bench/kernel_bench.py                      # CUDA: 7B/13B/32B layer shapes, M = 1, 16, 64, 256
    python bench/kernel_bench.py --shapes 4096x4096 --ms 1,16 --out /tmp/bench

First the two ceilings of this GPU are measured: memory bandwidth (a large device-to-device
copy, bytes read + written) and bf16 compute (an 8192^3 matmul). Then, for each layer shape
(K x N: y[M, N] = x[M, K] W) and M, every method is timed twice on random data:

- eager: ``triton.testing.do_bench`` (median after warm-up; it flushes L2 between calls),
  which includes each call's Python side (argument checks, the autotuner's key): 20-70 us
  that hide any kernel shorter than that;
- graph: ``triton.testing.do_bench_cudagraph`` (median), the calls captured in one CUDA
  graph as the engine's decode steps are, so what is left is the kernel. Replayed calls
  would find a small layer's weights still in L2, which the engine's layers (each its own
  weights, together far larger than L2) never do: the graph cycles through enough copies
  of the inputs to span twice the L2 cache.

The table shows both times, then from the graph time: the ratio to torch fp16 matmul on the
same shape, achieved bandwidth (bytes that must move: weights + scales + x + y), the share
of the bandwidth bound (bound time / time), and TFLOP/s.

Methods: fp16 (torch), int4 (g128, AWQ/GPTQ runtime layout), int8 weight-only (g128),
LUT 4-bit (SqueezeLLM), FP8 W8A8 (per-channel weights, per-token activations) and INT8
W8A8 (per-channel weights, per-token activations).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from deploy_kernels.host_ints import cdiv  # noqa: E402
from deploy_kernels.int_gemm_ref import pack_along_k  # noqa: E402

SHAPES = ("4096x4096", "4096x11008", "11008x4096", "5120x13824", "5120x27648")
GROUP = 128


@dataclass
class Case:
    name: str
    run: Callable[[], torch.Tensor]
    nbytes: int  # what must move between memory and the chip


def copies_beyond_cache(nbytes: int, l2_bytes: int) -> int:
    """How many copies of a case's inputs span twice the L2 cache (at least one)."""
    return max(1, cdiv(2 * l2_bytes, max(nbytes, 1)))


def cycling(copies: list[Case]) -> Case:
    """One case whose every call runs the next copy in turn (the same method and shape)."""
    runs, turn = [c.run for c in copies], [0]

    def run() -> torch.Tensor:
        turn[0] = (turn[0] + 1) % len(runs)
        return runs[turn[0]]()

    return Case(copies[0].name, run, copies[0].nbytes)


def l2_cache_bytes(device: torch.device) -> int:
    props = torch.cuda.get_device_properties(device)
    return int(getattr(props, "L2_cache_size", 50 * 2**20))  # 50 MiB: an H100's


def ceilings(device: torch.device) -> tuple[float, float]:
    """(bytes/s of a large device-to-device copy counting read + write, bf16 FLOP/s)."""
    from triton.testing import do_bench

    src = torch.randn(1 << 28, device=device, dtype=torch.float16)  # 512 MiB
    dst = torch.empty_like(src)
    ms = do_bench(lambda: dst.copy_(src), warmup=25, rep=200)
    bandwidth = 2 * src.numel() * src.element_size() / (ms * 1e-3)
    a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    ms = do_bench(lambda: a @ b, warmup=25, rep=200)
    return bandwidth, 2 * 8192**3 / (ms * 1e-3)


def cases(m: int, k: int, n: int, device: torch.device) -> list[Case]:
    """Every method on one shape, with its inputs made once."""
    from deploy_kernels.fp8_gemm import fp8_linear
    from deploy_kernels.int8_gemm import int8_linear
    from deploy_kernels.int_gemm import int_gemm
    from deploy_kernels.lut_gemm import lut_gemm

    half = torch.float16
    x = torch.randn(m, k, device=device, dtype=half)
    io = (m * k + m * n) * 2
    w = torch.randn(n, k, device=device, dtype=half) / k**0.5
    groups = -(-k // GROUP)
    out: list[Case] = [Case("fp16 torch", lambda: x @ w.t(), n * k * 2 + io)]
    for bits in (4, 8):
        q = torch.randint(0, 2**bits, (k, n), device=device, dtype=torch.int32)
        qweight = pack_along_k(q, bits)
        scales = (torch.rand(groups, n, device=device, dtype=half) + 0.5) / 100
        zeros = torch.randint(0, 2**bits, (groups, n), device=device).to(half)
        nbytes = qweight.numel() * 4 + 2 * scales.numel() * 2 + io
        out.append(Case(
            f"int{bits} g{GROUP}",
            lambda qw=qweight, s=scales, z=zeros, b=bits: int_gemm(x, qw, s, z, b, GROUP),
            nbytes,
        ))
    qweight = pack_along_k(torch.randint(0, 16, (k, n), device=device, dtype=torch.int32), 4)
    lut = torch.randn(n, 16, device=device, dtype=half) / 100
    out.append(Case("lut4", lambda: lut_gemm(x, qweight, lut), qweight.numel() * 4 + lut.numel() * 2 + io))
    w8 = (torch.randn(n, k, device=device) * 100).clamp(-448, 448).to(torch.float8_e4m3fn)
    ws = torch.rand(n, 1, device=device) / 100 + 1e-3
    out.append(Case("fp8 w8a8", lambda: fp8_linear(x, w8, ws), n * k + n * 4 + io))
    i8 = torch.randint(-127, 128, (n, k), device=device, dtype=torch.int8)
    out.append(Case("int8 w8a8", lambda: int8_linear(x, i8, ws), n * k + n * 4 + io))
    return out


def cases_beyond_cache(m: int, k: int, n: int, device: torch.device, l2_bytes: int) -> list[Case]:
    """Every method on one shape, each cycling through enough copies of its inputs that no
    call finds them in L2 (see the module's docstring)."""
    first = cases(m, k, n, device)
    copies = [first] + [cases(m, k, n, device)
                        for _ in range(copies_beyond_cache(min(c.nbytes for c in first), l2_bytes) - 1)]
    return [cycling(list(same)) for same in zip(*copies, strict=True)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default=",".join(SHAPES), help="KxN,KxN,...")
    parser.add_argument("--ms", default="1,16,64,256")
    parser.add_argument("--out", help="folder for kernels.md (the table)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench/kernel_bench.py times GPU kernels: it needs a CUDA GPU")
    from triton.testing import do_bench, do_bench_cudagraph

    device = torch.device("cuda")
    torch.manual_seed(0)
    bandwidth, flops = ceilings(device)
    lines = [
        f"GPU: {torch.cuda.get_device_name(device)}, torch {torch.__version__}",
        f"ceilings: copy bandwidth {bandwidth / 1e12:.2f} TB/s (read + write), "
        f"bf16 matmul {flops / 1e12:.0f} TFLOP/s (8192^3)",
        "",
        "| K x N | M | method | eager us | graph us | vs fp16 | GB/s | % of bandwidth bound "
        "| TFLOP/s |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    print("\n".join(lines), flush=True)
    l2 = l2_cache_bytes(device)
    for shape in args.shapes.split(","):
        k, n = (int(v) for v in shape.split("x"))
        for m in (int(v) for v in args.ms.split(",")):
            fp16_us = None
            for case in cases_beyond_cache(m, k, n, device, l2):
                try:
                    eager_us = do_bench(case.run, warmup=25, rep=100) * 1e3
                    us = do_bench_cudagraph(case.run, rep=50, return_mode="median") * 1e3
                    if not torch.isfinite(case.run()).all():
                        raise RuntimeError("non-finite output")
                except Exception as exc:  # one broken kernel must not hide the others' figures
                    line = (f"| {k}x{n} | {m} | {case.name} | failed: {type(exc).__name__}: "
                            f"{str(exc)[:80]} | | | | | |")
                else:
                    fp16_us = us if fp16_us is None else fp16_us
                    bound_us = case.nbytes / bandwidth * 1e6
                    line = (
                        f"| {k}x{n} | {m} | {case.name} | {eager_us:.1f} | {us:.1f} "
                        f"| {fp16_us / us:.2f}x | {case.nbytes / us / 1e3:.0f} "
                        f"| {100 * bound_us / us:.0f}% | {2 * m * k * n / us / 1e6:.1f} |"
                    )
                print(line, flush=True)
                lines.append(line)
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "kernels.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
