"""What AWQ, GPTQ and SqueezeLLM share: reading their config keys, the optional bias, and
the runtime multiply on the packed layout of ``deploy_kernels.int_gemm_ref`` / ``deploy_kernels.lut_gemm_ref``.

Runtime buffers of a layer (registered on it, so ``.to()`` and ``state_dict`` see them):
``qweight`` int32 packed along K, then ``scales`` + ``zeros`` (integer GEMM) or ``lut``
(lookup-table GEMM); ``perm`` [K] when the input channels were sorted (GPTQ act-order);
``dense_weight`` [K, N] instead of all of these when no packed form fits; ``bias``.
On the CPU, ``engine.quantization.cpu_bind`` replaces them once at load by what a CPU
kernel reads (``cpu_qweight`` + ``cpu_scales_zeros``, or ``cpu_qweight`` + ``cpu_scales`` +
``cpu_offsets``) or by ``dense_weight``.
"""

from __future__ import annotations

from abc import abstractmethod
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from deploy_kernels.int_gemm_ref import dequantize_int, int_gemm_ref
from deploy_kernels.lut_gemm_ref import dequantize_lut, lut_gemm_ref
from engine.quantization.base import QuantConfig, QuantFormatError, QuantLinearMethod, TensorSet

if TYPE_CHECKING:
    from engine.layers.cpu_fusion import CpuOperands
    from engine.layers.linear import Linear

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


# ----------------------------------------------------------------------------- config keys


def read_int(
    raw: dict[str, Any], keys: tuple[str, ...], source: str, default: int | None = None
) -> int:
    """The first of ``keys`` present in ``raw`` as an int (``default`` if none is)."""
    for key in keys:
        if key in raw:
            value = raw[key]
            if isinstance(value, bool) or not isinstance(value, int):
                raise QuantFormatError(f"{source}: {key!r} must be an integer, got {value!r}")
            return value
    if default is None:
        raise QuantFormatError(f"{source}: missing {' or '.join(map(repr, keys))}")
    return default


def read_bool(raw: dict[str, Any], key: str, source: str, default: bool) -> bool:
    value = raw.get(key, default)
    if not isinstance(value, bool):
        raise QuantFormatError(f"{source}: {key!r} must be true or false, got {value!r}")
    return value


def _key_found(raw: dict[str, Any], keys: tuple[str, ...]) -> str:
    """The first of ``keys`` present in ``raw`` (the name an error message should use)."""
    return next((key for key in keys if key in raw), keys[0])


def read_bits(
    raw: dict[str, Any], keys: tuple[str, ...], allowed: tuple[int, ...], source: str, rule: str
) -> int:
    """The bit width under the first of ``keys``; one not in ``allowed`` names the key and
    ``rule`` (e.g. ``"AWQ checkpoints are 4-bit only"``)."""
    bits = read_int(raw, keys, source)
    if bits not in allowed:
        raise QuantFormatError(f"{source}: {_key_found(raw, keys)!r} is {bits}; {rule}")
    return bits


def read_group_size(raw: dict[str, Any], keys: tuple[str, ...], source: str) -> int:
    """A positive group size, or -1 for one group per column."""
    group_size = read_int(raw, keys, source)
    if group_size != -1 and group_size <= 0:
        raise QuantFormatError(
            f"{source}: {_key_found(raw, keys)!r} must be a positive group size or -1 "
            f"(one group), got {group_size}"
        )
    return group_size


class PackedQuantConfig(QuantConfig):
    """A method read from a pre-quantized checkpoint only (AWQ, GPTQ, SqueezeLLM): no
    quantizing a plain model at load time, no engine flags."""

    label: ClassVar[str]  # the method's name in messages, e.g. "AWQ"

    @classmethod
    def from_checkpoint(
        cls, raw: dict[str, Any] | None, source: str, flag_options: dict[str, Any]
    ) -> PackedQuantConfig:
        if raw is None:
            raise QuantFormatError(
                f"{cls.label} cannot quantize a plain model at load time: serve a pre-quantized "
                f"{cls.label} checkpoint, or use --quantization bitsandbytes, fp8 or int8"
            )
        return cls.from_raw(raw, source)

    @classmethod
    @abstractmethod
    def from_raw(cls, raw: dict[str, Any], source: str) -> PackedQuantConfig:
        """Build from the checkpoint's quantization config ``raw``, read from ``source``."""


# ----------------------------------------------------------------------------- linear methods


