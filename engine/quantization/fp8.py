"""FP8 (e4m3) W8A8: compressed-tensors ``float-quantized``, legacy AutoFP8 ``quant_method:
"fp8"``, and plain fp16/bf16/fp32 models quantized while loading.

Runtime tensors of a layer: ``weight`` e4m3 ``[N, K]``, ``weight_scale`` float32 ``(1,)`` or
``(N, 1)``, ``input_scale`` float32 ``(1,)`` (static activations) or None (dynamic per
token), ``bias``; ``W = weight.float() * weight_scale``; ``deploy_kernels.fp8_gemm.fp8_linear``
multiplies.

Block-quantized checkpoints (AutoFP8/DeepSeek ``weight_block_size [bn, bk]`` with
``weight_scale_inv``, a multiplier despite its name; compressed-tensors weights strategy
``block`` with ``block_structure [bn, bk]`` and a ``weight_scale`` grid) are read by
dequantizing each block and requantizing every output row with its own scale
(``amax / 448``): one more fp8 rounding, the per-channel kernel instead of a block kernel.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.nn.functional as F

from deploy_kernels.act_quant_ref import quantize_fp8_per_tensor_ref, quantize_fp8_per_token_ref
from deploy_kernels.fp8_gemm_ref import dequantize_fp8_weight
from engine.layers.linear import Linear
from engine.quantization.base import QuantConfig, QuantFormatError, QuantLinearMethod, TensorSet
from engine.quantization.compressed_tensors import (
    FLOAT_DTYPES,
    CTConfig,
    CTScheme,
    drop_kv_scales,
    name_matches,
    parse_compressed_tensors,
    set_buffer,
    take_bias,
    take_scale,
)

log = logging.getLogger(__name__)

FP8_MAX = 448.0  # largest finite float8_e4m3fn
_SCALE_FLOOR = 1e-12  # an all-zero weight gets this amax (no division by zero)
DYNAMIC = CTScheme("tensor", "token", True, True)  # legacy dynamic and load-time layers
STATIC = CTScheme("tensor", "tensor", False, True)


def quantize_fp8(w: torch.Tensor, per_channel: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``w [N, K]`` -> ``(e4m3 [N, K], float32 scale (1,) or (N, 1))``, scale = amax / 448,
    rounded to nearest even, saturating."""
    w = w.float()
    amax = w.abs().amax(dim=1, keepdim=True) if per_channel else w.abs().amax().reshape(1)
    scale = amax.clamp_min(_SCALE_FLOOR) / FP8_MAX
    q = (w / scale.reshape(-1, 1)).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return q, scale


