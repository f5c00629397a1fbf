"""Shared inputs and checks for the paged-attention tests (reference, interpreter, GPU).

Not collected by itself. Kernel modules are imported inside the check functions, so importing
this file never imports triton: the caller decides whether triton runs in its interpreter.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from deploy_kernels.paged_attention_ref import paged_attention_ref, write_kv_ref

FP8 = {"fp8_e4m3": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2}


@dataclass(frozen=True)
class Case:
    query_lens: tuple[int, ...]
    seq_lens: tuple[int, ...]  # cache tokens per sequence, the new ones included
    num_heads: int = 4
    num_kv_heads: int = 4
    head_dim: int = 64
    block_size: int = 16
    window: int | None = None
    cache: str = "auto"  # or a key of FP8
    dtype: torch.dtype = torch.float32

    def __str__(self) -> str:  # short pytest ids
        w = f"-w{self.window}" if self.window else ""
        return (f"q{list(self.query_lens)}-s{list(self.seq_lens)}-h{self.num_heads}/"
                f"{self.num_kv_heads}-d{self.head_dim}{w}-{self.cache}-{str(self.dtype)[6:]}")


@dataclass
class Inputs:
    q: torch.Tensor  # [T, Hq, D]
    k_cache: torch.Tensor  # [num_blocks, block_size, Hkv, D]
    v_cache: torch.Tensor
    block_tables: torch.Tensor  # [B, max_blocks] int32
    query_start_loc: torch.Tensor  # [B + 1] int32
    seq_lens: torch.Tensor  # [B] int32
    keys: list[torch.Tensor]  # per sequence [L, Hkv, D] fp32: what the cache holds, dequantized
    values: list[torch.Tensor]
    scale: float
    k_scale: float
    v_scale: float


def make_inputs(case: Case, device: str, seed: int = 0) -> Inputs:
    """Random inputs; each sequence's blocks scattered over a cache with spare blocks (an odd count)."""
    gen = torch.Generator().manual_seed(seed)
    bs, hkv, d = case.block_size, case.num_kv_heads, case.head_dim
    counts = [-(-n // bs) for n in case.seq_lens]
    num_blocks = sum(counts) + 3 + (sum(counts) + 3 + 1) % 2  # odd
    order = torch.randperm(num_blocks, generator=gen).tolist()
    tables, slots = [], []
    for n, c in zip(case.seq_lens, counts, strict=True):
        tables.append(order[:c])
        order = order[c:]
        slots.extend(tables[-1][p // bs] * bs + p % bs for p in range(n))
    width = max(counts)
    block_tables = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32)
    total = sum(case.seq_lens)
    k_all = torch.randn(total, hkv, d, generator=gen)  # [sum L, Hkv, D]
    v_all = torch.randn(total, hkv, d, generator=gen)
    fp8 = FP8.get(case.cache)
    cache_dtype = fp8 or case.dtype
    k_scale, v_scale = (0.03, 0.07) if fp8 else (1.0, 1.0)
    k_cache = torch.zeros(num_blocks, bs, hkv, d, dtype=cache_dtype)
    v_cache = torch.zeros_like(k_cache)
    k_in = k_all if fp8 else k_all.to(case.dtype)
    v_in = v_all if fp8 else v_all.to(case.dtype)
    write_kv_ref(k_in, v_in, k_cache, v_cache, torch.tensor(slots), k_scale, v_scale)
    if fp8:  # what the cache holds, read back (computed here without the reference's helpers)
        fmax = torch.finfo(fp8).max
        k_all = (k_all / k_scale).clamp(-fmax, fmax).to(fp8).float() * k_scale
        v_all = (v_all / v_scale).clamp(-fmax, fmax).to(fp8).float() * v_scale
    else:
        k_all, v_all = k_in.float(), v_in.float()
    starts = [0]
    for n in case.query_lens:
        starts.append(starts[-1] + n)
    q = torch.randn(starts[-1], case.num_heads, d, generator=gen).to(case.dtype)
    return Inputs(
        q=q.to(device), k_cache=k_cache.to(device), v_cache=v_cache.to(device),
        block_tables=block_tables.to(device),
        query_start_loc=torch.tensor(starts, dtype=torch.int32, device=device),
        seq_lens=torch.tensor(case.seq_lens, dtype=torch.int32, device=device),
        keys=list(k_all.split(list(case.seq_lens))), values=list(v_all.split(list(case.seq_lens))),
        scale=d**-0.5, k_scale=k_scale, v_scale=v_scale,
    )


def dense_attention(case: Case, inp: Inputs) -> torch.Tensor:
    """Naive float64 attention on contiguous K/V with an explicit mask: ``[T, Hq, D]``."""
    group = case.num_heads // case.num_kv_heads
    outs = []
    for b, (n, total) in enumerate(zip(case.query_lens, case.seq_lens, strict=True)):
        start = int(inp.query_start_loc[b])
        q = inp.q[start : start + n].double().cpu()  # [n, Hq, D]
        k = inp.keys[b].double().repeat_interleave(group, dim=1)  # [L, Hq, D]
        v = inp.values[b].double().repeat_interleave(group, dim=1)
        mask = torch.zeros(n, total, dtype=torch.bool)
        for i in range(n):
            pos = total - n + i
            for j in range(total):
                mask[i, j] = j <= pos and (case.window is None or pos - j < case.window)
        scores = torch.einsum("nhd,lhd->hnl", q, k) * inp.scale
        probs = scores.masked_fill(~mask, float("-inf")).softmax(-1)
        outs.append(torch.einsum("hnl,lhd->nhd", probs, v))
    return torch.cat(outs)


def reference(case: Case, inp: Inputs) -> torch.Tensor:
    """The torch reference in fp32 (the yardstick for the kernels), on the inputs' device."""
    return paged_attention_ref(
        inp.q.float(), inp.k_cache if case.cache in FP8 else inp.k_cache.float(),
        inp.v_cache if case.cache in FP8 else inp.v_cache.float(), inp.block_tables,
        inp.query_start_loc, inp.seq_lens, inp.scale, case.window, inp.k_scale, inp.v_scale,
    )


def tolerance(dtype: torch.dtype) -> float:
    return {torch.float32: 5e-5, torch.float16: 1e-2, torch.bfloat16: 3e-2}[dtype]


def check_varlen(case: Case, device: str, **kw) -> None:
    from deploy_kernels.paged_attention import paged_attention

    inp = make_inputs(case, device)
    got = paged_attention(
        inp.q, inp.k_cache, inp.v_cache, inp.block_tables, inp.query_start_loc, inp.seq_lens,
        inp.scale, max(case.query_lens), case.window, inp.k_scale, inp.v_scale, **kw,
    )
    assert got.dtype == case.dtype and got.shape == inp.q.shape
    want = reference(case, inp)
    torch.testing.assert_close(got.float(), want, atol=tolerance(case.dtype), rtol=0)


def check_decode(case: Case, device: str, **kw) -> None:
    from deploy_kernels.paged_attention_decode import paged_attention_decode

    assert set(case.query_lens) == {1}
    inp = make_inputs(case, device)
    got = paged_attention_decode(
        inp.q, inp.k_cache, inp.v_cache, inp.block_tables, inp.seq_lens, inp.scale,
        max(case.seq_lens), case.window, inp.k_scale, inp.v_scale, **kw,
    )
    want = reference(case, inp)
    torch.testing.assert_close(got.float(), want, atol=tolerance(case.dtype), rtol=0)


def check_write_kv(cache: str, dtype: torch.dtype, device: str, tokens: int = 40) -> None:
    """The Triton write against the reference write: bit-identical caches."""
    from deploy_kernels.write_kv import write_kv

    gen = torch.Generator().manual_seed(1)
    num_blocks, bs, hkv, d = 7, 16, 2, 64
    spread = torch.logspace(-7, 3, d)  # fp8 subnormals up to clamped values
    k = (torch.randn(tokens, hkv, d, generator=gen) * spread).to(dtype)
    v = torch.randn(tokens, hkv, d, generator=gen).to(dtype)
    slots = torch.randperm(num_blocks * bs, generator=gen)[:tokens]
    slots[3] = -1  # skipped
    cache_dtype = FP8.get(cache, dtype)
    caches = [torch.randn(num_blocks, bs, hkv, d).to(cache_dtype) for _ in range(2)]
    mine = [c.clone().to(device) for c in caches]
    write_kv_ref(k, v, *caches, slots, 0.37, 1.3)
    write_kv(k.to(device), v.to(device), *mine, slots.to(device), 0.37, 1.3)
    for want, got in zip(caches, mine, strict=True):
        assert torch.equal(got.cpu().view(torch.uint8), want.view(torch.uint8))
