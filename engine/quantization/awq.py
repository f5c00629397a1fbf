"""AWQ checkpoints (AutoAWQ, ``version: "gemm"``), repacked for the integer GEMM.

The checkpoint packs 4-bit values along N in AWQ's interleaved nibble order
(``engine.quantization.packing``); the runtime wants them along K, GPTQ-style, with float
zero points (``deploy_kernels.int_gemm_ref``). ``W[k, n] = (q[k, n] - z[k // G, n]) * s[k // G, n]``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from deploy_kernels.int_gemm_ref import pack_along_k
from engine.quantization.base import QuantFormatError, QuantLinearMethod, TensorSet
from engine.quantization.int_linear import (
    FLOAT_DTYPES,
    PackedLinearMethod,
    PackedQuantConfig,
    read_bits,
    read_bool,
    read_group_size,
)
from engine.quantization.packing import unpack_awq

if TYPE_CHECKING:
    from engine.layers.linear import Linear

SYMMETRIC_ZERO = 8  # the zero point of a table without qzeros (zero_point: false)


@dataclass(frozen=True)
class AWQConfig(PackedQuantConfig):
    group_size: int
    zero_point: bool
    source: str
    not_converted: tuple[str, ...] = ()

    name = "awq"
    label = "AWQ"

    @classmethod
    def from_raw(cls, raw: dict[str, Any], source: str) -> AWQConfig:
        read_bits(raw, ("bits", "w_bit"), (4,), source, "AWQ checkpoints are 4-bit only")
        group_size = read_group_size(raw, ("group_size", "q_group_size"), source)
        for key in ("version", "format"):  # AutoAWQ writes version, transformers 5 format
            if key in raw and str(raw[key]).lower() != "gemm":
                raise QuantFormatError(
                    f"{source}: AWQ {key!r} {raw[key]!r} is not supported: only the 'gemm' "
                    "layout is read (GEMV checkpoints pack another way; re-export the model "
                    "with version 'gemm')"
                )
        skip = raw.get("modules_to_not_convert") or []
        if not isinstance(skip, list) or not all(isinstance(s, str) for s in skip):
            raise QuantFormatError(
                f"{source}: 'modules_to_not_convert' must be a list of module names"
            )
        return cls(group_size, read_bool(raw, "zero_point", source, True), source, tuple(skip))

    def quantizes(self, prefix: str) -> bool:
        # As AutoAWQ/transformers: a listed name anywhere in the layer's name leaves it plain.
        return super().quantizes(prefix) and not any(s in prefix for s in self.not_converted)

    def linear_method(self, prefix: str) -> QuantLinearMethod:
        return AWQLinearMethod(self)

    def describe(self) -> str:
        group = "one group" if self.group_size == -1 else f"group {self.group_size}"
        return f"awq 4-bit, {group}" + ("" if self.zero_point else ", no zero point")


class AWQLinearMethod(PackedLinearMethod):
    runtime_bits = 4
    config: AWQConfig

    def load(
        self, layer: Linear, tensors: TensorSet, device: torch.device, dtype: torch.dtype
    ) -> None:
        k, n = layer.in_features, layer.out_features
        group = self.use_group_size(k, self.config.group_size)
        if k % group:
            raise QuantFormatError(
                f"{tensors.prefix}: in_features {k} is not a multiple of the AWQ group size "
                f"{group} ({self.config.source})"
            )
        if n % 8:
            raise QuantFormatError(
                f"{tensors.prefix}: out_features {n} is not a multiple of 8, which AWQ packing needs"
            )
        qweight = tensors.take("qweight", (k, n // 8), (torch.int32,))
        # AutoAWQ always writes qzeros; without zero points a table may lack them.
        qzeros = tensors.take(
            "qzeros", (k // group, n // 8), (torch.int32,), optional=not self.config.zero_point
        )
        scales = tensors.take("scales", (k // group, n), FLOAT_DTYPES)
        self.load_bias(layer, tensors, device, dtype)

        q = unpack_awq(qweight.to(device))  # [K, N]
        if qzeros is None:
            zeros = torch.full((k // group, n), float(SYMMETRIC_ZERO), device=device)
        else:
            zeros = unpack_awq(qzeros.to(device)).float()
        layer.register_buffer("qweight", pack_along_k(q, 4))
        layer.register_buffer("scales", scales.to(device=device, dtype=dtype))
        layer.register_buffer("zeros", zeros.to(dtype))
        self.finish_load(layer, device, dtype)