def dequantize_blocks(weight: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """``weight [N, K]`` e4m3, ``scale_inv [ceil(N/bn), ceil(K/bk)]`` -> float32 ``[N, K]``."""
    n, k = weight.shape
    bn, bk = block
    full = scale_inv.float().repeat_interleave(bn, dim=0).repeat_interleave(bk, dim=1)[:n, :k]
    return weight.float() * full


class FP8Config(QuantConfig):
    name = "fp8"

    def __init__(
        self,
        origin: str,
        ct: CTConfig | None = None,
        scheme: CTScheme = DYNAMIC,
        ignored: tuple[str, ...] = (),
        block: tuple[int, int] | None = None,
    ) -> None:
        self.origin = origin  # "compressed-tensors" | "autofp8" | "load-time"
        self.ct, self.scheme, self.ignored, self.block = ct, scheme, ignored, block

    @classmethod
    def from_checkpoint(cls, raw: dict[str, Any] | None, source: str, flag_options: dict[str, Any]) -> FP8Config:
        if raw is None:
            return cls("load-time")
        method = str(raw.get("quant_method", "")).lower()
        if method == "compressed-tensors":
            return cls("compressed-tensors", ct=parse_compressed_tensors(raw, source, "float"))
        if method != "fp8":
            raise QuantFormatError(f"{source}: quant_method {raw.get('quant_method')!r} is not fp8")
        if raw.get("is_checkpoint_fp8_serialized") is False:
            return cls("load-time")
        if raw.get("fmt", "e4m3") != "e4m3":
            raise QuantFormatError(f"{source}: 'fmt' {raw.get('fmt')!r} is not supported; expected 'e4m3'")
        activation = raw.get("activation_scheme", "dynamic")
        if activation not in ("static", "dynamic"):
            raise QuantFormatError(
                f"{source}: 'activation_scheme' {activation!r}; expected 'static' or 'dynamic'"
            )
        ignored = raw.get("ignored_layers") or raw.get("modules_to_not_convert") or []
        if not isinstance(ignored, list) or not all(isinstance(i, str) for i in ignored):
            raise QuantFormatError(f"{source}: 'ignored_layers' must be a list of layer names")
        block = raw.get("weight_block_size")
        if block is not None:
            if not (isinstance(block, list) and len(block) == 2 and all(isinstance(b, int) and b > 0 for b in block)):
                raise QuantFormatError(f"{source}: 'weight_block_size' must be [bn, bk], got {block!r}")
            if activation != "dynamic":
                raise QuantFormatError(
                    f"{source}: 'weight_block_size' needs activation_scheme 'dynamic', got {activation!r}"
                )
        scheme = STATIC if activation == "static" else DYNAMIC
        return cls("autofp8", scheme=scheme, ignored=tuple(ignored), block=tuple(block) if block else None)

    def quantizes(self, prefix: str) -> bool:
        if self.ct is not None:
            return self.ct.scheme_for(prefix) is not None
        return super().quantizes(prefix) and not any(name_matches(prefix, i) for i in self.ignored)

    def linear_method(self, prefix: str) -> FP8LinearMethod:
        scheme = self.ct.scheme_for(prefix) if self.ct is not None else self.scheme
        assert scheme is not None, f"{prefix} is not quantized"
        return FP8LinearMethod(scheme, self.origin, self.block)

    def describe(self) -> str:
        if self.origin == "load-time":
            return "fp8 quantized at load time (weights per-tensor, activations dynamic per-token)"
        if self.ct is not None:
            kinds = sorted({s.describe() for _, s in self.ct.groups})
            return f"fp8 compressed-tensors ({'; '.join(kinds)})"
        block = f", blocks {list(self.block)} requantized per-channel" if self.block else ""
        return f"fp8 AutoFP8 ({self.scheme.describe()}{block})"


class FP8LinearMethod(QuantLinearMethod):
    def __init__(self, scheme: CTScheme, origin: str, block: tuple[int, int] | None = None) -> None:
        self.scheme, self.origin, self.block = scheme, origin, block

    def load(self, layer: Linear, tensors: TensorSet, device: torch.device, dtype: torch.dtype) -> None:
        n, k = layer.out_features, layer.in_features
        if self.origin == "load-time":
            w = tensors.take("weight", shape=(n, k), dtypes=FLOAT_DTYPES).to(device)
            weight, scale = quantize_fp8(w, per_channel=False)
        else:
            weight = tensors.take("weight", shape=(n, k), dtypes=(torch.float8_e4m3fn,)).to(device)
            block = self.block or self.scheme.block
            if block is not None:  # AutoFP8's weight_scale_inv, compressed-tensors' weight_scale
                grid = (-(-n // block[0]), -(-k // block[1]))
                name = "weight_scale_inv" if self.block is not None else "weight_scale"
                multiplier = tensors.take(name, shape=grid, dtypes=FLOAT_DTYPES).to(device)
                weight, scale = quantize_fp8(dequantize_blocks(weight, multiplier, block), per_channel=True)
            else:
                per_channel = self.scheme.weight_strategy == "channel" or self.origin == "autofp8"
                scale = take_scale(tensors, "weight_scale", n if per_channel else None, device)
        input_scale = None
        if self.scheme.input_strategy is not None and not self.scheme.input_dynamic:
            input_scale = take_scale(tensors, "input_scale", None, device)
        drop_kv_scales(tensors)
        take_bias(layer, tensors, device, dtype)
        set_buffer(layer, "weight", weight.contiguous())
        set_buffer(layer, "weight_scale", scale)
        set_buffer(layer, "input_scale", input_scale)
        if device.type == "cpu":  # no fp8 matmul on a CPU: dequantize once, not per call
            from engine.quantization.cpu_kernels import log_cpu_once

            log_cpu_once("fp8", "FP8 on the CPU: no fp8 CPU kernel; weights dequantized once at load to %s "
                         "(kept beside the e4m3 weight)", dtype)
            dense = dequantize_fp8_weight(layer.weight, layer.weight_scale).to(dtype)
            set_buffer(layer, "dense_weight", dense)

    def apply(self, layer: Linear, x: torch.Tensor) -> torch.Tensor:
        from deploy_kernels.fp8_gemm import fp8_linear

        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        if getattr(layer, "dense_weight", None) is not None and x.device.type == "cpu":
            y = self._apply_cpu(layer, x2)
        elif self.scheme.input_strategy is None:  # weight-only: activations stay in x.dtype
            if x.device.type == "cuda":
                y = fp8_linear(x2, layer.weight, layer.weight_scale, None, layer.bias, force_weight_only=True)
            else:
                from deploy_kernels.fp8_gemm_ref import fp8_weight_only_ref

                y = fp8_weight_only_ref(x2, layer.weight, layer.weight_scale, layer.bias)
        else:
            y = fp8_linear(x2, layer.weight, layer.weight_scale, layer.input_scale, layer.bias)
        return y.reshape(*shape[:-1], y.shape[-1])

    def _apply_cpu(self, layer: Linear, x: torch.Tensor) -> torch.Tensor:
        """The reference's maths on the weight dequantized at load: activations quantized to
        e4m3 as the GPU does (per token, or with the static scale) unless weight-only."""
        if self.scheme.input_strategy is not None:
            if layer.input_scale is None:
                xq, sx = quantize_fp8_per_token_ref(x)
            else:
                xq, sx = quantize_fp8_per_tensor_ref(x, layer.input_scale)
            x = (xq.float() * sx).to(x.dtype)
        return F.linear(x, layer.dense_weight.to(x.dtype), None if layer.bias is None else layer.bias.to(x.dtype))

    @staticmethod
    def dequantize(layer: Linear) -> torch.Tensor:
        """The layer's weight ``[N, K]`` in float32 (tests, debugging)."""
        return layer.weight.float() * layer.weight_scale.reshape(-1, 1)
