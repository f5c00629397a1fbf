"""Engine throughput against transformers ``generate`` on the same checkpoint and prompts.

    python bench/engine.py                      # tiny random qwen2 checkpoint, CPU
    python bench/engine.py --model ./Qwen2.5-7B --device cuda --dtype bfloat16

For 1 and 16 concurrent requests (``--concurrency``), both sides generate
greedily from the same prompts; the table gives generated tokens per second
and our speed-up. transformers runs the batch as one left-padded ``generate``
call (its best case); our engine gets all requests at once through
``LLMEngine.generate`` (one batched forward per step).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from engine import create_engine  # noqa: E402
from engine.api import EngineConfig, SamplingParams  # noqa: E402
from engine.tiny_checkpoint import cached_tiny_checkpoint  # noqa: E402

WORDS = ["the", "patient", "reports", "a", "mild", "headache", "after", "the", "long", "drive", "through", "the", "maze", "of", "city", "streets"]


def make_prompts(tokenizer, n: int, min_len: int, max_len: int) -> list[list[int]]:
    """Prompts of varied length (``min_len``..``max_len`` tokens), deterministic."""
    prompts = []
    for i in range(n):
        target = min_len + (i * 7919) % (max_len - min_len + 1)
        ids: list[int] = []
        j = i
        while len(ids) < target:
            ids += tokenizer.encode(" " + WORDS[j % len(WORDS)])
            j += 3
        prompts.append(ids[:target])
    return prompts


def bench_ours(engine, prompts, max_tokens: int, repeats: int) -> tuple[float, int]:
    sampling = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    engine.generate(prompts, sampling)  # warm-up
    times, generated = [], 0
    for _ in range(repeats):
        t0 = time.perf_counter()
        results = engine.generate(prompts, sampling)
        times.append(time.perf_counter() - t0)
        generated = sum(len(r.token_ids) for r in results)
    return statistics.median(times), generated


def bench_transformers(model, pad_id: int, prompts, max_tokens: int, repeats: int, device) -> tuple[float, int]:
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):  # left padding, as generate expects
        ids[i, width - len(p):] = torch.tensor(p)
        mask[i, width - len(p):] = 1
    ids, mask = ids.to(device), mask.to(device)
    kwargs = dict(
        attention_mask=mask, do_sample=False, max_new_tokens=max_tokens,
        min_new_tokens=max_tokens, pad_token_id=pad_id,
    )
    with torch.inference_mode():
        model.generate(ids, **kwargs)  # warm-up
        times = []
        for _ in range(repeats):
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            out = model.generate(ids, **kwargs)
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
    return statistics.median(times), (out.shape[1] - width) * len(prompts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="checkpoint folder (default: the tiny random qwen2 checkpoint)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--concurrency", default="1,16")
    parser.add_argument("--max_tokens", type=int, default=64)
    parser.add_argument("--prompt_len", default="16,96", help="min,max prompt tokens")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from transformers import AutoModelForCausalLM

    path = Path(args.model) if args.model else cached_tiny_checkpoint("qwen2")
    engine = create_engine(EngineConfig(model_path=str(path), device=args.device, dtype=args.dtype))
    device = torch.device(args.device)
    hf = AutoModelForCausalLM.from_pretrained(str(path), dtype=getattr(torch, args.dtype)).to(device).eval()
    pad_id = engine.tokenizer.hf.pad_token_id
    pad_id = engine.tokenizer.hf.eos_token_id if pad_id is None else pad_id
    lo, hi = (int(x) for x in args.prompt_len.split(","))

    rows = []
    for n in (int(c) for c in args.concurrency.split(",")):
        prompts = make_prompts(engine.tokenizer, n, lo, hi)
        ours_s, ours_tok = bench_ours(engine, prompts, args.max_tokens, args.repeats)
        hf_s, hf_tok = bench_transformers(hf, pad_id, prompts, args.max_tokens, args.repeats, device)
        rows.append((n, ours_tok / ours_s, hf_tok / hf_s, ours_s, hf_s))
    engine.shutdown()

    print(f"\nmodel: {path}  device: {args.device}  dtype: {args.dtype}  torch threads: {torch.get_num_threads()}")
    print(f"greedy, {args.max_tokens} new tokens per request, prompts {lo}-{hi} tokens, median of {args.repeats}\n")
    print("| concurrent | ours tok/s | transformers tok/s | speed-up | ours s | transformers s |")
    print("|---:|---:|---:|---:|---:|---:|")
    for n, ours, theirs, ours_s, hf_s in rows:
        print(f"| {n} | {ours:.1f} | {theirs:.1f} | {ours / theirs:.2f}x | {ours_s:.3f} | {hf_s:.3f} |")


if __name__ == "__main__":
    main()
