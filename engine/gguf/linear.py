"""GGUF block-quantized linear layers, held as group-wise ints: ``W = q * scale + min``.

Per layer, in the packed layout of ``deploy_kernels.int_gemm_ref`` (``qweight`` int32 packed
along K, 4-bit fields for Q4_0/Q4_1/Q4_K, 8-bit fields for Q8_0 and for the 5- and 6-bit
values of Q5_K/Q6_K, which 8-bit fields hold as they are):

- CPU: ``qweight``, ``scales`` and ``mins`` ``[K / group, N]`` in float32, so the reference
  forward (dequantize, then matmul, as ``int_gemm_ref``) uses exactly the weights
  ``gguf.quants.dequantize`` gives. A faster CPU kernel can be bound per layer with
  ``bind_cpu_kernel``; ``group_affine`` hands it the layer's (q, scales, mins, group).
- GPU: ``qweight``, ``scales`` and ``zeros = -min / scale`` in the model dtype, for the
  Triton ``int_gemm`` (``W = (q - zeros) * scales``). Integer zeros (Q4_0: 8, Q8_0: 128)
  keep it exact; Q4_1 and the K-quants' float zeros round in the model dtype. A layer with
  a group of scale 0 and a nonzero min (a constant sub-block) has no such zero: it is
  dequantized once at load (``dense_weight``).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from deploy_kernels.int_gemm_ref import pack_along_k, unpack_along_k
from engine.gguf.types import GROUP_TYPES, type_name
from engine.quantization.base import QuantConfig, QuantFormatError, QuantLinearMethod, TensorSet

if TYPE_CHECKING:
    from engine.layers.cpu_fusion import CpuOperands
    from engine.layers.linear import Linear

CpuKernel = Callable[[torch.Tensor], torch.Tensor]  # x [M, K] -> y [M, N] (bias included)


@dataclass(frozen=True)
class GGUFQuantConfig(QuantConfig):
    """The layers a GGUF file stores as blocks (prefix -> ggml type); the others are plain."""

    layer_types: dict[str, int]
    runtime: str = "auto"  # auto: int_gemm layout on CUDA, exact float mins elsewhere; or affine / int_gemm

    name = "gguf"
    skip_prefixes = ()  # the output head is quantized too when the file says so

    @classmethod
    def from_checkpoint(cls, raw: dict[str, Any] | None, source: str, flag_options: dict[str, Any]) -> QuantConfig:
        raise QuantFormatError("GGUF files are read by engine.gguf, not through --quantization")

    def quantizes(self, prefix: str) -> bool:
        return prefix in self.layer_types

    def linear_method(self, prefix: str) -> QuantLinearMethod:
        return GGUFLinearMethod(self.layer_types[prefix], self.runtime)

    def describe(self) -> str:
        counts = Counter(type_name(t) for t in self.layer_types.values())
        return "gguf " + ", ".join(f"{name} x{n}" for name, n in counts.most_common())


class GGUFLinearMethod(QuantLinearMethod):
    """One layer's GGUF weight as group-wise ints (see the module docstring)."""

    def __init__(self, ggml_type: int, runtime: str = "auto") -> None:
        if runtime not in ("auto", "affine", "int_gemm"):
            raise ValueError(f"runtime must be auto, affine or int_gemm, got {runtime!r}")
        self.ggml_type = ggml_type
        self.group, self.bits = GROUP_TYPES[ggml_type]
        self.runtime_bits = 4 if self.bits <= 4 else 8
        self.runtime = runtime
        self.cpu_kernel: CpuKernel | None = None
        self.int_gemm = False  # set by load: which buffers the layer holds
        self.dense = False  # int_gemm layout asked for, but a group needs a float weight

    def create_weights(self, layer: Linear) -> None:
        layer.register_buffer("bias", None)

    def load(self, layer: Linear, tensors: TensorSet, device: torch.device, dtype: torch.dtype) -> None:
        """``tensors``: ``q`` uint8 [N, K], ``scales`` and ``mins`` float32 [N, K / group]
        (``GroupAffine``), optional ``bias`` [N]."""
        n, k = layer.out_features, layer.in_features
        if k % self.group:
            raise QuantFormatError(f"{tensors.prefix}: in_features {k} is not a multiple of "
                                   f"the {type_name(self.ggml_type)} group {self.group}")
        groups = k // self.group
        q = tensors.take("q", (n, k), (torch.uint8,))
        scales = tensors.take("scales", (n, groups), (torch.float32,))
        mins = tensors.take("mins", (n, groups), (torch.float32,))
        if layer.has_bias:
            bias = tensors.take("bias", (n,), (torch.float32, torch.float16, torch.bfloat16))
            layer.register_buffer("bias", bias.to(device=device, dtype=dtype))
        layer.register_buffer("qweight", pack_along_k(q.t().to(device), self.runtime_bits))
        scales, mins = scales.t().contiguous().to(device), mins.t().contiguous().to(device)
        self.int_gemm = self.runtime == "int_gemm" or (self.runtime == "auto" and device.type == "cuda")
        if self.int_gemm and bool(((scales == 0) & (mins != 0)).any()):
            # a group of one constant value (scale 0, min not): (q - zero) * scale cannot hold
            # it, so this layer's weight is dequantized once instead
            self.int_gemm, self.dense = False, True
            w = unpack_along_k(layer.qweight, self.runtime_bits, k).float()
            group = torch.arange(k, device=w.device) // self.group
            del layer.qweight
            layer.register_buffer("dense_weight", (w * scales[group] + mins[group]).to(dtype))
        elif self.int_gemm:
            zeros = torch.where(scales == 0, 0.0, -mins.double() / scales.double())
            layer.register_buffer("scales", scales.to(dtype))
            layer.register_buffer("zeros", zeros.to(dtype))
        else:
            layer.register_buffer("scales", scales)
            layer.register_buffer("mins", mins)

    def apply(self, layer: Linear, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, layer.in_features)
        if self.dense:
            y = x @ layer.dense_weight.to(x.dtype)
            if layer.bias is not None:
                y = y + layer.bias.to(x.dtype)
        elif self.cpu_kernel is not None and not x.is_cuda:
            y = self.cpu_kernel(x)
        elif self.int_gemm and x.is_cuda:
            from deploy_kernels.int_gemm import int_gemm  # Triton: only where there is a GPU

            y = int_gemm(x, layer.qweight, layer.scales, layer.zeros, self.runtime_bits, self.group, layer.bias)
        else:  # the reference: dequantize, then one float32 matmul (as int_gemm_ref)
            y = x.float() @ self.dequantize(layer)
            if layer.bias is not None:
                y = y + layer.bias.float()
            y = y.to(x.dtype)
        return y.reshape(*shape[:-1], layer.out_features)

    def cpu_operands(self, layer: Linear) -> CpuOperands | None:
        """The weights a fused CPU layer concatenates (``engine.layers.cpu_fusion``)."""
        from engine.layers.cpu_fusion import DenseOperands, Int4Operands

        if self.dense and layer.dense_weight.device.type == "cpu":
            return DenseOperands(layer.dense_weight.t(), layer.bias)
        weights = getattr(self.cpu_kernel, "weights", None)  # bind_int4_cpu's packed weights
        if weights is None:
            return None
        return Int4Operands(weights.qweight, weights.scales_and_zeros, weights.group, layer.bias)

    @torch.no_grad()
    def dequantize(self, layer: Linear) -> torch.Tensor:
        """``W [K, N]`` in float32 from the runtime buffers (``y = x W + b``)."""
        k = layer.in_features
        if self.dense:
            return layer.dense_weight.float()
        halves = _kernel_halves(self.cpu_kernel)
        if halves:
            from engine.quantization.cpu_kernels import unpack_int4_cpu

            return sum(unpack_int4_cpu(w.qweight, w.scales_and_zeros, w.group) for w in halves)
        q = unpack_along_k(layer.qweight, self.runtime_bits, k).float()
        group = torch.arange(k, device=q.device) // self.group
        if self.int_gemm:
            return (q - layer.zeros.float()[group]) * layer.scales.float()[group]
        return q * layer.scales[group] + layer.mins[group]


