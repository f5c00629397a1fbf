"""Our Llama-family model against transformers on tiny random checkpoints (fp32, CPU).

Our side always runs as the engine will: one flattened varlen batch per step
through ``AttentionContext`` and per-sequence KV caches; the reference runs
each sequence alone.
"""

from __future__ import annotations

from functools import cache

import pytest
import torch
from transformers import AutoModelForCausalLM

from engine.kv_cache import SequenceKVCache
from engine.layers.attention import AttentionContext
from engine.loader import load_model
from engine.tokenizer import Tokenizer
from tests.checkpoints import VARIANTS, tiny_checkpoint

ATOL = 1e-4
# The named variants plus sliding-window ones (prompts longer than the window).
CASES = {
    **VARIANTS,
    "mistral-window": ("mistral", {"sliding_window": 6}),
    "qwen2-window": (
        "qwen2",
        {"use_sliding_window": True, "sliding_window": 6, "max_window_layers": 1},
    ),
}
TEXTS = [
    "Hello world!",
    "The robot drives along the corridor, then stops. 你好 🙂",
    "A",
    "<|im_start|>user\nWhat is the weather like in the city?<|im_end|>\n<|im_start|>assistant\n",
]


@cache
def _setup(case: str):
    architecture, kw = CASES[case]
    path = tiny_checkpoint(architecture, **kw)
    ours = load_model(path, torch.float32, "cpu")
    ref = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    prompts = [Tokenizer.from_pretrained(path).encode(t) for t in TEXTS]
    return ours, ref, prompts


def _new_caches(model, n: int) -> list[SequenceKVCache]:
    c = model.config
    return [
        SequenceKVCache(
            c.num_layers, c.num_kv_heads, c.head_dim, torch.float32, "cpu", initial_capacity=4
        )
        for _ in range(n)
    ]


def _step(model, caches: list[SequenceKVCache], chunks: list[list[int]]) -> list[torch.Tensor]:
    """One engine-style forward: each sequence's new tokens, flattened. Returns per-sequence logits."""
    lens = [len(c) for c in chunks]
    positions = []
    for cache_, n in zip(caches, lens, strict=True):
        cache_.reserve(cache_.num_tokens + n)
        positions.append(torch.arange(cache_.num_tokens, cache_.num_tokens + n))
    ids = torch.tensor([t for c in chunks for t in c], dtype=torch.long)
    hidden = model(ids, torch.cat(positions), AttentionContext(lens, caches))
    for cache_, n in zip(caches, lens, strict=True):
        cache_.advance(n)
    return list(model.compute_logits(hidden).split(lens))


def _reference_logits(ref, ids: list[int]) -> torch.Tensor:
    return ref(torch.tensor([ids])).logits[0].float()


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny matmuls: extra threads only spin, and slow down a lot on a busy 2-core box."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(params=sorted(CASES))
def case(request):
    return _setup(request.param)


@torch.inference_mode()
def test_varlen_prefill_matches_reference(case) -> None:
    ours, ref, prompts = case
    assert len({len(p) for p in prompts}) == len(prompts), "prompts should differ in length"
    logits = _step(ours, _new_caches(ours, len(prompts)), prompts)
    for prompt, got in zip(prompts, logits, strict=True):
        assert got.dtype == torch.float32 and got.shape == (len(prompt), ours.config.vocab_size)
        torch.testing.assert_close(got, _reference_logits(ref, prompt), atol=ATOL, rtol=0)


@torch.inference_mode()
def test_chunked_prefill_then_decode_matches_reference(case) -> None:
    """A: prefill in two chunks; B joins in the second step; then both decode one token a step."""
    ours, ref, prompts = case
    gen = torch.Generator().manual_seed(1)
    extra = [
        torch.randint(0, ours.config.vocab_size, (7,), generator=gen).tolist() for _ in range(2)
    ]
    seq_a, seq_b = prompts[3] + extra[0], prompts[1] + extra[1]
    caches = _new_caches(ours, 2)
    half = len(prompts[3]) // 2
    got_a = _step(ours, caches[:1], [seq_a[:half]])
    a2, b1 = _step(ours, caches, [seq_a[half : len(prompts[3])], prompts[1]])
    got_a.append(a2)
    got_b = [b1]
    for i in range(len(extra[0])):
        a, b = _step(ours, caches, [[extra[0][i]], [extra[1][i]]])
        got_a.append(a)
        got_b.append(b)
    torch.testing.assert_close(torch.cat(got_a), _reference_logits(ref, seq_a), atol=ATOL, rtol=0)
    torch.testing.assert_close(torch.cat(got_b), _reference_logits(ref, seq_b), atol=ATOL, rtol=0)


@torch.inference_mode()
def test_greedy_generation_matches_reference(case) -> None:
    ours, ref, prompts = case
    max_new = 16
    eos = set(ours.config.eos_token_ids)
    caches = _new_caches(ours, len(prompts))
    outputs: list[list[int]] = [[] for _ in prompts]
    active = list(range(len(prompts)))
    chunks = [list(p) for p in prompts]
    while active:
        logits = _step(ours, [caches[i] for i in active], chunks)
        chunks, still = [], []
        for i, lg in zip(active, logits, strict=True):
            token = int(lg[-1].argmax())
            outputs[i].append(token)
            if token not in eos and len(outputs[i]) < max_new:
                still.append(i)
                chunks.append([token])
        active = still
    for prompt, out in zip(prompts, outputs, strict=True):
        expected = ref.generate(
            torch.tensor([prompt]),
            attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
            max_new_tokens=max_new,
            do_sample=False,
        )[0, len(prompt) :].tolist()
        assert out == expected
