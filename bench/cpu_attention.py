"""One-token decode attention on the CPU: bfloat16 against float32 on the same values.

    python bench/cpu_attention.py [--repeats 200] [--threads 2]

The CPU decode path (engine/layers/attention.py ``_decode_attention``) reads a bf16/fp16 KV
cache into float32 and attends there. This is why: torch's CPU ``scaled_dot_product_attention``
in bfloat16 is several times slower than in float32, conversions included, and its result is
no closer to a float64 reference. Shapes: SmolLM2-135M's heads (9 query, 3 KV, head size 64),
B sequences of L keys each. Peer: torch's bf16 SDPA on the same inputs, in the same run.
"""

from __future__ import annotations

import argparse
import statistics
import time
from functools import partial

import torch
import torch.nn.functional as F

HEADS, KV_HEADS, HEAD_DIM = 9, 3, 64
CASES = [(1, 100), (1, 400), (16, 100), (16, 400)]
SCALE = HEAD_DIM**-0.5


def bf16_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return F.scaled_dot_product_attention(q, k, v, scale=SCALE, enable_gqa=True)


def f32_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """As ``_decode_attention``: read into float32, attend, cast back."""
    return F.scaled_dot_product_attention(
        q.float(), k.float(), v.float(), scale=SCALE, enable_gqa=True).to(q.dtype)


def timed_us(fn, repeats: int) -> float:
    for _ in range(10):
        fn()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - start) * 1e6)
    return statistics.median(samples)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=200)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} threads, CPU {torch.backends.cpu.get_cpu_capability()}; "
          f"microseconds per call, median of {args.repeats}; error: max abs against float64")
    print(f"{'B':>3} {'L':>4} {'bf16 us':>9} {'f32 us':>8} {'speed-up':>9} {'bf16 err':>9} {'f32 err':>9}")
    gen = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        for b, n in CASES:
            q = torch.randn(b, HEADS, 1, HEAD_DIM, generator=gen).bfloat16()
            k = torch.randn(b, KV_HEADS, n, HEAD_DIM, generator=gen).bfloat16()
            v = torch.randn(b, KV_HEADS, n, HEAD_DIM, generator=gen).bfloat16()
            bf16, f32 = partial(bf16_attention, q, k, v), partial(f32_attention, q, k, v)
            ref = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), scale=SCALE,
                                                 enable_gqa=True)
            errors = [float((f().double() - ref).abs().max()) for f in (bf16, f32)]
            t_bf16, t_f32 = timed_us(bf16, args.repeats), timed_us(f32, args.repeats)
            print(f"{b:>3} {n:>4} {t_bf16:>9.1f} {t_f32:>8.1f} {t_bf16 / t_f32:>8.1f}x "
                  f"{errors[0]:>9.1e} {errors[1]:>9.1e}")


if __name__ == "__main__":
    main()
