"""INT8 W8A8: compressed-tensors ``int-quantized`` checkpoints, and plain fp16/bf16/fp32
models quantized while loading.

Runtime tensors of a layer: ``weight`` int8 ``[N, K]``, ``weight_scale`` float32 ``(N, 1)``
or ``(1,)``, ``input_scale`` ``(1,)`` + optional ``input_zero_point`` int32 ``(1,)``
(static activations) or None (dynamic per token), ``bias``; ``W = weight * weight_scale``;
``deploy_kernels.int8_gemm.int8_linear`` multiplies.

Reading takes the stored scale as it is (compressed-tensors writes ``amax / 127.5``, its
``calculate_qparams`` dividing by half the range -128..127, and saturates at 127). Our own
load-time quantization uses ``amax / 127`` per output channel with round half to even and
the symmetric range -127..127, so the largest weight of a row is exact and -128 never
appears (the same rule as the dynamic per-token activations).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from engine.layers.linear import Linear
from engine.quantization.base import QuantConfig, QuantFormatError, QuantLinearMethod, TensorSet
from engine.quantization.compressed_tensors import (
    FLOAT_DTYPES,
    CTConfig,
    CTScheme,
    drop_kv_scales,
    parse_compressed_tensors,
    set_buffer,
    take_bias,
    take_scale,
)

INT8_MAX = 127.0
_SCALE_FLOOR = 1e-12
LOAD_TIME = CTScheme("channel", "token", True, True)
_ZERO_POINT_DTYPES = (torch.int8, torch.int32, torch.int64, torch.float32, torch.float16, torch.bfloat16)


def quantize_int8_per_channel(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``w [N, K]`` -> ``(int8 [N, K], float32 scale (N, 1))``: ``scale = amax_row / 127``,
    ``q = clamp(round_half_even(w / scale), -127, 127)``."""
    w = w.float()
    scale = w.abs().amax(dim=1, keepdim=True).clamp_min(_SCALE_FLOOR) / INT8_MAX
    q = torch.round(w / scale).clamp(-INT8_MAX, INT8_MAX).to(torch.int8)
    return q, scale


class Int8Config(QuantConfig):
    name = "int8"

    def __init__(self, ct: CTConfig | None) -> None:
        self.ct = ct  # None: quantize a plain model at load time

    @classmethod
    def from_checkpoint(cls, raw: dict[str, Any] | None, source: str, flag_options: dict[str, Any]) -> Int8Config:
        if raw is None:
            return cls(None)
        if str(raw.get("quant_method", "")).lower() != "compressed-tensors":
            raise QuantFormatError(
                f"{source}: int8 checkpoints are read in the compressed-tensors format only; "
                f"got quant_method {raw.get('quant_method')!r}"
            )
        ct = parse_compressed_tensors(raw, source, "int")
        for name, (_, scheme) in zip(raw["config_groups"], ct.groups, strict=True):
            if scheme.input_strategy is None:
                raise QuantFormatError(
                    f"{source}: config_groups.{name}.input_activations is null (weight-only int8, "
                    "W8A16); only W8A8 int8 is supported"
                )
        return cls(ct)

    def quantizes(self, prefix: str) -> bool:
        if self.ct is None:
            return super().quantizes(prefix)
        return self.ct.scheme_for(prefix) is not None

    def linear_method(self, prefix: str) -> Int8LinearMethod:
        if self.ct is None:
            return Int8LinearMethod(LOAD_TIME, load_time=True)
        scheme = self.ct.scheme_for(prefix)
        assert scheme is not None, f"{prefix} is not quantized"
        return Int8LinearMethod(scheme)

    def describe(self) -> str:
        if self.ct is None:
            return "int8 quantized at load time (weights per-channel, activations dynamic per-token)"
        return f"int8 compressed-tensors ({'; '.join(sorted({s.describe() for _, s in self.ct.groups}))})"


