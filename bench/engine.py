"""Engine throughput and time to first token against transformers, same checkpoint, same run.

    python bench/engine.py                           # tiny random qwen2 checkpoint, CPU
    python bench/engine.py --shape small             # a larger random qwen2 (hidden 512, 4 layers)
    python bench/engine.py --model ./Qwen2.5-7B --device cuda --dtype bfloat16
    python bench/engine.py --shape llama2-7b --layers 4 --device cuda --dtype float16 \
        --quantization fp8 --skip_naive        # real layer shapes, random weights, fewer layers

For each concurrency (``--concurrency``, default 1,8,32,64) every side gets the
same greedy requests (``ignore_eos``: each generates exactly ``--max_tokens``):

- ours: all requests submitted at once (continuous batching, paged KV cache);
- transformers naive: one ``generate`` call per request, one after the other, as a
  simple server does;
- transformers padded: one left-padded batched ``generate`` call (its best case).

Tokens/s is generated tokens over wall time; TTFT is the mean over requests of the
time from the common start to the request's first token (naive: requests wait for
the ones before them; padded: one prefill for all). A multi-turn table then shows
the second turn's TTFT of several sessions with prefix caching on and off.

On CUDA a decode table follows: our decode tokens/s (tokens after the first, over the
time after the last request's first token) against the memory-bandwidth bound (each
decode step reads every weight once: batch x copy bandwidth / weight bytes; the KV
cache reads are left out, so the bound is optimistic). With ``--quantization`` our
engine serves the quantized model (fp8/int8/bitsandbytes quantize the random fp16
checkpoint while loading; awq/gptq use a random checkpoint of that format) while
transformers runs the fp16 checkpoint.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from agent.demo.tiny_checkpoint import cached_tiny_checkpoint  # noqa: E402
from engine import create_engine  # noqa: E402
from engine.api import EngineConfig, SamplingParams  # noqa: E402
from engine.kv_setup import model_bytes  # noqa: E402

WORDS = [
    "the",
    "patient",
    "reports",
    "a",
    "mild",
    "headache",
    "after",
    "the",
    "long",
    "drive",
    "through",
    "the",
    "maze",
    "of",
    "city",
    "streets",
]
SHAPES = {
    "tiny": {},
    "small": dict(
        hidden_size=512,
        intermediate_size=1408,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=2,
    ),
    # real layer shapes (random weights, the tiny tokenizer's 512-token vocabulary);
    # --layers sets how many layers
    "llama2-7b": dict(hidden_size=4096, intermediate_size=11008, num_attention_heads=32,
                      num_key_value_heads=32, max_position_embeddings=4096),
    "llama2-13b": dict(hidden_size=5120, intermediate_size=13824, num_attention_heads=40,
                       num_key_value_heads=40, max_position_embeddings=4096),
    "qwen2.5-32b": dict(hidden_size=5120, intermediate_size=27648, num_attention_heads=40,
                        num_key_value_heads=8, max_position_embeddings=4096),
}


def make_prompts(tokenizer, n: int, min_len: int, max_len: int, salt: int = 0) -> list[list[int]]:
    """Prompts of varied length (``min_len``..``max_len`` tokens), deterministic."""
    prompts = []
    for i in range(n):
        target = min_len + ((i + salt) * 7919) % (max_len - min_len + 1)
        ids: list[int] = []
        j = i + salt
        while len(ids) < target:
            ids += tokenizer.encode(" " + WORDS[j % len(WORDS)])
            j += 3
        prompts.append(ids[:target])
    return prompts


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


class HF:
    """transformers ``generate`` on the same checkpoint, greedy, exactly ``max_tokens`` new tokens."""

    def __init__(self, path: Path, dtype: torch.dtype, device: torch.device, pad_id: int) -> None:
        from transformers import AutoModelForCausalLM

        self.model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype).to(device).eval()
        self.device, self.pad_id = device, pad_id

    @torch.inference_mode()
    def generate(self, prompts: list[list[int]], max_tokens: int) -> int:
        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, p in enumerate(prompts):  # left padding, as generate expects
            ids[i, width - len(p) :] = torch.tensor(p)
            mask[i, width - len(p) :] = 1
        out = self.model.generate(
            ids.to(self.device),
            attention_mask=mask.to(self.device),
            do_sample=False,
            max_new_tokens=max_tokens,
            min_new_tokens=max_tokens,
            pad_token_id=self.pad_id,
        )
        sync(self.device)
        return (out.shape[1] - width) * len(prompts)

    def padded(self, prompts: list[list[int]], max_tokens: int) -> tuple[float, float]:
        """(seconds for the batch, TTFT: one prefill + first token for all)."""
        t0 = time.perf_counter()
        self.generate(prompts, 1)
        ttft = time.perf_counter() - t0
        t0 = time.perf_counter()
        self.generate(prompts, max_tokens)
        return time.perf_counter() - t0, ttft

    def naive(self, prompts: list[list[int]], max_tokens: int) -> tuple[float, float]:
        """(seconds for all, mean TTFT): one request after the other."""
        first_token = []
        for p in prompts:  # each request's own first-token time, measured alone
            t0 = time.perf_counter()
            self.generate([p], 1)
            first_token.append(time.perf_counter() - t0)
        starts, t0 = [], time.perf_counter()
        for p in prompts:
            starts.append(time.perf_counter() - t0)
            self.generate([p], max_tokens)
        total = time.perf_counter() - t0
        return total, statistics.mean(s + f for s, f in zip(starts, first_token, strict=True))


def ours(engine, prompts: list[list[int]], max_tokens: int) -> tuple[float, float, float]:
    """(seconds for all, mean TTFT, decode tokens/s) with every request submitted at once."""
    sampling = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    t0 = time.perf_counter()
    results = engine.generate(prompts, sampling)
    total = time.perf_counter() - t0
    assert all(len(r.token_ids) == max_tokens for r in results), "a request stopped early"
    decode_s = total - max(r.ttft_s for r in results)
    decode = len(results) * (max_tokens - 1) / decode_s if decode_s > 0 else float("nan")
    return total, statistics.mean(r.ttft_s for r in results), decode


def median_run(fn, repeats: int) -> tuple[float, float]:
    fn()  # warm-up; shares no block with the system prompt
    runs = sorted((fn() for _ in range(repeats)), key=lambda r: r[0])
    return runs[len(runs) // 2]


def multi_turn(config: EngineConfig, tokenizer, sessions: int, max_tokens: int) -> list[tuple]:
    """Second-turn TTFT of ``sessions`` sessions, prefix caching on and off."""
    system = make_prompts(tokenizer, 1, 160, 160, salt=99)[0]
    firsts = [system + p for p in make_prompts(tokenizer, sessions, 24, 48, salt=7)]
    rows = []
    for caching in (True, False):
        engine = create_engine(
            EngineConfig(**{**config.__dict__, "enable_prefix_caching": caching})
        )
        sampling = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
        engine.generate(make_prompts(tokenizer, sessions, 24, 48, salt=52), sampling)  # warm-up; shares no block with the system prompt
        turn1 = engine.generate(firsts, sampling)
        seconds = [
            f + r.token_ids + p
            for f, r, p in zip(
                firsts, turn1, make_prompts(tokenizer, sessions, 16, 32, salt=3), strict=True
            )
        ]
        turn2 = engine.generate(seconds, sampling)
        rows.append(
            (
                caching,
                statistics.mean(len(s) for s in seconds),
                statistics.mean(r.cached_prompt_tokens for r in turn2),
                statistics.mean(r.ttft_s for r in turn1) * 1e3,
                statistics.mean(r.ttft_s for r in turn2) * 1e3,
            )
        )
        engine.shutdown()
    return rows


def cell(value: float, spec: str, unit: str = "") -> str:
    """A table cell; a side that was not run (--skip_naive) shows a dash, not nan."""
    return "-" if math.isnan(value) else f"{value:{spec}}{unit}"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", help="checkpoint folder (default: a random qwen2 of --shape)")
    parser.add_argument("--shape", default="tiny", choices=list(SHAPES))
    parser.add_argument("--layers", type=int, default=None, help="layers of a --shape model")
    parser.add_argument("--quantization", default=None,
                        help="fp8, int8, bitsandbytes (quantized while loading) or awq, gptq "
                        "(a random checkpoint of that format)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--concurrency", default="1,8,32,64")
    parser.add_argument("--max_tokens", type=int, default=64)
    parser.add_argument("--prompt_len", default="16,96", help="min,max prompt tokens")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--threads", type=int, default=0, help="torch CPU threads (0: torch's default)"
    )
    parser.add_argument(
        "--skip_naive", action="store_true", help="leave out transformers one-at-a-time"
    )
    parser.add_argument("--skip_multi_turn", action="store_true", help="leave out the multi-turn table")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    shape = dict(SHAPES[args.shape])
    if args.layers:
        shape["num_hidden_layers"] = args.layers
    arch = "llama" if args.shape.startswith("llama") else "qwen2"
    path = Path(args.model) if args.model else cached_tiny_checkpoint(arch, **shape)
    engine_path = path
    quant = args.quantization
    if quant in ("awq", "gptq"):
        from bench.random_quantized import random_quantized_checkpoint

        engine_path, quant = random_quantized_checkpoint(path, quant), None
    levels = [int(c) for c in args.concurrency.split(",")]
    config = EngineConfig(
        model_path=str(engine_path), device=args.device, dtype=args.dtype, max_num_seqs=max(levels),
        quantization=quant,
    )
    engine = create_engine(config)
    weight_bytes = model_bytes(engine.runner.model)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    pad = engine.tokenizer.hf.pad_token_id
    hf = HF(path, dtype, device, engine.tokenizer.hf.eos_token_id if pad is None else pad)
    lo, hi = (int(x) for x in args.prompt_len.split(","))

    rows = []
    for n in levels:
        prompts = make_prompts(engine.tokenizer, n, lo, hi)
        tokens = n * args.max_tokens
        our = median_run(lambda p=prompts: ours(engine, p, args.max_tokens), args.repeats)
        pad_run = median_run(lambda p=prompts: hf.padded(p, args.max_tokens), args.repeats)
        naive = (
            (float("nan"), float("nan")) if args.skip_naive else hf.naive(prompts, args.max_tokens)
        )
        rows.append(
            (
                n,
                tokens / our[0],
                tokens / naive[0],
                tokens / pad_run[0],
                our[1] * 1e3,
                naive[1] * 1e3,
                pad_run[1] * 1e3,
                our[2],
            )
        )
    engine.shutdown()

    layers = shape.get("num_hidden_layers", 2 if args.shape == "tiny" else 4)
    print(
        f"\nmodel: {path.name} ({args.shape + f', {layers} layers' if not args.model else 'given'})  "
        f"device: {args.device}  dtype: {args.dtype}  ours: {args.quantization or 'unquantized'}, "
        f"weights {weight_bytes / 2**20:.0f} MiB  torch threads: {torch.get_num_threads()}"
    )
    print(
        f"greedy, {args.max_tokens} new tokens per request, prompts {lo}-{hi} tokens, "
        f"median of {args.repeats}\n"
    )
    print(
        "| concurrent | ours tok/s | HF naive tok/s | HF padded tok/s | vs naive | vs padded "
        "| ours TTFT ms | HF naive TTFT ms | HF padded TTFT ms |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for n, o, nv, pd, t_o, t_nv, t_pd, _ in rows:
        print(
            f"| {n} | {o:.0f} | {cell(nv, '.0f')} | {pd:.0f} | {cell(o / nv, '.2f', 'x')} "
            f"| {o / pd:.2f}x | {t_o:.1f} | {cell(t_nv, '.1f')} | {t_pd:.1f} |"
        )
    if device.type == "cuda":
        from bench.kernel_bench import ceilings

        bandwidth, _ = ceilings(device)
        print(f"\ndecode vs the bandwidth bound (copy bandwidth {bandwidth / 1e12:.2f} TB/s, "
              f"weights {weight_bytes / 2**20:.0f} MiB read per step)\n")
        print("| concurrent | decode tok/s | bound tok/s | % of bound |")
        print("|---:|---:|---:|---:|")
        for n, *_, decode in rows:
            bound = n * bandwidth / weight_bytes
            print(f"| {n} | {decode:.0f} | {bound:.0f} | {100 * decode / bound:.0f}% |")

    if args.skip_multi_turn:
        return
    sessions = min(8, max(levels))
    print(
        f"\nmulti-turn: {sessions} sessions, a shared 160-token system prompt, "
        f"{args.max_tokens} tokens per answer; TTFT of the second turn\n"
    )
    print(
        "| prefix caching | turn-2 prompt tokens | cached tokens | turn-1 TTFT ms | turn-2 TTFT ms |"
    )
    print("|---|---:|---:|---:|---:|")
    for caching, prompt_len, cached, t1, t2 in multi_turn(
        config, engine.tokenizer, sessions, args.max_tokens
    ):
        print(
            f"| {'on' if caching else 'off'} | {prompt_len:.0f} | {cached:.0f} | {t1:.1f} | {t2:.1f} |"
        )


if __name__ == "__main__":
    main()
