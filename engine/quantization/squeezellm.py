"""SqueezeLLM checkpoints: non-uniform 3/4-bit weights as indices into a per-channel table.

``qweight`` packs the indices along K exactly as GPTQ does (SqueezeLLM's ``quant.py`` uses
the same packing code, 3-bit included); ``lookup_table [N, 2^bits]``. The runtime layout
(``deploy_kernels.lut_gemm_ref``) is 4-bit indices along K and a 16-entry table per channel.
``W[k, n] = LUT[n, q[k, n]]``. Dense-and-sparse checkpoints (``rows/cols/vals``) are not read.
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
)
from engine.quantization.packing import SQUEEZELLM_BITS, unpack_squeezellm

if TYPE_CHECKING:
    from engine.layers.linear import Linear

RUNTIME_LUT_SIZE = 16
_SPARSE_TENSORS = ("rows", "cols", "vals", "full_rows", "full_row_indices", "startrows")


@dataclass(frozen=True)
class SqueezeLLMConfig(PackedQuantConfig):
    bits: int
    source: str

    name = "squeezellm"
    label = "SqueezeLLM"

    @classmethod
    def from_raw(cls, raw: dict[str, Any], source: str) -> SqueezeLLMConfig:
        rule = "SqueezeLLM checkpoints are 3- or 4-bit"
        return cls(read_bits(raw, ("wbits", "bits"), SQUEEZELLM_BITS, source, rule), source)

    def linear_method(self, prefix: str) -> QuantLinearMethod:
        return SqueezeLLMLinearMethod(self)

    def describe(self) -> str:
        return f"squeezellm {self.bits}-bit"


class SqueezeLLMLinearMethod(PackedLinearMethod):
    lut_gemm = True
    config: SqueezeLLMConfig

    def load(
        self, layer: Linear, tensors: TensorSet, device: torch.device, dtype: torch.dtype
    ) -> None:
        bits, k, n = self.config.bits, layer.in_features, layer.out_features
        sparse = [name for name in _SPARSE_TENSORS if tensors.has(name)]
        if sparse:
            raise QuantFormatError(
                f"{tensors.prefix}: dense-and-sparse SqueezeLLM tensors ({', '.join(sparse)}) are "
                "not supported; use a dense-only checkpoint"
            )
        values_per = 32 if bits == 3 else 8
        if k % values_per:
            raise QuantFormatError(
                f"{tensors.prefix}: in_features {k} is not a multiple of {values_per}, which "
                f"{bits}-bit SqueezeLLM packing needs"
            )
        qweight = tensors.take("qweight", (k * bits // 32, n), (torch.int32,))
        lut = tensors.take("lookup_table", (n, 2**bits), FLOAT_DTYPES)
        self.load_bias(layer, tensors, device, dtype)

        qweight = qweight.to(device)
        if bits != 4:
            qweight = pack_along_k(unpack_squeezellm(qweight, bits, k), 4)
        table = torch.zeros(n, RUNTIME_LUT_SIZE, device=device, dtype=dtype)
        table[:, : 2**bits] = lut.to(device=device, dtype=dtype)
        layer.register_buffer("qweight", qweight)
        layer.register_buffer("lut", table)
        self.finish_load(layer, device, dtype)
