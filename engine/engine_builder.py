"""Build what the engine loop runs on, once, at start.

``load_model_for``: tokenizer and model for a config (device, dtype, quantization
method, fp8 KV scales). ``build_core``: the context length, the KV memory plan and
cache, CUDA graphs for decode, the model runner, block manager and scheduler.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from engine.api import EngineConfig
from engine.block_manager import BlockManager
from engine.cpu_graphs import CpuDecodeGraph, cpu_decode_graph
from engine.cuda_graphs import DecodeGraphs
from engine.kv_setup import allocate_kv_cache, load_kv_scales, plan_kv_cache
from engine.layers.cpu_fusion import fuse_cpu_projections
from engine.layers.cpu_linear import pack_cpu_linears
from engine.memory import MemoryPlan
from engine.model_runner import ModelRunner
from engine.scheduler import Scheduler
from engine.tensor_files import reading_checkpoint
from engine.tokenizer import Tokenizer

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LoadedModel:
    tokenizer: Tokenizer
    model: torch.nn.Module
    device: torch.device
    dtype: torch.dtype
    kv_scales: tuple[list[float], list[float]] | None  # the checkpoint's fp8 KV scales, if any
    quantization: str  # the weights' method as loaded, "none" without one


@dataclass(frozen=True)
class EngineCore:
    max_model_len: int
    vocab_size: int
    memory_plan: MemoryPlan
    runner: ModelRunner
    block_manager: BlockManager
    scheduler: Scheduler


INT_KERNEL_METHODS = ("awq", "gptq")  # CPU int4/int8 kernels in bf16 (engine.quantization.cpu_bind)


def load_model_for(config: EngineConfig) -> LoadedModel:
    """Resolve device, dtype and quantization for ``config``; load tokenizer and model."""
    from engine.config import ModelConfig
    from engine.device import resolve_device, resolve_dtype
    from engine.gguf import is_gguf_path
    from engine.loader import load_model
    from engine.quantization import resolve as resolve_quantization

    if is_gguf_path(config.model_path):  # config, tokenizer and weights from one GGUF file
        from engine.gguf.load import load_gguf_for

        return load_gguf_for(config)
    device = resolve_device(config.device)
    model_config = ModelConfig.from_pretrained(config.model_path)
    quant = resolve_quantization(
        config.quantization, config.model_path, model_config.quantization_config,
        {"bnb_quant_type": config.bnb_quant_type},
    )
    int_weights = quant is not None and quant.name in INT_KERNEL_METHODS
    dtype = resolve_dtype(config.dtype, model_config.torch_dtype, device, int_weights)
    tokenizer = Tokenizer.from_pretrained(
        config.model_path, extra_eos_token_ids=tuple(model_config.eos_token_ids)
    )
    with reading_checkpoint():  # a state-dict file is unpickled once for both
        model = load_model(config.model_path, dtype, device, config=model_config, quant=quant)
        kv_scales = load_kv_scales(config.model_path, model_config.num_layers)
    return LoadedModel(tokenizer, model, device, dtype, kv_scales,
                       quant.describe() if quant is not None else "none")


def resolve_max_model_len(config: EngineConfig, model: torch.nn.Module) -> int:
    """``config.max_model_len`` if set (at most the model's), else the model's, capped
    by ``config.max_model_len_limit``."""
    model_max = int(model.config.max_position_embeddings)
    if config.max_model_len is not None and config.max_model_len > model_max:
        raise ValueError(
            f"max_model_len {config.max_model_len} exceeds the model's "
            f"max_position_embeddings {model_max}"
        )
    return config.max_model_len or min(model_max, config.max_model_len_limit or model_max)


def build_core(
    config: EngineConfig,
    model: torch.nn.Module,
    device: torch.device,
    dtype: torch.dtype,
    kv_scales: tuple[list[float], list[float]] | None = None,
) -> EngineCore:
    """Plan memory and allocate the paged KV cache once (``engine.kv_setup``); capture
    decode graphs on CUDA, or compile the CPU decode step in half precision, unless
    ``enforce_eager``."""
    max_model_len = resolve_max_model_len(config, model)
    vocab_size = int(model.config.vocab_size)
    if device.type == "cpu":  # before the plan: a tied head's packed copy takes memory
        fuse_cpu_projections(model, dtype)
        pack_cpu_linears(model)
    memory_plan = plan_kv_cache(model, config, device, dtype, max_model_len)
    kv_cache = allocate_kv_cache(model, memory_plan, config, device, dtype, kv_scales)
    graphs: DecodeGraphs | CpuDecodeGraph | None = None
    if device.type == "cuda" and not config.enforce_eager:
        graphs = DecodeGraphs(model, model.config.hidden_size, dtype, device,
                              config.max_num_seqs, max_model_len, config.block_size)
    elif device.type == "cpu" and not config.enforce_eager:
        kv_cache.bind(model)  # (the runner binds it too) the graph's warm-up step needs it
        graphs = cpu_decode_graph(model, kv_cache, dtype)  # half precision only
    runner = ModelRunner(model, kv_cache, device, seed=config.seed, graphs=graphs)
    block_manager = BlockManager(
        memory_plan.num_blocks, config.block_size,
        project_shares=dict(config.project_shares) or None,
        enable_prefix_caching=config.enable_prefix_caching,
    )
    scheduler = Scheduler(config.max_num_seqs, config.max_num_batched_tokens, block_manager)
    shares = ", ".join(
        f"{p} {block_manager.share_blocks(p) * config.block_size} tokens"
        for p, _ in config.project_shares
    )
    log.info("KV tokens per project (share): %s", shares or "one pool, shared by the "
             "projects as they appear")
    return EngineCore(max_model_len, vocab_size, memory_plan, runner, block_manager, scheduler)
