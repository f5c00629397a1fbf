from __future__ import annotations

import pytest

from engine.memory import MiB, estimate_activation_bytes, plan_memory

BASE = dict(
    device="cuda", pool_bytes=80 * 1024 * MiB, utilization=0.9, weight_bytes=16 * 1024 * MiB,
    activation_bytes=2 * 1024 * MiB, bytes_per_block=16 * 2 * 32 * 8 * 128 * 2, block_size=16,
    max_model_len=4096, max_num_seqs=256, weights_in_pool=True,
)


def test_gpu_budget_is_utilization_minus_weights_and_activations() -> None:
    plan = plan_memory(**BASE)
    budget = int(80 * 1024 * MiB * 0.9) - 16 * 1024 * MiB - 2 * 1024 * MiB
    assert plan.num_blocks == budget // BASE["bytes_per_block"]
    assert plan.kv_cache_bytes == plan.num_blocks * BASE["bytes_per_block"] <= budget
    assert not plan.capped
    assert any("blocks of 16 tokens" in line for line in plan.log_lines())


def test_half_the_bytes_per_block_holds_twice_the_tokens() -> None:
    full = plan_memory(**BASE)
    fp8 = plan_memory(**{**BASE, "bytes_per_block": BASE["bytes_per_block"] // 2})
    assert fp8.num_tokens in (2 * full.num_tokens, 2 * full.num_tokens + fp8.block_size)


def test_cpu_pool_does_not_subtract_weights_twice() -> None:
    plan = plan_memory(**{**BASE, "device": "cpu", "weights_in_pool": False, "max_num_seqs": 10_000})
    assert plan.kv_cache_bytes > plan_memory(**{**BASE, "max_num_seqs": 10_000}).kv_cache_bytes


def test_blocks_are_capped_at_what_the_sequence_slots_can_use() -> None:
    plan = plan_memory(**{**BASE, "max_num_seqs": 2, "max_model_len": 64})
    assert plan.capped and plan.num_blocks == 2 * 4


def test_too_little_memory_says_what_to_lower() -> None:
    with pytest.raises(ValueError) as err:
        plan_memory(**{**BASE, "weight_bytes": 70 * 1024 * MiB})
    message = str(err.value)
    for hint in ("--max_model_len", "--gpu_memory_utilization", "--kv_cache_dtype fp8", "quantization"):
        assert hint in message
    with pytest.raises(ValueError, match="--cpu_memory_utilization"):
        plan_memory(**{**BASE, "device": "cpu", "weights_in_pool": False, "pool_bytes": 100 * MiB,
                       "activation_bytes": 0})


def test_activation_estimate_grows_with_tokens() -> None:
    small = estimate_activation_bytes(16, 64, 128, 4, 16, 512, 1, 4)
    assert 0 < small < estimate_activation_bytes(4096, 64, 128, 4, 16, 512, 32, 4)


def test_block_count_override() -> None:
    assert plan_memory(**BASE, num_blocks_override=300).num_blocks == 300
    with pytest.raises(ValueError, match="num_kv_blocks 10 holds 160 tokens"):
        plan_memory(**BASE, num_blocks_override=10)
