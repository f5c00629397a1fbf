"""Memory planning: how many KV-cache blocks fit beside the weights and activations.

The cache is allocated once at start. On a GPU its budget is
``gpu_memory_utilization`` x the device's total memory, minus the weights and
the activation peak of the largest batch (measured by a dummy forward); on the
CPU it is ``cpu_memory_utilization`` x the memory psutil reports available
(the weights are already loaded, so they are no longer "available"), minus an
estimate of the activation peak. How the blocks are shared between projects is
the block manager's (``kv_share``). Plain arithmetic: no torch here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

MiB = 1 << 20


@dataclass(frozen=True)
class MemoryPlan:
    device: str  # "cuda" or "cpu"
    pool_bytes: int  # what the budget is taken from (GPU total, or CPU available)
    utilization: float
    weight_bytes: int
    activation_bytes: int
    kv_cache_bytes: int
    block_size: int
    bytes_per_block: int
    num_blocks: int
    capped: bool  # fewer blocks than the budget allows: more could never be used

    @property
    def num_tokens(self) -> int:
        return self.num_blocks * self.block_size

    def log_lines(self) -> list[str]:
        cap = " (capped: max_num_seqs x max_model_len)" if self.capped else ""
        return [
            f"memory plan on {self.device}: {self.utilization:g} x {self.pool_bytes / MiB:.0f} MiB; "
            f"weights {self.weight_bytes / MiB:.1f} MiB, activations {self.activation_bytes / MiB:.1f} MiB, "
            f"KV cache {self.kv_cache_bytes / MiB:.1f} MiB",
            f"KV cache: {self.num_blocks} blocks of {self.block_size} tokens "
            f"({self.bytes_per_block} bytes each) = {self.num_tokens} tokens{cap}",
        ]


def plan_memory(
    *,
    device: str,
    pool_bytes: int,
    utilization: float,
    weight_bytes: int,
    activation_bytes: int,
    bytes_per_block: int,
    block_size: int,
    max_model_len: int,
    max_num_seqs: int,
    weights_in_pool: bool,
    num_blocks_override: int | None = None,
) -> MemoryPlan:
    """The plan, or ``ValueError`` saying what to lower when one full sequence does not fit.

    ``weights_in_pool``: the pool still counts the weights (GPU total memory) and
    they are subtracted; on the CPU the pool is what is available after loading.
    ``num_blocks_override``: take exactly this many blocks (``--num_kv_blocks``).
    """
    budget = int(pool_bytes * utilization) - activation_bytes
    if weights_in_pool:
        budget -= weight_bytes
    need_blocks = math.ceil(max_model_len / block_size)
    blocks = max(budget, 0) // bytes_per_block
    # At most every sequence slot full: more blocks could only hold stale prefix cache.
    cap = max_num_seqs * need_blocks
    capped = blocks > cap
    blocks = min(blocks, cap)
    if num_blocks_override is not None:  # the user's word; one full sequence must still fit
        blocks, capped = num_blocks_override, False
        if blocks < need_blocks:
            raise ValueError(
                f"num_kv_blocks {blocks} holds {blocks * block_size} tokens, fewer than one "
                f"sequence of max_model_len {max_model_len}: raise it or lower --max_model_len"
            )
    if blocks < need_blocks:
        flag = "--gpu_memory_utilization" if device == "cuda" else "--cpu_memory_utilization"
        raise ValueError(
            f"too little memory for one sequence of max_model_len {max_model_len} tokens: it needs "
            f"{need_blocks * bytes_per_block / MiB:.1f} MiB of KV cache, but only "
            f"{max(budget, 0) / MiB:.1f} MiB are left of {utilization:g} x {pool_bytes / MiB:.0f} MiB "
            f"after the weights ({weight_bytes / MiB:.1f} MiB) and activations "
            f"({activation_bytes / MiB:.1f} MiB). Lower --max_model_len, raise {flag}, "
            "use --kv_cache_dtype fp8, or a stronger quantization"
        )
    return MemoryPlan(
        device=device,
        pool_bytes=pool_bytes,
        utilization=utilization,
        weight_bytes=weight_bytes,
        activation_bytes=activation_bytes,
        kv_cache_bytes=blocks * bytes_per_block,
        block_size=block_size,
        bytes_per_block=bytes_per_block,
        num_blocks=blocks,
        capped=capped,
    )


def estimate_activation_bytes(
    num_tokens: int, hidden_size: int, intermediate_size: int, num_heads: int, head_dim: int,
    vocab_size: int, num_logit_rows: int, dtype_bytes: int,
) -> int:
    """Peak activation bytes of one forward over ``num_tokens`` (CPU, where nothing measures it):
    the residual stream, q/k/v/attention output, the MLP's gate+up, and fp32 logits of the
    sampled rows, with a factor 2 for temporaries alive at the same time."""
    per_token = hidden_size * 3 + num_heads * head_dim * 4 + intermediate_size * 3
    return 2 * num_tokens * per_token * dtype_bytes + num_logit_rows * vocab_size * 4
