"""PagedKVCache (sizes, dtypes, scales, binding) and AttentionMetadata.build."""

from __future__ import annotations

import logging

import pytest
import torch

from engine.kv_cache import CALIBRATION_HEADROOM, PagedKVCache, resolve_kv_cache_dtype
from engine.layers.attention import Attention, AttentionMetadata


def _model(num_layers: int = 2, num_kv_heads: int = 2, head_dim: int = 8) -> torch.nn.Module:
    return torch.nn.ModuleList(
        Attention(i, 4, num_kv_heads, head_dim, head_dim**-0.5) for i in range(num_layers)
    )


def test_resolve_kv_cache_dtype() -> None:
    assert resolve_kv_cache_dtype("auto", torch.bfloat16) == torch.bfloat16
    assert resolve_kv_cache_dtype("fp8", torch.float16) == torch.float8_e4m3fn
    assert resolve_kv_cache_dtype("fp8_e4m3", torch.float16) == torch.float8_e4m3fn
    assert resolve_kv_cache_dtype("fp8_e5m2", torch.float16) == torch.float8_e5m2
    with pytest.raises(ValueError, match="unknown kv_cache_dtype 'int8'.*'fp8_e5m2'"):
        resolve_kv_cache_dtype("int8", torch.float16)


def test_shapes_bytes_and_bind() -> None:
    kv = PagedKVCache(2, 5, 16, 2, 8, torch.float16, "cpu")
    assert kv.cache_dtype == torch.float16 and len(kv.layers) == 2
    assert kv.layers[1].k.shape == (5, 16, 2, 8) and kv.layers[1].v.dtype == torch.float16
    assert PagedKVCache.bytes_per_block(2, 16, 2, 8, torch.float16) == 2 * 2 * 16 * 2 * 8 * 2
    assert PagedKVCache.bytes_per_block(2, 16, 2, 8, torch.float8_e4m3fn) == 2 * 2 * 16 * 2 * 8
    assert kv.nbytes() == 5 * PagedKVCache.bytes_per_block(2, 16, 2, 8, torch.float16)
    model = _model()
    kv.bind(model)
    assert [m.kv_cache for m in model] == kv.layers
    with pytest.raises(ValueError, match="do not match a 3-layer cache"):
        PagedKVCache(3, 5, 16, 2, 8, torch.float16, "cpu").bind(model)
    with pytest.raises(ValueError, match="KV heads"):
        PagedKVCache(2, 5, 16, 1, 8, torch.float16, "cpu").bind(model)


def test_unbound_attention_is_a_clear_error() -> None:
    meta = AttentionMetadata.build([1], [1], [[0]], 16, "cpu")
    q, kv = torch.zeros(1, 4, 8), torch.zeros(1, 2, 8)
    with pytest.raises(RuntimeError, match="no KV cache: call PagedKVCache.bind"):
        _model()[0](q, kv, kv, meta)


def test_checkpoint_scales_are_validated_and_kept() -> None:
    kv = PagedKVCache(2, 4, 16, 2, 8, torch.float16, "cpu", "fp8", [0.5, 0.25], [2.0, 1.5])
    assert kv.k_scales == [0.5, 0.25] and kv.v_scales == [2.0, 1.5]
    assert not any(layer.needs_calibration for layer in kv.layers)
    kv.reset_calibration()
    assert kv.k_scales == [0.5, 0.25]
    with pytest.raises(ValueError, match="k_scales must hold 2 positive"):
        PagedKVCache(2, 4, 16, 2, 8, torch.float16, "cpu", "fp8", [0.5], [2.0, 1.5])
    with pytest.raises(ValueError, match="both"):
        PagedKVCache(2, 4, 16, 2, 8, torch.float16, "cpu", "fp8", [0.5, 0.5])


def test_calibration_on_first_nonzero_batch(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        kv = PagedKVCache(1, 4, 4, 2, 8, torch.float32, "cpu", "fp8_e4m3")
    assert "calibrates" in caplog.text
    layer = kv.layers[0]
    layer.calibrate(torch.zeros(3, 2, 8), torch.zeros(3, 2, 8))  # dummy data: ignored
    assert layer.needs_calibration and layer.k_scale == 1.0
    k, v = torch.full((3, 2, 8), -4.48), torch.full((3, 2, 8), 0.5)
    layer.calibrate(k, v)
    assert not layer.needs_calibration
    assert layer.k_scale == pytest.approx(CALIBRATION_HEADROOM * 4.48 / 448)
    assert layer.v_scale == pytest.approx(CALIBRATION_HEADROOM * 0.5 / 448)
    kv.reset_calibration()
    assert layer.needs_calibration and layer.k_scale == 1.0


def test_metadata_build() -> None:
    # seq 0: 6 tokens, 2 new (positions 4, 5 -> block 9); seq 1: decode at position 4 (block 2)
    meta = AttentionMetadata.build([2, 1], [6, 5], [[7, 9], [3, 2]], 4, "cpu")
    assert meta.slot_mapping.tolist() == [9 * 4 + 0, 9 * 4 + 1, 2 * 4 + 0]
    assert meta.slot_mapping.dtype == torch.int64
    assert meta.query_start_loc.tolist() == [0, 2, 3] and meta.query_start_loc.dtype == torch.int32
    assert meta.seq_lens.tolist() == [6, 5] and meta.block_tables.tolist() == [[7, 9], [3, 2]]
    assert (meta.max_query_len, meta.max_seq_len, meta.num_tokens) == (2, 6, 3)
    assert not meta.decode_only and meta.last_token_indices() == [1, 2]
    ragged = AttentionMetadata.build([1, 1], [1, 9], [[5], [1, 4, 0]], 4, "cpu")
    assert ragged.decode_only and ragged.block_tables.tolist() == [[5, 0, 0], [1, 4, 0]]
    assert ragged.slot_mapping.tolist() == [20, 0]
    empty = AttentionMetadata.build([], [], [], 4, "cpu")
    assert empty.num_tokens == 0 and empty.block_tables.shape == (0, 1)


def test_kv_scale_names_of_every_tool() -> None:
    """self_attn.k_scale/v_scale, kv_scale for both, AutoFP8's k_proj/v_proj.output_scale,
    and a layer with only one of the two (both take it)."""
    from engine.kv_setup import read_kv_scales

    t = torch.tensor
    got = read_kv_scales({
        "model.layers.0.self_attn.k_scale": t(0.5), "model.layers.0.self_attn.v_scale": t(0.25),
        "model.layers.1.self_attn.kv_scale": t(2.0),
        "model.layers.2.self_attn.k_proj.output_scale": t([0.75]),
        "model.layers.2.self_attn.v_proj.output_scale": t([1.5]),
        "model.layers.3.self_attn.k_proj.k_scale": t(3.0),
        "model.layers.3.self_attn.o_proj.weight": t(9.0),  # not a scale
    }, 4)
    assert got == ([0.5, 2.0, 0.75, 3.0], [0.25, 2.0, 1.5, 3.0])
