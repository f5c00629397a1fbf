"""Our Llama-family model against transformers on tiny random checkpoints (fp32, CPU).

Our side always runs as the engine will: one flattened varlen batch per step through
``AttentionMetadata`` and a ``PagedKVCache`` whose blocks are handed out in scattered order;
the reference runs each sequence alone.
"""

from __future__ import annotations

from functools import cache

import pytest
import torch
from transformers import AutoModelForCausalLM

from engine.kv_cache import PagedKVCache
from engine.layers.attention import AttentionMetadata
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


BLOCK_SIZE = 4  # small, so every sequence spans several (scattered) blocks


class _Batch:
    """Test-side block bookkeeping: a paged cache bound to the model, each sequence's block
    table and tokens in the cache. Blocks come from a shuffled free list."""

    def __init__(
        self, model, n: int, kv_cache_dtype: str = "auto", num_blocks: int = 128, **scales
    ) -> None:
        c = model.config
        self.device = model.lm_head.weight.device
        self.kv = PagedKVCache(
            c.num_layers, num_blocks, BLOCK_SIZE, c.num_kv_heads, c.head_dim, torch.float32,
            self.device, kv_cache_dtype, **scales,
        )
        self.kv.bind(model)
        self.free = torch.randperm(num_blocks, generator=torch.Generator().manual_seed(0)).tolist()
        self.tables: list[list[int]] = [[] for _ in range(n)]
        self.lens = [0] * n


def _step(model, batch: _Batch, seqs: list[int], chunks: list[list[int]]) -> list[torch.Tensor]:
    """One engine-style forward: new tokens of sequences ``seqs``, flattened. Per-sequence logits."""
    lens = [len(c) for c in chunks]
    totals, positions = [], []
    for i, n in zip(seqs, lens, strict=True):
        start = batch.lens[i]
        while len(batch.tables[i]) * BLOCK_SIZE < start + n:
            batch.tables[i].append(batch.free.pop())
        totals.append(start + n)
        positions.append(torch.arange(start, start + n))
    dev = batch.device
    meta = AttentionMetadata.build(lens, totals, [batch.tables[i] for i in seqs], BLOCK_SIZE, dev)
    ids = torch.tensor([t for c in chunks for t in c], dtype=torch.long, device=dev)
    hidden = model(ids, torch.cat(positions).to(dev), meta)
    for i, total in zip(seqs, totals, strict=True):
        batch.lens[i] = total
    return [x.cpu() for x in model.compute_logits(hidden).split(lens)]


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
    logits = _step(ours, _Batch(ours, len(prompts)), list(range(len(prompts))), prompts)
    for prompt, got in zip(prompts, logits, strict=True):
        assert got.dtype == torch.float32 and got.shape == (len(prompt), ours.config.vocab_size)
        torch.testing.assert_close(got, _reference_logits(ref, prompt), atol=ATOL, rtol=0)


def _chunked_run(ours, prompts: list[list[int]], batch: _Batch):
    """A: prefill in two chunks; B joins in the second step; then both decode one token a step.
    Returns (A's logits, B's logits, A's tokens, B's tokens)."""
    gen = torch.Generator().manual_seed(1)
    extra = [
        torch.randint(0, ours.config.vocab_size, (7,), generator=gen).tolist() for _ in range(2)
    ]
    seq_a, seq_b = prompts[3] + extra[0], prompts[1] + extra[1]
    half = len(prompts[3]) // 2
    got_a = _step(ours, batch, [0], [seq_a[:half]])
    a2, b1 = _step(ours, batch, [0, 1], [seq_a[half : len(prompts[3])], prompts[1]])
    got_a.append(a2)
    got_b = [b1]
    for i in range(len(extra[0])):
        a, b = _step(ours, batch, [0, 1], [[extra[0][i]], [extra[1][i]]])
        got_a.append(a)
        got_b.append(b)
    return torch.cat(got_a), torch.cat(got_b), seq_a, seq_b


