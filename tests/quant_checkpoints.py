"""Quantized tiny-Llama checkpoints written by the tools' own code, for the fp8 / int8 /
bitsandbytes loader tests.

- compressed-tensors (fp8 ``float-quantized``, int8 ``int-quantized``): scales from its
  ``calculate_qparams`` (weights: min/max of the weight; static inputs: min/max of the layer
  inputs on a calibration prompt, as its static min-max observer does), tensors from its
  ``FloatQuantizationCompressor`` / ``IntQuantizationCompressor``, config from its
  ``QuantizationConfig.to_dict()``.
- bitsandbytes: ``quantize_4bit`` / ``int8_vectorwise_quant`` and ``QuantState.as_dict(packed=True)``
  under ``P.weight.`` as transformers' ``Linear4bit`` saves them; config from transformers'
  ``BitsAndBytesConfig.to_dict()``.
- AutoFP8 (not installed): built per docs FORMATS.md (scalar scales = amax / 448).
"""

from __future__ import annotations

import json
import shutil
from functools import cache
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from engine.kv_cache import PagedKVCache
from engine.layers.attention import AttentionMetadata
from engine.layers.linear import Linear
from engine.loader import load_model
from tests.checkpoints import tiny_checkpoint

LINEAR_NAMES = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
BLOCK_SIZE = 4


def source() -> Path:
    return tiny_checkpoint("llama")


@cache
def source_tensors() -> dict[str, torch.Tensor]:
    return load_file(str(source() / "model.safetensors"))


def linear_prefixes(num_layers: int = 2) -> list[str]:
    return [f"model.layers.{i}.{n}" for i in range(num_layers) for n in LINEAR_NAMES]


def write_checkpoint(dest: Path, tensors: dict[str, torch.Tensor], quant_config: dict[str, Any] | None) -> Path:
    """The tiny Llama's files with ``tensors`` and ``quantization_config`` replaced."""
    dest.mkdir(parents=True, exist_ok=True)
    for file in source().iterdir():
        if file.name != "model.safetensors":
            shutil.copy(file, dest / file.name)
    config = json.loads((source() / "config.json").read_text())
    config.pop("quantization_config", None)
    if quant_config is not None:
        config["quantization_config"] = quant_config
    (dest / "config.json").write_text(json.dumps(config))
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(dest / "model.safetensors"))
    return dest


# -- running a model ------------------------------------------------------------------------


