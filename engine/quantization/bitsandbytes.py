"""bitsandbytes: pre-quantized 4-bit (NF4/FP4, with or without double quantization) and
8-bit (LLM.int8) checkpoints as transformers saves them, and plain models quantized while
loading (``--bnb_quant_type nf4|fp4|int8``). The bitsandbytes library does the work: its
``QuantState.from_dict`` rebuilds a saved 4-bit state, ``matmul_4bit`` / ``matmul`` multiply
(its CPU backend included). If its matmul fails on a device, the layer dequantizes with the
library and multiplies in torch instead (logged once).

Tensors of a layer P (see docs FORMATS.md): 4-bit ``P.weight`` uint8 ``[ceil(N*K/2), 1]``,
``P.weight.absmax``, ``P.weight.quant_map``, optionally ``P.weight.nested_absmax`` and
``P.weight.nested_quant_map``, and ``P.weight.quant_state.bitsandbytes__<nf4|fp4>`` (JSON
bytes); 8-bit ``P.weight`` int8 ``[N, K]``, ``P.SCB`` float32 ``[N]``, ``P.weight_format``.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.nn.functional as F

from deploy_kernels.log_once import log_fallback_once, log_once
from engine.layers.linear import Linear
from engine.quantization.base import (
    QuantConfig,
    QuantFormatError,
    QuantLinearMethod,
    TensorSet,
)
from engine.quantization.compressed_tensors import FLOAT_DTYPES, set_buffer, take_bias

log = logging.getLogger(__name__)

QUANT_TYPES = ("nf4", "fp4", "int8")
BLOCKSIZE = 64  # transformers' 4-bit block size
DEFAULT_THRESHOLD = 6.0  # transformers' llm_int8_threshold
_STATE_KEY = "weight.quant_state.bitsandbytes__"
_NO_BNB_MATMUL: set[str] = set()  # device types where bitsandbytes' matmul failed


def _bnb() -> Any:
    try:
        import bitsandbytes
    except ImportError as exc:
        raise QuantFormatError(
            "bitsandbytes quantization needs the bitsandbytes package (pip install bitsandbytes)"
        ) from exc
    return bitsandbytes


class BitsAndBytesConfig(QuantConfig):
    name = "bitsandbytes"

    def __init__(self, quant_type: str, pre_quantized: bool, skip: tuple[str, ...] = (),
                 threshold: float = DEFAULT_THRESHOLD) -> None:
        self.quant_type, self.pre_quantized = quant_type, pre_quantized
        self.skip, self.threshold = skip, threshold

    @classmethod
    def from_checkpoint(cls, raw: dict[str, Any] | None, source: str, flag_options: dict[str, Any]) -> BitsAndBytesConfig:
        _bnb()
        if raw is None:
            quant_type = flag_options.get("bnb_quant_type", "nf4")
            if quant_type not in QUANT_TYPES:
                raise QuantFormatError(f"--bnb_quant_type {quant_type!r}; expected nf4, fp4 or int8")
            return cls(quant_type, pre_quantized=False)
        four = bool(raw.get("load_in_4bit", raw.get("_load_in_4bit", False)))
        eight = bool(raw.get("load_in_8bit", raw.get("_load_in_8bit", False)))
        if four == eight:
            raise QuantFormatError(
                f"{source}: exactly one of 'load_in_4bit' and 'load_in_8bit' must be true "
                f"(got {four} and {eight})"
            )
        quant_type = "int8"
        if four:
            quant_type = raw.get("bnb_4bit_quant_type", "fp4")  # transformers' default
            if quant_type not in ("nf4", "fp4"):
                raise QuantFormatError(f"{source}: 'bnb_4bit_quant_type' {quant_type!r}; expected nf4 or fp4")
            storage = raw.get("bnb_4bit_quant_storage", "uint8")
            if storage != "uint8":
                raise QuantFormatError(f"{source}: 'bnb_4bit_quant_storage' {storage!r}; only uint8 is supported")
        elif raw.get("llm_int8_has_fp16_weight"):
            raise QuantFormatError(f"{source}: 'llm_int8_has_fp16_weight' true is not supported")
        skip = raw.get("llm_int8_skip_modules") or []
        if not isinstance(skip, list) or not all(isinstance(s, str) for s in skip):
            raise QuantFormatError(f"{source}: 'llm_int8_skip_modules' must be a list of module names")
        threshold = raw.get("llm_int8_threshold", DEFAULT_THRESHOLD)
        if not isinstance(threshold, (int, float)) or threshold < 0:
            raise QuantFormatError(f"{source}: 'llm_int8_threshold' must be a number >= 0, got {threshold!r}")
        return cls(quant_type, pre_quantized=True, skip=tuple(skip), threshold=float(threshold))

    def quantizes(self, prefix: str) -> bool:
        # transformers' rule: a skip entry names the module or a dotted part of its name
        return super().quantizes(prefix) and not any(f".{s}." in f".{prefix}." for s in self.skip)

    def linear_method(self, prefix: str) -> BitsAndBytesLinearMethod:
        return BitsAndBytesLinearMethod(self.quant_type, self.pre_quantized, self.threshold)

    def describe(self) -> str:
        how = "pre-quantized" if self.pre_quantized else "quantized at load time"
        return f"bitsandbytes {self.quant_type} ({how})"


class BitsAndBytesLinearMethod(QuantLinearMethod):
    def __init__(self, quant_type: str, pre_quantized: bool, threshold: float = DEFAULT_THRESHOLD) -> None:
        self.quant_type, self.pre_quantized, self.threshold = quant_type, pre_quantized, threshold

    def load(self, layer: Linear, tensors: TensorSet, device: torch.device, dtype: torch.dtype) -> None:
        bnb = _bnb()
        n, k = layer.out_features, layer.in_features
        if not self.pre_quantized:
            w = tensors.take("weight", shape=(n, k), dtypes=FLOAT_DTYPES).to(device)
            if self.quant_type == "int8":  # like transformers' Int8Params: from fp16
                weight, scb, _ = bnb.functional.int8_vectorwise_quant(w.to(torch.float16).contiguous())
            else:  # from the weight as stored: the same codes on every device and dtype
                weight, state = bnb.functional.quantize_4bit(
                    w.contiguous(), blocksize=BLOCKSIZE, quant_type=self.quant_type,
                    quant_storage=torch.uint8,
                )
        elif self.quant_type == "int8":
            weight = tensors.take("weight", shape=(n, k), dtypes=(torch.int8,)).to(device)
            scb = tensors.take("SCB", shape=(n,), dtypes=FLOAT_DTYPES).to(device, torch.float32)
            fmt = tensors.take("weight_format", optional=True)
            if fmt is not None and (fmt.numel() != 1 or int(fmt.item()) != 0):
                raise QuantFormatError(
                    f"tensor {tensors.prefix}.weight_format is {fmt.tolist()}; only 0 (row-major) is supported"
                )
        else:
            weight, state = _load_4bit(bnb, tensors, self.quant_type, n, k, device)
        take_bias(layer, tensors, device, dtype)
        set_buffer(layer, "weight", weight)
        if self.quant_type == "int8":
            set_buffer(layer, "SCB", scb)
            layer.bnb_state = _int8_state(bnb, weight, scb, self.threshold)
        else:
            state.dtype = dtype  # dequantize straight into the activation dtype
            layer.quant_state = state
            # the state's tensors as buffers too: counted in the weight bytes, moved by .to()
            set_buffer(layer, "weight_absmax", state.absmax)
            if state.nested:
                set_buffer(layer, "weight_nested_absmax", state.state2.absmax)

    def apply(self, layer: Linear, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        device = x.device.type
        if device not in _NO_BNB_MATMUL:
            try:
                y = self._bnb_matmul(layer, x2)
            except (RuntimeError, NotImplementedError) as exc:
                if isinstance(exc, torch.OutOfMemoryError):
                    raise
                _NO_BNB_MATMUL.add(device)
                log_fallback_once(
                    f"bnb-dequant-{device}",
                    "bitsandbytes: its matmul failed on %s (%s); dequantize + torch matmul instead",
                    device, exc,
                )
            else:
                log_once(log, f"bnb-{self.quant_type}-{device}", "bitsandbytes %s: %s on %s",
                          self.quant_type, "matmul (LLM.int8)" if self.quant_type == "int8" else "matmul_4bit", device)
                return y.reshape(*shape[:-1], y.shape[-1])
        y = F.linear(x2, self.dequantize(layer).to(x.dtype), layer.bias)
        return y.reshape(*shape[:-1], y.shape[-1])

    def _bnb_matmul(self, layer: Linear, x: torch.Tensor) -> torch.Tensor:
        bnb = _bnb()
        if self.quant_type != "int8":
            return bnb.matmul_4bit(x, layer.weight.t(), quant_state=layer.quant_state, bias=layer.bias).to(x.dtype)
        # LLM.int8 quantizes fp16 inputs (it casts others itself, with a warning per call)
        y = bnb.matmul(x.to(torch.float16), layer.weight, state=layer.bnb_state, threshold=self.threshold)
        y = y.to(x.dtype)
        return y if layer.bias is None else y + layer.bias

    def dequantize(self, layer: Linear) -> torch.Tensor:
        """The layer's weight ``[N, K]`` as bitsandbytes dequantizes it (float32 for int8)."""
        functional = _bnb().functional
        if self.quant_type == "int8":
            return functional.int8_vectorwise_dequant(layer.weight, layer.SCB)
        return functional.dequantize_4bit(layer.weight, layer.quant_state)


