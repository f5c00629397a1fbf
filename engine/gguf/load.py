"""Build our model from a GGUF file: every parameter filled exactly once, nothing left over.

Plain tensors (norms, F32/F16/BF16 weights) become parameters; a block-quantized weight of a
linear layer becomes a ``GGUFLinearMethod`` layer (group-wise ints, not requantized); a
block-quantized token embedding is dequantized once (a lookup table has no matmul to save).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from engine.config import ModelConfig
from engine.gguf.cpu import bind_gguf_cpu, bind_tied_head_cpu
from engine.gguf.linear import GGUFQuantConfig
from engine.gguf.mapping import gguf_names, rotary_rows, unpermute_rows
from engine.gguf.reader import ROPE_FREQS, GGUFCheckpoint, plain_values
from engine.gguf.types import GROUP_TYPES, PLAIN_TYPES, to_group_affine
from engine.layers.linear import Linear
from engine.loader import tensor_name_problem
from engine.models import get_model_class
from engine.quantization.base import TensorSet

if TYPE_CHECKING:
    from engine.api import EngineConfig
    from engine.engine_builder import LoadedModel

log = logging.getLogger(__name__)


def load_gguf_for(config: EngineConfig) -> LoadedModel:
    """``engine_builder.load_model_for`` for a GGUF file: tokenizer, model, device, dtype."""
    from engine.device import resolve_device, resolve_dtype
    from engine.engine_builder import LoadedModel
    from engine.quantization import normalise_method
    from engine.tokenizer import Tokenizer

    if normalise_method(config.quantization) is not None:
        raise ValueError(
            f"--quantization {config.quantization}: a GGUF file carries its own quantization; "
            "leave --quantization unset"
        )
    ck = GGUFCheckpoint(config.model_path)
    model_config = ck.model_config()
    device = resolve_device(config.device)
    blocks = gguf_quant_config(ck, model_config) is not None  # int kernels for its blocks
    dtype = resolve_dtype(config.dtype, model_config.torch_dtype, device, blocks)
    tokenizer = Tokenizer(ck.hf_tokenizer(), extra_eos_token_ids=tuple(model_config.eos_token_ids))
    model, quant = load_gguf_model(ck, dtype, device, model_config)
    return LoadedModel(tokenizer, model, device, dtype, None, quant.describe() if quant else "none")


def gguf_quant_config(ck: GGUFCheckpoint, config: ModelConfig, runtime: str = "auto",
                      quantized_tied_head: bool = False) -> GGUFQuantConfig | None:
    """The linear layers whose GGUF weight is block-quantized, by our layer name.
    ``quantized_tied_head``: a head tied to a block-quantized token embedding is one of them
    too (it multiplies the embedding's blocks; the embedding keeps its dequantized table)."""
    with torch.device("meta"):
        model = get_model_class(config.architecture)(config, None)
    linears = [n for n, m in model.named_modules() if isinstance(m, Linear)]
    mapped = _layer_names(ck, config, [f"{n}.weight" for n in linears], quantized_tied_head)
    types = {
        n: ck.tensor_type(mapped[f"{n}.weight"])
        for n in linears
        if mapped[f"{n}.weight"] in ck.tensors and ck.tensor_type(mapped[f"{n}.weight"]) in GROUP_TYPES
    }
    return GGUFQuantConfig(types, runtime) if types else None


def _layer_names(ck: GGUFCheckpoint, config: ModelConfig, names: list[str], tied_head: bool) -> dict[str, str]:
    """``gguf_names``, with a tied head read from the token embedding when ``tied_head``."""
    mapped = gguf_names(ck.architecture, names, config.num_layers)
    head = mapped.get("lm_head.weight")
    if tied_head and config.tie_word_embeddings and head is not None and head not in ck.tensors:
        mapped["lm_head.weight"] = gguf_names(ck.architecture, ["model.embed_tokens.weight"],
                                              config.num_layers)["model.embed_tokens.weight"]
    return mapped


def _quantizes_tied_head(device: torch.device, dtype: torch.dtype) -> bool:
    """A CPU serving in half precision multiplies a block-quantized tied head as blocks
    (int4 kernels read a third to a half of the bf16 table's bytes); elsewhere the head
    stays tied to the dequantized embedding (float32: exact; GPU: as the loader tests)."""
    return device.type == "cpu" and dtype in (torch.bfloat16, torch.float16)


def load_gguf_model(
    ck: GGUFCheckpoint | str | Path,
    dtype: torch.dtype,
    device: torch.device | str,
    config: ModelConfig | None = None,
    runtime: str = "auto",
) -> tuple[torch.nn.Module, GGUFQuantConfig | None]:
    """Our model with the weights of the GGUF file ``ck``, in ``dtype`` on ``device``;
    ``runtime`` picks the quantized layers' buffers (``GGUFLinearMethod``)."""
    started = time.monotonic()
    ck = ck if isinstance(ck, GGUFCheckpoint) else GGUFCheckpoint(ck)
    device = torch.device(device)
    config = config or ck.model_config()
    tied_head = _quantizes_tied_head(device, dtype)
    quant = gguf_quant_config(ck, config, runtime, tied_head)
    with torch.device("meta"):
        model = get_model_class(config.architecture)(config, quant)
    params = dict(model.named_parameters())
    quant_layers = {n: m for n, m in model.named_modules() if isinstance(m, Linear) and m.quantized}
    wanted = list(params)
    for prefix, layer in quant_layers.items():
        wanted += [f"{prefix}.weight"] + ([f"{prefix}.bias"] if layer.has_bias else [])
    mapped = _layer_names(ck, config, wanted, tied_head and "lm_head" in quant_layers)
    _check_names(ck, mapped, config)

    layer_tensors: dict[str, dict[str, torch.Tensor]] = {p: {} for p in quant_layers}
    for name in wanted:
        gname = mapped[name]
        prefix, _, leaf = name.rpartition(".")
        if prefix in quant_layers:
            if leaf == "weight":
                ga = to_group_affine(_rows(ck, gname, config), ck.tensor_type(gname),
                                     _matrix_shape(ck, gname), gname)
                layer_tensors[prefix].update(q=ga.q, scales=ga.scales, mins=ga.mins)
            else:
                layer_tensors[prefix]["bias"] = torch.from_numpy(_float(ck, gname, config))
            continue
        expected = tuple(params[name].shape)
        value = torch.from_numpy(_float(ck, gname, config))
        if tuple(value.shape) != expected:
            raise ValueError(f"{ck.path}: tensor {gname!r} has shape {list(value.shape)}, but the "
                             f"config implies {list(expected)} for {name}")
        _assign(model, name, value.to(device=device, dtype=dtype))
    for prefix, layer in quant_layers.items():
        tensors = TensorSet(prefix, layer_tensors.pop(prefix))
        layer.quant_method.load(layer, tensors, device, dtype)
        tensors.finish()
    if device.type == "cpu":
        bind_gguf_cpu(quant_layers.values(), dtype)  # kernels or dense, once: engine.gguf.cpu
        if "lm_head" in quant_layers and config.tie_word_embeddings:
            bind_tied_head_cpu(quant_layers["lm_head"], model.model.embed_tokens.weight)

    model.tie_weights()
    still_meta = [n for n, p in model.named_parameters() if p.is_meta]
    assert not still_meta, f"parameters left unfilled: {still_meta}"
    model.eval()
    log.info("loaded %s (%s, %d layers) from GGUF %s (%s) as %s on %s in %.2fs",
             config.architecture, ck.architecture, config.num_layers, ck.path, ck.describe_types(),
             quant.describe() if quant else "plain weights", device, time.monotonic() - started)
    return model, quant


def _check_names(ck: GGUFCheckpoint, mapped: dict[str, str], config: ModelConfig) -> None:
    missing = sorted(g for g in mapped.values() if g not in ck.tensors)
    used = set(mapped.values())
    tied_head = config.tie_word_embeddings and "output.weight" in ck.tensors
    read_apart = {ROPE_FREQS} if config.rope.rope_type == "freq_factors" else set()  # by the config
    unexpected = sorted(n for n in ck.tensors if n not in used and n not in read_apart
                        and not (tied_head and n == "output.weight"))
    problem = tensor_name_problem(missing, unexpected)
    if problem:
        raise ValueError(f"GGUF file {ck.path} does not match its config ({config.architecture}, "
                         f"{config.num_layers} layers): {problem}")


def _matrix_shape(ck: GGUFCheckpoint, name: str) -> tuple[int, int]:
    shape = ck.shape(name)
    if len(shape) != 2:
        raise ValueError(f"{ck.path}: tensor {name!r} has shape {list(shape)}, expected a matrix")
    return shape[0], shape[1]


def _rows(ck: GGUFCheckpoint, name: str, config: ModelConfig) -> np.ndarray:
    """The stored rows (block bytes or values), in our row order (Q/K un-permuted)."""
    data = ck.raw(name)
    heads = rotary_rows(name, ck.architecture, config.num_heads, config.num_kv_heads)
    return data if heads is None else unpermute_rows(data, heads)


def _float(ck: GGUFCheckpoint, name: str, config: ModelConfig) -> np.ndarray:
    """A tensor as float32 in torch order: plain values, or blocks dequantized once."""
    ggml_type = ck.tensor_type(name)
    if ggml_type in PLAIN_TYPES:
        values = plain_values(ck, name)
        heads = rotary_rows(name, ck.architecture, config.num_heads, config.num_kv_heads)
        return values if heads is None else np.ascontiguousarray(unpermute_rows(values, heads))
    ga = to_group_affine(_rows(ck, name, config), ggml_type, _matrix_shape(ck, name), name)
    return ga.dequantize().numpy()


def _assign(model: torch.nn.Module, name: str, tensor: torch.Tensor) -> None:
    module_name, _, attr = name.rpartition(".")
    setattr(model.get_submodule(module_name), attr, torch.nn.Parameter(tensor, requires_grad=False))