def prompt_ids(n: int = 24, seed: int = 0) -> list[int]:
    vocab = json.loads((source() / "config.json").read_text())["vocab_size"]
    return torch.randint(3, vocab, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@torch.inference_mode()
def logits(model: torch.nn.Module, ids: list[int]) -> torch.Tensor:
    """Float32 logits ``[len(ids), vocab]`` (on the CPU) of one sequence's prefill, on the
    model's device and in its dtype."""
    c = model.config
    norm = model.model.norm.weight
    device, dtype = norm.device, norm.dtype
    blocks = -(-len(ids) // BLOCK_SIZE)
    kv = PagedKVCache(c.num_layers, blocks, BLOCK_SIZE, c.num_kv_heads, c.head_dim, dtype, device)
    kv.bind(model)
    meta = AttentionMetadata.build([len(ids)], [len(ids)], [list(range(blocks))], BLOCK_SIZE, device)
    hidden = model(torch.tensor(ids, device=device), torch.arange(len(ids), device=device), meta)
    return model.compute_logits(hidden).float().cpu()


@cache
def fp32_model() -> torch.nn.Module:
    return load_model(source(), torch.float32, "cpu")


@cache
def input_ranges() -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per linear layer, (min, max) of its input over a calibration prompt (fp32 model)."""
    model, ranges, hooks = fp32_model(), {}, []
    for name, module in model.named_modules():
        if isinstance(module, Linear) and name != "lm_head":
            def hook(_m, args, _out, name=name):
                ranges[name] = (args[0].amin(), args[0].amax())
            hooks.append(module.register_forward_hook(hook))
    logits(model, prompt_ids(32, seed=123))
    for h in hooks:
        h.remove()
    return ranges


# -- compressed-tensors ---------------------------------------------------------------------


def ct_scheme(kind: str, weight_strategy: str, dynamic: bool | None) -> Any:
    """``kind`` "float" | "int"; ``dynamic`` None: weight-only."""
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    weights = QuantizationArgs(num_bits=8, type=kind, symmetric=True, strategy=weight_strategy)
    acts = None
    if dynamic is not None:
        acts = QuantizationArgs(num_bits=8, type=kind, symmetric=True,
                                strategy="token" if dynamic else "tensor", dynamic=dynamic)
    return QuantizationScheme(targets=["Linear"], weights=weights, input_activations=acts)


def ct_checkpoint(dest: Path, kind: str, weight_strategy: str, dynamic: bool | None,
                  ignore: tuple[str, ...] = ("lm_head",), extra: dict[str, torch.Tensor] | None = None) -> Path:
    from compressed_tensors.compressors.naive_quantized import (
        FloatQuantizationCompressor,
        IntQuantizationCompressor,
    )
    from compressed_tensors.quantization import QuantizationConfig
    from compressed_tensors.quantization.utils import calculate_qparams
    from compressed_tensors.utils.match import match_name

    scheme = ct_scheme(kind, weight_strategy, dynamic)
    compressor = FloatQuantizationCompressor if kind == "float" else IntQuantizationCompressor
    tensors = dict(source_tensors())
    for prefix in linear_prefixes():
        if any(match_name(prefix, entry) for entry in ignore):
            continue
        w = tensors.pop(f"{prefix}.weight")
        dims = dict(dim=1, keepdim=True) if weight_strategy == "channel" else {}
        scale, zp = calculate_qparams(w.amin(**dims), w.amax(**dims), scheme.weights)
        layer = {"weight": w, "weight_scale": scale, "weight_zero_point": zp}
        if dynamic is False:
            lo, hi = input_ranges()[prefix]
            layer["input_scale"], layer["input_zero_point"] = calculate_qparams(lo, hi, scheme.input_activations)
        for name, tensor in compressor.compress(layer, scheme).items():
            tensors[f"{prefix}.{name}"] = tensor
    tensors.update(extra or {})
    fmt = "float-quantized" if kind == "float" else "int-quantized"
    config = QuantizationConfig(config_groups={"group_0": scheme}, format=fmt, ignore=list(ignore))
    return write_checkpoint(dest, tensors, config.to_dict())


def ct_reference_weight(path: Path, prefix: str, kind: str, weight_strategy: str) -> torch.Tensor:
    """compressed-tensors' own decompression of one layer's weight (float32 [N, K])."""
    from compressed_tensors.compressors.naive_quantized import NaiveQuantizationCompressor

    stored = load_file(str(path / "model.safetensors"))
    layer = {n: stored[f"{prefix}.{n}"] for n in ("weight", "weight_scale")}
    scheme = ct_scheme(kind, weight_strategy, True)
    return NaiveQuantizationCompressor.decompress(layer, scheme)["weight"].float()


# -- AutoFP8 (legacy quant_method "fp8") -----------------------------------------------------


def autofp8_checkpoint(dest: Path, static: bool, block: tuple[int, int] | None = None) -> Path:
    """Per-tensor scalar scales (or ``block``-wise ``weight_scale_inv``), ``k_proj`` /
    ``v_proj.output_scale`` for the KV cache when static."""
    tensors = dict(source_tensors())
    for prefix in linear_prefixes():
        w = tensors.pop(f"{prefix}.weight")
        if block is None:
            scale = w.abs().amax() / 448.0
            tensors[f"{prefix}.weight"] = (w / scale).clamp(-448, 448).to(torch.float8_e4m3fn)
            tensors[f"{prefix}.weight_scale"] = scale.reshape(())
        else:
            bn, bk = block
            n, k = w.shape
            blocks = w.reshape(n // bn, bn, k // bk, bk)
            scale = blocks.abs().amax(dim=(1, 3)) / 448.0  # [N/bn, K/bk]
            q = (blocks / scale[:, None, :, None]).clamp(-448, 448).to(torch.float8_e4m3fn)
            tensors[f"{prefix}.weight"] = q.reshape(n, k)
            tensors[f"{prefix}.weight_scale_inv"] = scale
        if static:
            tensors[f"{prefix}.input_scale"] = (input_ranges()[prefix][1].abs().max() / 448.0).reshape(())
        if static and prefix.endswith(("k_proj", "v_proj")):
            tensors[f"{prefix}.output_scale"] = torch.tensor(0.05)
    config = {"quant_method": "fp8", "activation_scheme": "static" if static else "dynamic",
              "ignored_layers": ["lm_head"]}
    if block is not None:
        config["weight_block_size"] = list(block)
    return write_checkpoint(dest, tensors, config)


# -- bitsandbytes -----------------------------------------------------------------------------


def bnb_checkpoint(dest: Path, quant_type: str, double_quant: bool = False) -> Path:
    """``quant_type`` "nf4" | "fp4" | "int8", saved as transformers saves bnb layers."""
    import bitsandbytes.functional as bf
    from transformers import BitsAndBytesConfig

    tensors = dict(source_tensors())
    for prefix in linear_prefixes():
        w = tensors.pop(f"{prefix}.weight")
        if quant_type == "int8":
            cb, scb, _ = bf.int8_vectorwise_quant(w.to(torch.float16))
            tensors.update({f"{prefix}.weight": cb, f"{prefix}.SCB": scb,
                            f"{prefix}.weight_format": torch.tensor(0, dtype=torch.uint8)})
            continue
        q, state = bf.quantize_4bit(w, blocksize=64, quant_type=quant_type,
                                    compress_statistics=double_quant, quant_storage=torch.uint8)
        tensors[f"{prefix}.weight"] = q
        for name, tensor in state.as_dict(packed=True).items():
            tensors[f"{prefix}.weight.{name}"] = tensor
    if quant_type == "int8":
        config = BitsAndBytesConfig(load_in_8bit=True)
    else:
        config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quant_type,
                                    bnb_4bit_use_double_quant=double_quant)
    return write_checkpoint(dest, tensors, config.to_dict())


def bnb_reference_weight(path: Path, prefix: str) -> torch.Tensor:
    """bitsandbytes' own dequantization of one saved layer (float32 [N, K])."""
    import bitsandbytes.functional as bf

    stored = load_file(str(path / "model.safetensors"))
    if f"{prefix}.SCB" in stored:
        return bf.int8_vectorwise_dequant(stored[f"{prefix}.weight"], stored[f"{prefix}.SCB"])
    parts = {k[len(prefix) + len(".weight."):]: v for k, v in stored.items()
             if k.startswith(f"{prefix}.weight.")}
    state = bf.QuantState.from_dict(parts, device=torch.device("cpu"))
    return bf.dequantize_4bit(stored[f"{prefix}.weight"], state).float()


def fake_quant_model(weights: dict[str, torch.Tensor]) -> torch.nn.Module:
    """The fp32 model with these layers' weights replaced (e.g. by a reference dequantization)."""
    import copy

    model = copy.deepcopy(fp32_model())
    for prefix, w in weights.items():
        model.get_submodule(prefix).weight.data = w.float().clone()
    return model


def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    """Relative L2 error ||got - ref|| / ||ref||; NaN anywhere reads as infinite."""
    if not bool(torch.isfinite(got).all()):
        return float("inf")
    return float((got.float() - ref.float()).norm() / ref.float().norm())
