"""GPTQ checkpoints (AutoGPTQ / GPTQModel), 2, 3, 4 and 8 bits, repacked for the integer GEMM.

``qweight`` is packed along K as the runtime wants it already (3-bit is widened to 4);
zero points are unpacked to floats (v1 ``checkpoint_format: "gptq"`` stores z - 1: mask,
then add 1; ``"gptq_v2"`` stores z). Act-order checkpoints (non-monotonic ``g_idx``) get
their input channels sorted by group once at load; ``apply`` permutes ``x`` to match.
``W[k, n] = s[g_idx[k], n] * (q[k, n] - z[g_idx[k], n])``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from deploy_kernels.int_gemm_ref import pack_along_k
from deploy_kernels.log_once import log_fallback_once
from engine.quantization.base import (
    QuantFormatError,
    QuantLinearMethod,
    TensorSet,
)
from engine.quantization.int_linear import (
    FLOAT_DTYPES,
    PackedLinearMethod,
    PackedQuantConfig,
    read_bits,
    read_bool,
    read_group_size,
)
from engine.quantization.packing import GPTQ_BITS, unpack_gptq_cols, unpack_gptq_rows

if TYPE_CHECKING:
    from engine.layers.linear import Linear

log = logging.getLogger(__name__)

CHECKPOINT_FORMATS = ("gptq", "gptq_v2")


@dataclass(frozen=True)
class GPTQConfig(PackedQuantConfig):
    bits: int
    group_size: int
    desc_act: bool
    sym: bool
    checkpoint_format: str
    static_groups: bool
    source: str

    name = "gptq"
    label = "GPTQ"

    @classmethod
    def from_raw(cls, raw: dict[str, Any], source: str) -> GPTQConfig:
        rule = "GPTQ checkpoints are read with bits 2, 3, 4 or 8"
        bits = read_bits(raw, ("bits",), GPTQ_BITS, source, rule)
        group_size = read_group_size(raw, ("group_size",), source)
        if "sym" not in raw:
            log.warning(
                "%s: no 'sym' in the GPTQ config; assuming sym: true (the zero points are read from qzeros anyway)",
                source,
            )
        fmt = str(raw.get("checkpoint_format", raw.get("format", "gptq"))).lower()
        if raw.get("is_marlin_format") is True:
            fmt = "marlin"
        if fmt not in CHECKPOINT_FORMATS:
            raise QuantFormatError(
                f"{source}: GPTQ 'checkpoint_format' {fmt!r} is not supported; supported: "
                f"{', '.join(CHECKPOINT_FORMATS)} (re-export a marlin/bitblas checkpoint as gptq)"
            )
        if raw.get("lm_head") is True:
            raise QuantFormatError(
                f"{source}: 'lm_head': true (a quantized output head) is not supported"
            )
        if raw.get("dynamic"):
            raise QuantFormatError(
                f"{source}: per-module 'dynamic' GPTQ overrides are not supported"
            )
        return cls(
            bits=bits,
            group_size=group_size,
            desc_act=read_bool(raw, "desc_act", source, False),
            sym=read_bool(raw, "sym", source, True),
            checkpoint_format=fmt,
            static_groups=read_bool(raw, "static_groups", source, False),
            source=source,
        )

    def linear_method(self, prefix: str) -> QuantLinearMethod:
        return GPTQLinearMethod(self)

    def describe(self) -> str:
        parts = [
            f"gptq {self.bits}-bit",
            "one group" if self.group_size == -1 else f"group {self.group_size}",
        ]
        if self.desc_act:
            parts.append("act-order")
        parts.append("sym" if self.sym else "asym")
        if self.checkpoint_format != "gptq":
            parts.append(self.checkpoint_format)
        return ", ".join(parts)


class GPTQLinearMethod(PackedLinearMethod):
    config: GPTQConfig

    def __init__(self, config: GPTQConfig) -> None:
        super().__init__(config)
        self.runtime_bits = 4 if config.bits == 3 else config.bits

    def load(
        self, layer: Linear, tensors: TensorSet, device: torch.device, dtype: torch.dtype
    ) -> None:
        bits, k, n = self.config.bits, layer.in_features, layer.out_features
        group = self.use_group_size(k, self.config.group_size)
        values_per = 32 if bits == 3 else 32 // bits  # values in one whole chunk of words
        for dim, size in (("in_features", k), ("out_features", n)):
            if size % values_per:
                raise QuantFormatError(
                    f"{tensors.prefix}: {dim} {size} is not a multiple of {values_per}, which "
                    f"{bits}-bit GPTQ packing needs"
                )
        groups = -(-k // group)
        qweight = tensors.take("qweight", (k * bits // 32, n), (torch.int32,))
        qzeros = tensors.take("qzeros", (groups, n * bits // 32), (torch.int32,))
        scales = tensors.take("scales", (groups, n), FLOAT_DTYPES)
        g_idx = tensors.take(
            "g_idx", (k,), (torch.int32, torch.int64), optional=not self.config.desc_act
        )
        self.load_bias(layer, tensors, device, dtype)

        zeros = unpack_gptq_cols(qzeros.to(device), bits, n)  # masked to b bits
        if self.config.checkpoint_format == "gptq":
            zeros = zeros + 1
        scales = scales.to(device)
        natural = torch.arange(k, device=device) // group
        g_idx = natural if g_idx is None else g_idx.to(device=device, dtype=torch.int64)
        if int(g_idx.min()) < 0 or int(g_idx.max()) >= groups:
            raise QuantFormatError(
                f"tensor '{tensors.prefix}.g_idx' holds groups {int(g_idx.min())}..{int(g_idx.max())}, "
                f"but the config implies {groups} groups (group size {group})"
            )

        if torch.equal(g_idx, natural):
            if bits == 3:
                qweight = pack_along_k(unpack_gptq_rows(qweight.to(device), 3, k), 4)
            # 2 / 4 / 8 bits: the checkpoint's qweight is the runtime layout already
            layer.register_buffer("qweight", qweight.to(device))
        else:
            perm = torch.argsort(g_idx, stable=True)
            q = unpack_gptq_rows(qweight.to(device), bits, k)
            if not torch.equal(g_idx[perm], natural):
                self._load_dense(layer, tensors.prefix, q, zeros, scales, g_idx, dtype)
                return
            layer.register_buffer("perm", perm)
            layer.register_buffer("qweight", pack_along_k(q[perm], self.runtime_bits))
        layer.register_buffer("scales", scales.to(dtype))
        layer.register_buffer("zeros", zeros.to(dtype))
        self.finish_load(layer, device, dtype)

    def _load_dense(
        self,
        layer: Linear,
        prefix: str,
        q: torch.Tensor,
        zeros: torch.Tensor,
        scales: torch.Tensor,
        g_idx: torch.Tensor,
        dtype: torch.dtype,
    ) -> None:
        """A g_idx whose sorted groups are not runs of G channels: no packed layout fits it,
        so keep the weight dequantized (correct, just more memory and a slower matmul)."""
        log_fallback_once(
            "gptq-g_idx",
            "GPTQ g_idx of %s (and maybe other layers) does not sort into groups of %d "
            "channels: keeping those weights dequantized in %s",
            prefix,
            self.group_size,
            dtype,
        )
        w = (q.float() - zeros.float()[g_idx]) * scales.float()[g_idx]
        layer.register_buffer("dense_weight", w.to(dtype))
        self.finish_load(layer, w.device, dtype)