def _load_4bit(bnb: Any, tensors: TensorSet, quant_type: str, n: int, k: int, device: torch.device) -> tuple[torch.Tensor, Any]:
    """The packed weight and its ``QuantState``, rebuilt from the saved tensors."""
    prefix = tensors.prefix
    key = _STATE_KEY + quant_type
    others = [name for name in tensors.names() if name.startswith(_STATE_KEY) and name != key]
    if others:
        raise QuantFormatError(
            f"tensor {prefix}.{others[0]} does not match the config's bnb_4bit_quant_type {quant_type!r}"
        )
    if not tensors.has(key):
        raise QuantFormatError(
            f"missing tensor {prefix}.{key} (the 4-bit quant state); is this a bitsandbytes "
            "4-bit checkpoint saved by transformers?"
        )
    weight = tensors.take("weight", shape=((n * k + 1) // 2, 1), dtypes=(torch.uint8,)).to(device)
    packed = tensors.take(key, dtypes=(torch.uint8,))
    try:
        meta = bnb.utils.unpack_tensor_to_dict(packed)
    except (UnicodeDecodeError, ValueError) as exc:
        raise QuantFormatError(f"tensor {prefix}.{key} is not a JSON quant state ({exc})") from exc
    nested = "nested_blocksize" in meta
    absmax_dtype = torch.uint8 if nested else torch.float32
    parts = {key: packed, "absmax": tensors.take("weight.absmax", dtypes=(absmax_dtype,))}
    parts["quant_map"] = tensors.take("weight.quant_map", shape=(16,), dtypes=(torch.float32,))
    if nested:
        parts["nested_absmax"] = tensors.take("weight.nested_absmax", dtypes=(torch.float32,))
        parts["nested_quant_map"] = tensors.take("weight.nested_quant_map", shape=(256,), dtypes=(torch.float32,))
    try:
        state = bnb.functional.QuantState.from_dict(parts, device=device)
    except (AssertionError, KeyError, TypeError, ValueError, AttributeError) as exc:
        raise QuantFormatError(f"tensor {prefix}.{key}: cannot rebuild the quant state ({exc!r})") from exc
    if tuple(state.shape) != (n, k) or state.quant_type != quant_type:
        raise QuantFormatError(
            f"tensor {prefix}.{key} describes a {state.quant_type} weight of shape "
            f"{list(state.shape)}; expected {quant_type} [{n}, {k}]"
        )
    blocks = -(-n * k // state.blocksize)
    if state.absmax.numel() != blocks:
        raise QuantFormatError(
            f"tensor {prefix}.weight.absmax has {state.absmax.numel()} values, expected {blocks} "
            f"(blocksize {state.blocksize})"
        )
    return weight, state


def _int8_state(bnb: Any, weight: torch.Tensor, scb: torch.Tensor, threshold: float) -> Any:
    state = bnb.MatmulLtState()
    state.CB, state.SCB = weight, scb
    state.has_fp16_weights = False
    state.threshold = threshold
    state.is_training = False
    return state