class PackedLinearMethod(QuantLinearMethod):
    """Shared ``create_weights``/``apply``/``dequantize`` of the integer and LUT methods.

    Subclasses' ``load`` registers the buffers and sets ``runtime_bits``/``group_size``
    (integer GEMM) or ``lut_gemm`` (lookup table)."""

    runtime_bits: int = 4
    group_size: int = 0
    lut_gemm: bool = False
    cpu_kind: str | None = None  # "int4" | "int8" | "int8_pair" | "dense" once bound for the CPU
    cpu_group: int = 0  # the int4 CPU kernel's group size

    def __init__(self, config: PackedQuantConfig) -> None:
        self.config = config

    def use_group_size(self, k: int, group_size: int) -> int:
        """The group size of a layer with ``k`` input channels (-1: one group), kept for
        ``apply``."""
        self.group_size = k if group_size == -1 else group_size
        return self.group_size

    def create_weights(self, layer: Linear) -> None:
        layer.register_buffer("bias", None)  # a buffer slot that ``load`` fills (or not)

    def load_bias(
        self, layer: Linear, tensors: TensorSet, device: torch.device, dtype: torch.dtype
    ) -> None:
        if layer.has_bias:
            bias = tensors.take("bias", (layer.out_features,), FLOAT_DTYPES)
            layer.register_buffer("bias", bias.to(device=device, dtype=dtype))

    def finish_load(self, layer: Linear, device: torch.device, dtype: torch.dtype) -> None:
        """Bind the CPU path once (GPU layers keep the packed buffers for Triton)."""
        if device.type == "cpu":
            from engine.quantization.cpu_bind import bind_packed_cpu

            bind_packed_cpu(self, layer, dtype)

    def apply(self, layer: Linear, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, layer.in_features)
        perm = getattr(layer, "perm", None)
        if perm is not None:
            x = x.index_select(1, perm)
        dense = getattr(layer, "dense_weight", None)
        if self.cpu_kind in ("int4", "int8", "int8_pair"):
            y = self._cpu_kernel(layer, x)
        elif dense is not None:
            y = x @ dense.to(x.dtype)
            if layer.bias is not None:
                y = y + layer.bias.to(x.dtype)
        elif self.lut_gemm:
            y = _lut_gemm(x)(x, layer.qweight, layer.lut, layer.bias)
        else:
            gemm = _int_gemm(x)
            y = gemm(
                x,
                layer.qweight,
                layer.scales,
                layer.zeros,
                self.runtime_bits,
                self.group_size,
                layer.bias,
            )
        return y.reshape(*shape[:-1], layer.out_features)

    def cpu_operands(self, layer: Linear) -> CpuOperands | None:
        """The weights a fused CPU layer concatenates (``engine.layers.cpu_fusion``): int4
        kernel weights or a dense weight, not permuted input channels."""
        from engine.layers.cpu_fusion import DenseOperands, Int4Operands

        if getattr(layer, "perm", None) is not None:
            return None
        if self.cpu_kind == "int4":
            return Int4Operands(layer.cpu_qweight, layer.cpu_scales_zeros, self.cpu_group, layer.bias)
        if self.cpu_kind == "dense":
            return DenseOperands(layer.dense_weight.t(), layer.bias)
        return None

    def _cpu_kernel(self, layer: Linear, x: torch.Tensor) -> torch.Tensor:
        from engine.quantization.cpu_kernels import int4_mm_cpu, int8_mm_cpu, int8_pair_mm_cpu

        if x.is_cuda:
            raise RuntimeError("this layer was bound to a CPU kernel at load; load the model on the GPU instead")
        if self.cpu_kind == "int4":
            return int4_mm_cpu(x, layer.cpu_qweight, layer.cpu_scales_zeros, self.cpu_group, layer.bias)
        if self.cpu_kind == "int8_pair":
            return int8_pair_mm_cpu(x, self.cpu_pair, layer.bias)
        return int8_mm_cpu(x, layer.cpu_qweight, layer.cpu_scales, layer.cpu_offsets, layer.bias)

    @torch.no_grad()
    def dequantize(self, layer: Linear) -> torch.Tensor:
        """The layer's weight ``W [K, N]`` in float32 (``y = x W + b``) from its runtime
        buffers, in the checkpoint's input-channel order."""
        k = layer.in_features
        dense = getattr(layer, "dense_weight", None)
        if dense is not None:
            w = dense.float()
        elif self.cpu_kind == "int4":
            from engine.quantization.cpu_kernels import unpack_int4_cpu

            w = unpack_int4_cpu(layer.cpu_qweight, layer.cpu_scales_zeros, self.cpu_group)
        elif self.cpu_kind == "int8_pair":
            from engine.quantization.cpu_kernels import unpack_int4_cpu

            pair = self.cpu_pair
            w = sum(unpack_int4_cpu(half.qweight, half.scales_and_zeros, half.group)
                    for half in (pair.high, pair.low))
        elif self.cpu_kind == "int8":
            w = layer.cpu_qweight.t().float() * layer.cpu_scales.float()
            if layer.cpu_offsets is not None:
                w = w + layer.cpu_offsets
        elif self.lut_gemm:
            w = dequantize_lut(layer.qweight, layer.lut, k)
        else:
            w = dequantize_int(
                layer.qweight, layer.scales, layer.zeros, self.runtime_bits, self.group_size, k
            )
        perm = getattr(layer, "perm", None)
        if perm is None:
            return w
        out = torch.empty_like(w)
        out[perm] = w  # runtime row i is checkpoint row perm[i]
        return out


def _int_gemm(x: torch.Tensor):
    if x.is_cuda:
        from deploy_kernels.int_gemm import int_gemm  # Triton: only where there is a GPU

        return int_gemm
    return int_gemm_ref


def _lut_gemm(x: torch.Tensor):
    if x.is_cuda:
        from deploy_kernels.lut_gemm import lut_gemm

        return lut_gemm
    return lut_gemm_ref
