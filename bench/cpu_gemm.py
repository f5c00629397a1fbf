"""Micro-benchmark of the CPU weight-only paths (engine.quantization.cpu_kernels / cpu_bind).

For SmolLM2-135M's linear shapes (hidden 576, intermediate 1536) and, with ``--big``, a 7B
MLP shape (4096 x 11008), at M = 1 and 16 rows: microseconds per call (median of
``--repeats``) of

- ``fp32``: a plain float32 ``F.linear`` (the unquantized model's matmul), ``bf16`` the same
  in bfloat16;
- per format, ``old``: the per-call reference (dequantize the whole weight, then matmul,
  as the CPU path did before), and ``ours``: the layer as now bound at load, in bfloat16
  (``--dtype float32`` shows the float32 binding: dequantized once, exact).

    python bench/cpu_gemm.py [--big] [--repeats 30] [--threads N] [--dtype bfloat16]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from deploy_kernels.fp8_gemm_ref import fp8_weight_only_ref  # noqa: E402
from deploy_kernels.int_gemm_ref import int_gemm_ref, pack_along_k  # noqa: E402
from engine.layers.linear import Linear  # noqa: E402
from engine.quantization.awq import AWQConfig  # noqa: E402
from engine.quantization.base import TensorSet  # noqa: E402
from engine.quantization.compressed_tensors import CTScheme  # noqa: E402
from engine.quantization.fp8 import FP8LinearMethod, quantize_fp8  # noqa: E402
from engine.quantization.gptq import GPTQConfig  # noqa: E402
from engine.quantization.packing import pack_awq, pack_gptq_cols, pack_gptq_rows  # noqa: E402

SMOL = [(576, 576), (576, 1536), (1536, 576)]  # (K, N): o_proj, gate/up_proj, down_proj
BIG = [(4096, 11008), (11008, 4096)]


def median_us(repeats: int, fn: Callable[..., object], *args: object) -> float:
    for _ in range(3):
        fn(*args)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn(*args)
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e6


def _layer(method, tensors: dict[str, torch.Tensor], k: int, n: int, dtype: torch.dtype) -> Linear:
    with torch.device("meta"):
        layer = Linear(k, n, quant_method=method)
    layer.quant_method.load(layer, TensorSet("bench", tensors), torch.device("cpu"), dtype)
    return layer


def formats(k: int, n: int, dtype: torch.dtype) -> dict[str, tuple[Callable, Callable]]:
    """name -> (old per-call forward, our bound layer's forward), both ``x -> y``."""
    gen = torch.Generator().manual_seed(0)
    group = 128 if k % 128 == 0 else 64
    q4 = torch.randint(0, 16, (k, n), generator=gen, dtype=torch.int32)
    z4 = torch.randint(0, 16, (k // group, n), generator=gen, dtype=torch.int32)
    s = (torch.rand(k // group, n, generator=gen) * 0.02).half()
    awq = AWQConfig.from_checkpoint({"quant_method": "awq", "bits": 4, "group_size": group, "version": "gemm"},
                                    "bench", {})
    awq_layer = _layer(awq.linear_method("x"), {"qweight": pack_awq(q4), "qzeros": pack_awq(z4), "scales": s},
                       k, n, dtype)
    old_q4, old_s, old_z = pack_along_k(q4, 4), s.float(), z4.float()

    q8 = torch.randint(0, 256, (k, n), generator=gen, dtype=torch.int32)
    s8 = (torch.rand(1, n, generator=gen) * 0.001).half()
    gptq8 = GPTQConfig.from_raw({"bits": 8, "group_size": -1, "desc_act": False, "sym": True}, "bench")
    gptq8_layer = _layer(gptq8.linear_method("x"), {
        "qweight": pack_gptq_rows(q8, 8), "qzeros": pack_gptq_cols(torch.full((1, n), 127), 8), "scales": s8,
    }, k, n, dtype)
    old_q8, old_z8 = pack_along_k(q8, 8), torch.full((1, n), 128.0)

    w8, ws = quantize_fp8(torch.randn(n, k, generator=gen) * 0.05, per_channel=True)
    fp8_layer = _layer(FP8LinearMethod(CTScheme("channel", None, False, True), "compressed-tensors"),
                       {"weight": w8, "weight_scale": ws}, k, n, dtype)
    return {
        f"awq int4 g{group}": (lambda x: int_gemm_ref(x, old_q4, old_s, old_z, 4, group), awq_layer),
        "gptq int8": (lambda x: int_gemm_ref(x, old_q8, s8.float(), old_z8, 8, k), gptq8_layer),
        "fp8 (weight-only)": (lambda x: fp8_weight_only_ref(x, w8, ws), fp8_layer),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--big", action="store_true", help="add the 7B shapes 4096 x 11008")
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16",
                        help="activation dtype of our bound layers")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU {torch.backends.cpu.get_cpu_capability()}, "
          f"our layers in {args.dtype}; microseconds per call, median of {args.repeats}")
    print(f"{'K x N':>12} {'M':>3} {'format':>18} {'fp32':>9} {'bf16':>9} {'old':>10} {'ours':>9} "
          f"{'vs fp32':>8} {'vs old':>8}")
    with torch.inference_mode():
        for k, n in SMOL + (BIG if args.big else []):
            w32 = torch.randn(n, k)
            w16 = w32.bfloat16()
            bound = formats(k, n, dtype)
            for m in (1, 16):
                x = torch.randn(m, k)
                xb, x16 = x.to(dtype), x.bfloat16()
                fp32 = median_us(args.repeats, F.linear, x, w32)
                bf16 = median_us(args.repeats, F.linear, x16, w16)
                for name, (old, ours) in bound.items():
                    t_old = median_us(max(3, args.repeats // 5), old, x)
                    t_ours = median_us(args.repeats, ours, xb)
                    print(f"{k:>5} x {n:<5} {m:>3} {name:>18} {fp32:>9.1f} {bf16:>9.1f} {t_old:>10.1f} "
                          f"{t_ours:>9.1f} {fp32 / t_ours:>7.2f}x {t_old / t_ours:>7.1f}x")

if __name__ == "__main__":
    main()
