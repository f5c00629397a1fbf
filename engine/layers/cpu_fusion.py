"""Sibling projections that read the same input, fused once at load into one CPU matmul.

A decode step on the CPU pays a few microseconds of dispatch per op whatever its size, and
at one token SmolLM2-135M's q/k/v and gate/up products are among the smallest ops there
are. A model lists the siblings it may fuse (``FUSED_PROJECTIONS`` on its module classes:
``qkv_proj`` from ``q_proj, k_proj, v_proj``); ``fuse_cpu_projections`` builds each fused
layer from the members' CPU operands and the module's forward uses it when it is set.

What fuses: members of one kind with the same input size and bias presence -- plain
weights (and weights dequantized once at load) are concatenated into a plain ``Linear``
(``pack_cpu_linears`` packs it afterwards if it is float32), int4 kernel weights
(``_weight_int4pack_mm_for_cpu``) are concatenated packed. A fused layer is checked on a
random input against its members before they give up their weights; anything else (int8,
fp8, bitsandbytes, permuted input channels) stays unfused.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from engine.layers.linear import Linear
from engine.quantization.cpu_kernels import INT4_PACK_ROWS, int4_mm_cpu

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DenseOperands:
    """``y = x W^T + b`` with a plain ``weight [N, K]``."""

    weight: torch.Tensor
    bias: torch.Tensor | None


@dataclass(frozen=True)
class Int4Operands:
    """``y = int4_mm_cpu(x, qweight, scales_and_zeros, group) + b``."""

    qweight: torch.Tensor  # uint8 [N, K / 2], the kernel's packed layout
    scales_and_zeros: torch.Tensor  # [K / group, N, 2]
    group: int
    bias: torch.Tensor | None


CpuOperands = DenseOperands | Int4Operands


class CpuInt4LinearMethod:
    """A fused layer's int4 kernel weights (they exist only on the CPU, made at load)."""

    def __init__(self, operands: Int4Operands) -> None:
        self.operands = operands

    def create_weights(self, layer: Linear) -> None:
        layer.register_buffer("cpu_qweight", self.operands.qweight)
        layer.register_buffer("cpu_scales_zeros", self.operands.scales_and_zeros)
        layer.register_buffer("bias", self.operands.bias)

    def apply(self, layer: Linear, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 2:  # [T, K]: the model's flattened token axis
            return int4_mm_cpu(x, layer.cpu_qweight, layer.cpu_scales_zeros, self.operands.group, layer.bias)
        rows = x.reshape(-1, layer.in_features)
        y = int4_mm_cpu(rows, layer.cpu_qweight, layer.cpu_scales_zeros, self.operands.group, layer.bias)
        return y.view(*x.shape[:-1], layer.out_features)

    def cpu_operands(self, layer: Linear) -> CpuOperands:
        return self.operands


class FusedAwayMethod:
    """A member whose weights now live in its fused layer: calling it is a bug."""

    def __init__(self, fused_name: str) -> None:
        self.fused_name = fused_name

    def create_weights(self, layer: Linear) -> None:
        raise TypeError("a fused-away layer is made by fuse_cpu_projections")

    def apply(self, layer: Linear, x: torch.Tensor) -> torch.Tensor:
        raise RuntimeError(f"this layer was fused into {self.fused_name} at load: call that one")


def _concat(parts: list[CpuOperands]) -> CpuOperands | None:
    """The members' operands as one layer's, or None when they do not concatenate."""
    first = parts[0]
    if any(type(p) is not type(first) or (p.bias is None) != (first.bias is None) for p in parts):
        return None
    bias = None if first.bias is None else torch.cat([p.bias for p in parts])
    if isinstance(first, DenseOperands):
        if len({(p.weight.dtype, p.weight.shape[1]) for p in parts}) != 1:
            return None
        return DenseOperands(torch.cat([p.weight for p in parts]), bias)
    if len({(p.group, p.qweight.shape[1], p.scales_and_zeros.dtype) for p in parts}) != 1:
        return None
    if any(p.qweight.shape[0] % INT4_PACK_ROWS for p in parts[:-1]):
        return None  # the packed layout interleaves blocks of rows: only whole blocks join
    return Int4Operands(torch.cat([p.qweight for p in parts]),
                        torch.cat([p.scales_and_zeros for p in parts], dim=1), first.group, bias)


def _fused_layer(operands: CpuOperands, in_features: int) -> Linear:
    if isinstance(operands, Int4Operands):
        return Linear(in_features, operands.qweight.shape[0], operands.bias is not None,
                      CpuInt4LinearMethod(operands))
    layer = Linear(in_features, operands.weight.shape[0], operands.bias is not None)
    layer.weight = torch.nn.Parameter(operands.weight, requires_grad=False)
    if operands.bias is not None:
        layer.bias = torch.nn.Parameter(operands.bias, requires_grad=False)
    return layer


def _matches(fused: Linear, members: list[Linear], dtype: torch.dtype) -> bool:
    """The fused product on a check input equals the members' side by side, within rounding
    (exactly, for the int4 kernel: each output column is the same sum)."""
    x = torch.randn(3, fused.in_features, generator=torch.Generator().manual_seed(0)).to(dtype)
    ref = torch.cat([m(x) for m in members], dim=-1).float()
    got = fused(x).float()
    tolerance = 1e-4 if dtype == torch.float32 else 1e-2
    return bool(((got - ref).abs() <= tolerance * (float(ref.abs().max()) + 1e-30)).all())


def _release(member: Linear, fused_name: str) -> None:
    for name in list(member._parameters) + list(member._buffers):
        delattr(member, name)
    member.bias = None
    member.quant_method = FusedAwayMethod(fused_name)


@torch.inference_mode()
def fuse_cpu_projections(model: torch.nn.Module, dtype: torch.dtype) -> int:
    """Fuse every sibling group the model's modules list (CPU layers only); returns how many
    fused layers were made. ``dtype``: the activations' dtype, for the check input."""
    made, kept = 0, []
    for module in model.modules():
        for fused_name, member_names in getattr(type(module), "FUSED_PROJECTIONS", {}).items():
            if getattr(module, fused_name, None) is not None:
                continue  # fused by an earlier call
            members = [getattr(module, name) for name in member_names]
            fused = _fuse(members, dtype)
            if fused is None:
                kept.append(fused_name)
                continue
            for member in members:
                _release(member, fused_name)
            setattr(module, fused_name, fused)
            made += 1
    if made or kept:
        log.info("CPU projections: %d sibling groups fused into one matmul each%s", made,
                 f", {len(kept)} kept apart (no shared CPU layout)" if kept else "")
    return made


def _fuse(members: list[Linear], dtype: torch.dtype) -> Linear | None:
    parts = []
    for member in members:
        operands = getattr(member.quant_method, "cpu_operands", None)
        part = operands(member) if operands is not None else None
        if part is None:
            return None
        parts.append(part)
    if len({m.in_features for m in members}) != 1:
        return None
    joined = _concat(parts)
    if joined is None:
        return None
    fused = _fused_layer(joined, members[0].in_features)
    return fused if _matches(fused, members, dtype) else None