@torch.inference_mode()
def test_chunked_prefill_then_decode_matches_reference(case) -> None:
    """The second chunk of A attends to A's cached first chunk; decodes batch A and B."""
    ours, ref, prompts = case
    got_a, got_b, seq_a, seq_b = _chunked_run(ours, prompts, _Batch(ours, 2))
    torch.testing.assert_close(got_a, _reference_logits(ref, seq_a), atol=ATOL, rtol=0)
    torch.testing.assert_close(got_b, _reference_logits(ref, seq_b), atol=ATOL, rtol=0)


# fp8 KV against our fp32 cache on the same steps. Measured over these cases (calibrated scales):
# relative error ||d|| / ||logits|| 0.035-0.039 (e4m3), 0.062-0.085 (e5m2); max |d| / std(logits)
# 0.17-0.26 (e4m3), 0.35-0.49 (e5m2). The random tiny models amplify: 3 (2) mantissa bits.
FP8_TOL = {"fp8_e4m3": (0.06, 0.35), "fp8_e5m2": (0.12, 0.7)}  # (relative, max / std)


@pytest.mark.parametrize("kv_dtype", sorted(FP8_TOL))
@torch.inference_mode()
def test_fp8_kv_cache_stays_close_to_full_precision(case, kv_dtype: str) -> None:
    ours, _, prompts = case
    base = torch.cat(_chunked_run(ours, prompts, _Batch(ours, 2))[:2])
    batch = _Batch(ours, 2, kv_dtype)
    assert batch.kv.layers[0].k.dtype in (torch.float8_e4m3fn, torch.float8_e5m2)
    got = torch.cat(_chunked_run(ours, prompts, batch)[:2])
    rel, peak = FP8_TOL[kv_dtype]
    diff = got - base
    assert float(diff.norm() / base.norm()) < rel
    assert float(diff.abs().max() / base.std()) < peak
    # the calibrated scales, given back as checkpoint scales, reproduce the run exactly
    k_scales, v_scales = batch.kv.k_scales, batch.kv.v_scales
    assert all(s != 1.0 for s in k_scales + v_scales)
    again = _Batch(ours, 2, kv_dtype, k_scales=k_scales, v_scales=v_scales)
    assert not again.kv.layers[0].needs_calibration
    torch.testing.assert_close(torch.cat(_chunked_run(ours, prompts, again)[:2]), got, atol=0, rtol=0)


@torch.inference_mode()
def test_greedy_generation_matches_reference(case) -> None:
    ours, ref, prompts = case
    max_new = 16
    eos = set(ours.config.eos_token_ids)
    batch = _Batch(ours, len(prompts))
    outputs: list[list[int]] = [[] for _ in prompts]
    active = list(range(len(prompts)))
    chunks = [list(p) for p in prompts]
    while active:
        logits = _step(ours, batch, active, chunks)
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


# -- the Triton path (CUDA): same model in fp32 on the GPU -------------------------------------


@cache
def _on_gpu(case: str):
    architecture, kw = CASES[case]
    return load_model(tiny_checkpoint(architecture, **kw), torch.float32, "cuda")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("name", sorted(CASES))
@torch.inference_mode()
def test_triton_attention_path_matches_reference_gpu(name: str) -> None:
    """Prefill chunks, a chunk over cached context and decodes through the Triton kernels
    (fp32 activations: exact fp32 dots in the kernels), then an fp8 cache on the GPU."""
    _, ref, prompts = _setup(name)
    gpu = _on_gpu(name)
    got_a, got_b, seq_a, seq_b = _chunked_run(gpu, prompts, _Batch(gpu, 2))
    torch.testing.assert_close(got_a, _reference_logits(ref, seq_a), atol=ATOL, rtol=0)
    torch.testing.assert_close(got_b, _reference_logits(ref, seq_b), atol=ATOL, rtol=0)
    base = torch.cat([got_a, got_b])
    for kv_dtype, (rel, peak) in FP8_TOL.items():
        got = torch.cat(_chunked_run(gpu, prompts, _Batch(gpu, 2, kv_dtype))[:2])
        assert float((got - base).norm() / base.norm()) < rel
        assert float((got - base).abs().max() / base.std()) < peak
