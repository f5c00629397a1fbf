"""The CPU decode step's shortcuts against the references they replace: the decode attention
that builds its slots and mask once per step (``DecodePlan``) against ``paged_attention_ref``
and ``write_kv_ref``, the rotary table against ``cos_sin`` computed directly, float32 RMSNorm
against its composite, and oneDNN-packed linear layers against the unpacked model."""

from __future__ import annotations

import pytest
import torch

from deploy_kernels.paged_attention_ref import paged_attention_ref, write_kv_ref
from engine.config import RopeConfig
from engine.kv_cache import PagedKVCache
from engine.layers.attention import (
    AttentionMetadata,
    DecodePlan,
    LayerKVCache,
    _attend_torch_decode,
)
from engine.layers.cpu_linear import PackedCpuLinearMethod, pack_cpu_linears
from engine.layers.linear import Linear
from engine.layers.norm import RMSNorm
from engine.layers.rotary import RotaryEmbedding, cos_sin, inv_frequencies
from engine.loader import load_model
from tests.checkpoints import tiny_checkpoint

BLOCK = 4


def _decode_step(seq_lens: list[int], num_blocks: int, seed: int) -> tuple[AttentionMetadata, list]:
    """Metadata of one decode step over block tables drawn at random (no block shared)."""
    gen = torch.Generator().manual_seed(seed)
    free = torch.randperm(num_blocks, generator=gen).tolist()
    tables = [[free.pop() for _ in range(-(-n // BLOCK))] for n in seq_lens]
    meta = AttentionMetadata.build([1] * len(seq_lens), seq_lens, tables, BLOCK, "cpu")
    return meta, tables


@pytest.mark.parametrize("seq_lens", [[1], [9], [5, 17, 2, 12], [8, 8, 8]])
@pytest.mark.parametrize("window", [None, 3, 64])
@pytest.mark.parametrize("heads", [(4, 2), (3, 3)])
def test_decode_attention_matches_the_reference(seq_lens: list[int], window: int | None,
                                                heads: tuple[int, int]) -> None:
    hq, hkv, d, num_blocks = *heads, 8, 32
    meta, _ = _decode_step(seq_lens, num_blocks, seed=len(seq_lens))
    gen = torch.Generator().manual_seed(7)
    cache = torch.randn(2, num_blocks, BLOCK, hkv, d, generator=gen)  # earlier tokens' K, V
    b = len(seq_lens)
    q, k, v = (torch.randn(b, h, d, generator=gen) for h in (hq, hkv, hkv))

    ours = LayerKVCache(k=cache[0].clone(), v=cache[1].clone())
    out = _attend_torch_decode(q, k, v, meta, ours, 0.3, window)

    ref_k, ref_v = cache[0].clone(), cache[1].clone()
    write_kv_ref(k, v, ref_k, ref_v, meta.slot_mapping)
    ref = paged_attention_ref(q, ref_k, ref_v, meta.block_tables, meta.query_start_loc,
                              meta.seq_lens, 0.3, window)
    assert torch.equal(ours.k, ref_k) and torch.equal(ours.v, ref_v)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)


def test_the_plan_is_built_once_per_step_and_window() -> None:
    meta, _ = _decode_step([5, 9], 16, seed=0)
    plan = meta.decode_plan(BLOCK, None)
    assert plan is not None and meta.decode_plan(BLOCK, None) is plan
    assert plan.mask is not None and plan.num_keys == 9  # the shorter sequence is padded
    windowed = meta.decode_plan(BLOCK, 4)
    assert windowed is not plan and windowed.num_keys == 4 and windowed.mask is None


def test_the_plan_reads_each_sequences_own_slots() -> None:
    meta, tables = _decode_step([6, 3], 16, seed=1)
    plan = DecodePlan.build(meta, BLOCK, None)
    assert plan is not None
    slots = plan.slots.view(2, 6).tolist()
    assert slots[0] == [tables[0][p // BLOCK] * BLOCK + p % BLOCK for p in range(6)]
    assert slots[1][:3] == [tables[1][p // BLOCK] * BLOCK + p % BLOCK for p in range(3)]
    assert plan.mask is not None and plan.mask[1, 0, 0].tolist() == [True] * 3 + [False] * 3


def test_no_plan_for_prefill_or_unwritten_slots() -> None:
    prefill = AttentionMetadata.build([3, 1], [3, 5], [[0], [1, 2]], BLOCK, "cpu")
    assert prefill.decode_plan(BLOCK, None) is None
    meta, _ = _decode_step([2, 2], 8, seed=2)
    meta.slot_mapping[0] = -1  # "do not write": left to the reference path
    assert meta.decode_plan(BLOCK, None) is None


@pytest.mark.parametrize("rope", [RopeConfig(theta=10000.0), RopeConfig(theta=1e6, rope_type="linear",
                                                                          factor=4.0)])
def test_rotary_rows_from_the_table_equal_a_direct_computation(rope: RopeConfig) -> None:
    emb = RotaryEmbedding(16, rope)
    inv = inv_frequencies(16, rope)
    for positions in ([0, 1, 2], [300, 7, 1000], [5]):  # 300 and 1000 grow the table twice
        pos = torch.tensor(positions)
        for dtype in (torch.float32, torch.bfloat16):
            cos, sin = emb(pos, dtype)
            ref_cos, ref_sin = cos_sin(pos, inv, dtype)
            assert torch.equal(cos, ref_cos) and torch.equal(sin, ref_sin)
    assert emb._tables[torch.float32][0].shape[0] >= 1001


@pytest.mark.parametrize("rows", [1, 5, 16])
def test_float32_rms_norm_is_bit_identical_to_the_composite(rows: int) -> None:
    norm = RMSNorm(64, 1e-5)
    gen = torch.Generator().manual_seed(rows)
    norm.weight.copy_(torch.randn(64, generator=gen))
    x = torch.randn(rows, 64, generator=gen) * 5
    ref = norm.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5))
    assert torch.equal(norm(x), ref)


@pytest.mark.parametrize("architecture", ["llama", "qwen2"])  # untied head; tied head
def test_packed_linears_give_the_unpacked_logits(architecture: str) -> None:
    path = tiny_checkpoint(architecture)
    plain, packed = (load_model(path, torch.float32, "cpu") for _ in range(2))
    n_linear = sum(isinstance(m, Linear) for m in packed.modules())
    assert pack_cpu_linears(packed) == n_linear
    assert all(isinstance(m.quant_method, PackedCpuLinearMethod) for m in packed.modules()
               if isinstance(m, Linear))
    q_proj = packed.model.layers[0].self_attn.q_proj
    assert not hasattr(q_proj, "weight") and q_proj.packed_weight.is_mkldnn  # replaced, not copied
    if packed.config.tie_word_embeddings:  # the embedding keeps the table the head was packed from
        assert packed.lm_head.weight is packed.model.embed_tokens.weight

    ids = torch.tensor([3, 17, 5, 250, 9, 41])
    for model in (plain, packed):
        model.kv = PagedKVCache(model.config.num_layers, 4, BLOCK, model.config.num_kv_heads,
                                model.config.head_dim, torch.float32, "cpu")
        model.kv.bind(model)
    meta = AttentionMetadata.build([6], [6], [[0, 1]], BLOCK, "cpu")
    with torch.inference_mode():
        ref = plain.compute_logits(plain(ids, torch.arange(6), meta))
        got = packed.compute_logits(packed(ids, torch.arange(6), meta))
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    assert torch.equal(got.argmax(-1), ref.argmax(-1))


def test_only_plain_float32_layers_are_packed() -> None:
    model = load_model(tiny_checkpoint("llama"), torch.bfloat16, "cpu")
    assert pack_cpu_linears(model) == 0  # bf16: oneDNN's bf16 path is not ours to trust here
    layer = Linear(8, 4)
    layer.weight.copy_(torch.randn(4, 8))
    holder = torch.nn.Sequential(layer)
    assert pack_cpu_linears(holder) == 1
    x = torch.randn(2, 3, 8)  # leading dimensions are kept
    torch.testing.assert_close(layer(x), x @ holder[0].packed_weight.to_dense().t(), rtol=1e-5,
                               atol=1e-6)