class Int8LinearMethod(QuantLinearMethod):
    def __init__(self, scheme: CTScheme, load_time: bool = False) -> None:
        self.scheme, self.load_time = scheme, load_time

    def load(self, layer: Linear, tensors: TensorSet, device: torch.device, dtype: torch.dtype) -> None:
        n, k = layer.out_features, layer.in_features
        if self.load_time:
            w = tensors.take("weight", shape=(n, k), dtypes=FLOAT_DTYPES).to(device)
            weight, scale = quantize_int8_per_channel(w)
        else:
            weight = tensors.take("weight", shape=(n, k), dtypes=(torch.int8,)).to(device)
            per_channel = self.scheme.weight_strategy == "channel"
            scale = take_scale(tensors, "weight_scale", n if per_channel else None, device)
            _zero_or_absent(tensors, "weight_zero_point")
        input_scale = zero_point = None
        if not self.scheme.input_dynamic:
            input_scale = take_scale(tensors, "input_scale", None, device)
            if self.scheme.input_symmetric:
                _zero_or_absent(tensors, "input_zero_point")
            else:
                zp = tensors.take("input_zero_point", dtypes=_ZERO_POINT_DTYPES)
                if zp.numel() != 1:
                    raise QuantFormatError(
                        f"tensor {tensors.prefix}.input_zero_point has shape {list(zp.shape)}, expected (1,)"
                    )
                zero_point = zp.to(device).round().to(torch.int32).reshape(1)
        drop_kv_scales(tensors)
        take_bias(layer, tensors, device, dtype)
        set_buffer(layer, "weight", weight.contiguous())
        set_buffer(layer, "weight_scale", scale)
        set_buffer(layer, "input_scale", input_scale)
        set_buffer(layer, "input_zero_point", zero_point)
        if device.type == "cpu":
            self._bind_cpu(layer, weight, zero_point is not None, dtype)

    def apply(self, layer: Linear, x: torch.Tensor) -> torch.Tensor:
        from deploy_kernels.int8_gemm import int8_linear

        shape = x.shape
        if "cpu_weight_sums" in layer._buffers and x.device.type == "cpu":
            y = self._apply_cpu(layer, x.reshape(-1, shape[-1]))
            return y.reshape(*shape[:-1], y.shape[-1])
        y = int8_linear(
            x.reshape(-1, shape[-1]), layer.weight, layer.weight_scale, layer.input_scale,
            layer.input_zero_point, layer.bias,
        )
        return y.reshape(*shape[:-1], y.shape[-1])

    @staticmethod
    def _bind_cpu(layer: Linear, weight: torch.Tensor, zero_point: bool, dtype: torch.dtype) -> None:
        """Once at load: float32 activations keep the reference's exactness with the int8
        weight as float32 (integers, exact) beside it; bf16/fp16 ones use torch's int8
        kernel on the int8 weight as it is."""
        from engine.quantization.cpu_kernels import KERNEL_DTYPE, log_cpu_once

        if dtype == torch.float32:
            log_cpu_once("int8-float32", "INT8 W8A8 on the CPU with float32 activations: int8 weights also "
                         "kept as float32 (exact integer products; --dtype bfloat16 uses torch's int8 kernel)")
            set_buffer(layer, "cpu_dense", weight.float())
        else:
            log_cpu_once("int8", "INT8 W8A8 on the CPU: activations quantized as on the GPU, integer "
                         "products by torch's int8 kernel (_weight_int8pack_mm, bfloat16 compute)")
            set_buffer(layer, "cpu_ones", torch.ones(weight.shape[0], dtype=KERNEL_DTYPE, device=weight.device))
        set_buffer(layer, "cpu_weight_sums", weight.float().sum(dim=1) if zero_point else None)

    @staticmethod
    def _apply_cpu(layer: Linear, x: torch.Tensor) -> torch.Tensor:
        """``int8_linear_ref``'s maths with the integer products from a float32 matmul
        (float32 models) or the int8 kernel (exact integers in, float32 sums rounded once
        to bf16 out)."""
        from deploy_kernels.int8_gemm_ref import quantize_int8_input_ref
        from engine.quantization.cpu_kernels import int8_products_cpu

        xq, sx = quantize_int8_input_ref(x, layer.input_scale, layer.input_zero_point)
        dense = getattr(layer, "cpu_dense", None)
        if dense is not None:
            acc = F.linear(xq.float(), dense)
        else:
            acc = int8_products_cpu(xq, layer.weight, layer.cpu_ones)
        if layer.input_zero_point is not None:
            acc = acc - layer.input_zero_point.float() * layer.cpu_weight_sums
        y = acc * sx * layer.weight_scale.float().reshape(1, -1)
        if layer.bias is not None:
            y = y + layer.bias.float()
        return y.to(x.dtype)

    @staticmethod
    def dequantize(layer: Linear) -> torch.Tensor:
        """The layer's weight ``[N, K]`` in float32 (tests, debugging)."""
        return layer.weight.float() * layer.weight_scale.reshape(-1, 1)


def _zero_or_absent(tensors: TensorSet, name: str) -> None:
    """A symmetric scheme has no zero point; an all-zero one (older writers) is accepted."""
    zp = tensors.take(name, dtypes=_ZERO_POINT_DTYPES, optional=True)
    if zp is not None and bool((zp != 0).any()):
        raise QuantFormatError(
            f"tensor {tensors.prefix}.{name} is non-zero, but the config says symmetric"
        )
