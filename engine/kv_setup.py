"""Size and allocate the paged KV cache once, at start (see ``engine.memory``).

Measures what the plan needs (weight bytes; the activation peak of the largest
step: measured by a dummy forward on CUDA, estimated on the CPU), reads the
device's memory, plans, logs the plan and allocates the cache.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import torch

from engine.api import EngineConfig
from engine.kv_cache import PagedKVCache, resolve_kv_cache_dtype
from engine.layers.attention import AttentionMetadata
from engine.loader import KV_SCALE_NAME, checkpoint_tensor_files
from engine.memory import MemoryPlan, estimate_activation_bytes, plan_memory
from engine.tensor_files import open_tensor_file, reading_checkpoint

log = logging.getLogger(__name__)



def model_bytes(model: torch.nn.Module) -> int:
    tensors = {id(t): t for t in (*model.parameters(), *model.buffers())}  # tied ones once
    return sum(t.numel() * t.element_size() for t in tensors.values())


def read_kv_scales(tensors: dict[str, torch.Tensor], num_layers: int) -> tuple[list[float], list[float]] | None:
    """Per-layer K and V scales from checkpoint tensors named like
    ``model.layers.N.self_attn.k_scale`` / ``v_scale`` (or one ``kv_scale`` for both, or
    ``k_proj.output_scale`` / ``v_proj.output_scale``). A layer with only one of the two
    uses the larger for both (FORMATS.md)."""
    k: dict[int, float] = {}
    v: dict[int, float] = {}
    for name, tensor in tensors.items():
        match = KV_SCALE_NAME.match(name)
        if match is None:
            continue
        layer, proj, kind = int(match.group(1)), match.group(2), match.group(3)
        if kind == "output_scale":
            kind = "k_scale" if proj == "k" else "v_scale"
        value = float(tensor.float().max())
        if kind in ("k_scale", "kv_scale"):
            k[layer] = max(value, k.get(layer, value))
        if kind in ("v_scale", "kv_scale"):
            v[layer] = max(value, v.get(layer, value))
    if not k and not v:
        return None
    for layer in set(k) ^ set(v):  # only one of the two: both take it
        k[layer] = v[layer] = max(k.get(layer, 0.0), v.get(layer, 0.0))
    layers = set(range(num_layers))
    if set(k) != layers or set(v) != layers:
        raise ValueError(
            f"the checkpoint has KV-cache scales for some layers only (k: {sorted(k)}, "
            f"v: {sorted(v)}); expected all {num_layers}"
        )
    return [k[i] for i in range(num_layers)], [v[i] for i in range(num_layers)]


@reading_checkpoint()
def load_kv_scales(path: str | Path, num_layers: int) -> tuple[list[float], list[float]] | None:
    found: dict[str, torch.Tensor] = {}
    for name, file in checkpoint_tensor_files(Path(path)).items():
        if KV_SCALE_NAME.match(name):
            with open_tensor_file(file) as fh:
                found[name] = fh.get(name)
    return read_kv_scales(found, num_layers)


@torch.inference_mode()
def measure_activation_bytes(model: torch.nn.Module, config: EngineConfig, device: torch.device,
                             dtype: torch.dtype) -> int:
    """The activation peak of the largest step. CUDA: a dummy forward of
    ``max_num_batched_tokens`` tokens over a one-block scratch cache, measured by the
    allocator; CPU: an estimate (``engine.memory.estimate_activation_bytes``)."""
    c = model.config
    num_tokens = config.max_num_batched_tokens
    num_seqs = max(1, min(config.max_num_seqs, num_tokens))
    if device.type != "cuda":
        return estimate_activation_bytes(
            num_tokens, c.hidden_size, c.intermediate_size, c.num_heads, c.head_dim,
            c.vocab_size, num_seqs, dtype.itemsize,
        )
    scratch = PagedKVCache(c.num_layers, 1, config.block_size, c.num_kv_heads, c.head_dim, dtype, device)
    scratch.bind(model)
    lens = [num_tokens // num_seqs + (i < num_tokens % num_seqs) for i in range(num_seqs)]
    tables = [[0] * math.ceil(n / config.block_size) for n in lens]
    meta = AttentionMetadata.build(lens, lens, tables, config.block_size, device)
    ids = torch.randint(0, c.vocab_size, (num_tokens,), device=device)  # never zeros
    positions = torch.cat([torch.arange(n, device=device) for n in lens])
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    hidden = model.forward(ids, positions, meta)
    model.compute_logits(hidden[-num_seqs:])
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - before
    del hidden, scratch
    torch.cuda.empty_cache()
    return int(peak)


def plan_kv_cache(model: torch.nn.Module, config: EngineConfig, device: torch.device,
                  dtype: torch.dtype, max_model_len: int) -> MemoryPlan:
    c = model.config
    cache_dtype = resolve_kv_cache_dtype(config.kv_cache_dtype, dtype)
    activation = measure_activation_bytes(model, config, device, dtype)
    if device.type == "cuda":
        _, total = torch.cuda.mem_get_info(device)
        pool, utilization, weights_in_pool = total, config.gpu_memory_utilization, True
    else:
        from engine.host_memory import available_bytes  # within the cgroup's MemoryMax

        pool, utilization = available_bytes(), config.cpu_memory_utilization
        weights_in_pool = False  # already loaded: no longer in "available"
    plan = plan_memory(
        device=device.type, pool_bytes=pool, utilization=utilization,
        weight_bytes=model_bytes(model), activation_bytes=activation,
        bytes_per_block=PagedKVCache.bytes_per_block(
            c.num_layers, config.block_size, c.num_kv_heads, c.head_dim, cache_dtype),
        block_size=config.block_size, max_model_len=max_model_len,
        max_num_seqs=config.max_num_seqs, weights_in_pool=weights_in_pool,
        num_blocks_override=config.num_kv_blocks,
    )
    for line in plan.log_lines():
        log.info("%s", line)
    return plan


def allocate_kv_cache(model: torch.nn.Module, plan: MemoryPlan, config: EngineConfig,
                      device: torch.device, dtype: torch.dtype,
                      kv_scales: tuple[list[float], list[float]] | None) -> PagedKVCache:
    c = model.config
    k_scales, v_scales = kv_scales if kv_scales is not None else (None, None)
    return PagedKVCache(
        c.num_layers, plan.num_blocks, config.block_size, c.num_kv_heads, c.head_dim, dtype,
        device, kv_cache_dtype=config.kv_cache_dtype, k_scales=k_scales, v_scales=v_scales,
    )