@dataclass(frozen=True)
class GroupWeights:
    """What a CPU kernel needs of a layer: ``W[n, k] = q[n, k] * scales[n, g] + mins[n, g]``,
    ``g = k // group``; ``bits`` of q (4, 5, 6 or 8)."""

    q: torch.Tensor  # uint8 [N, K]
    scales: torch.Tensor  # float32 [N, K / group]
    mins: torch.Tensor  # float32 [N, K / group]
    group: int
    bits: int
    bias: torch.Tensor | None


def group_affine(layer: Linear) -> GroupWeights:
    """The layer's weights as (q, scales, mins, group) for a CPU kernel to repack."""
    method = layer.quant_method
    if not isinstance(method, GGUFLinearMethod) or method.int_gemm or method.dense:
        raise ValueError("group_affine takes a GGUF layer loaded for the CPU")
    q = unpack_along_k(layer.qweight, method.runtime_bits, layer.in_features).t().to(torch.uint8)
    return GroupWeights(q.contiguous(), layer.scales.t().contiguous(), layer.mins.t().contiguous(),
                        method.group, method.bits, layer.bias)


def bind_cpu_kernel(layer: Linear, kernel: CpuKernel) -> None:
    """Use ``kernel(x [M, K]) -> y [M, N]`` (bias included) for this layer on the CPU instead
    of the reference forward. A kernel with packed ``weights`` (int4) or a ``pair`` (8-bit
    as two int4) replaces the group-affine buffers: they become its tensors, so the layer
    holds its weights once, and ``dequantize`` reads them back (as the kernel computes)."""
    if not isinstance(layer.quant_method, GGUFLinearMethod):
        raise ValueError("bind_cpu_kernel takes a GGUF layer")
    layer.quant_method.cpu_kernel = kernel
    halves = _kernel_halves(kernel)
    if not halves:
        return
    for name in ("qweight", "scales", "mins"):
        if name in layer._buffers:
            delattr(layer, name)
    for i, weights in enumerate(halves):
        layer.register_buffer(f"cpu_qweight_{i}", weights.qweight, persistent=False)
        layer.register_buffer(f"cpu_scales_zeros_{i}", weights.scales_and_zeros, persistent=False)


def _kernel_halves(kernel: CpuKernel | None) -> list[Any]:
    """The int4 kernel weights a bound CPU kernel multiplies by (summed), if it says."""
    pair = getattr(kernel, "pair", None)
    if pair is not None:
        return [pair.high, pair.low]
    weights = getattr(kernel, "weights", None)
    return [] if weights is None else [weights]
