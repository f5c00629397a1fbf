"""Linear layers whose weights and matmul belong to a pluggable method.

``Linear`` owns no math: ``quant_method.create_weights`` registers the parameters the
checkpoint format stores (so the loader fills them by name) and ``quant_method.apply``
computes ``x @ W.T + b``. A quantization format is a new method, not a new layer.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from engine.layers.cpu_fusion import DenseOperands
    from engine.quantization.base import QuantConfig


class LinearMethod(Protocol):
    def create_weights(self, layer: Linear) -> None: ...

    def apply(self, layer: Linear, x: torch.Tensor) -> torch.Tensor: ...


class UnquantizedLinearMethod:
    """A plain ``weight [out, in]`` and optional ``bias [out]`` in the model dtype."""

    def create_weights(self, layer: Linear) -> None:
        layer.weight = torch.nn.Parameter(
            torch.empty(layer.out_features, layer.in_features), requires_grad=False
        )
        if layer.has_bias:
            layer.bias = torch.nn.Parameter(torch.empty(layer.out_features), requires_grad=False)
        else:
            layer.bias = None

    def apply(self, layer: Linear, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, layer.weight, layer.bias)

    def cpu_operands(self, layer: Linear) -> DenseOperands | None:
        """The weights a fused CPU layer concatenates (``engine.layers.cpu_fusion``)."""
        from engine.layers.cpu_fusion import DenseOperands

        if layer.weight.device.type != "cpu":
            return None
        return DenseOperands(layer.weight.data, None if layer.bias is None else layer.bias.data)


class Linear(torch.nn.Module):
    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = False,
        quant_method: LinearMethod | None = None,
    ) -> None:
        super().__init__()
        self.in_features, self.out_features, self.has_bias = in_features, out_features, bias
        self.quant_method: LinearMethod = quant_method or UnquantizedLinearMethod()
        self.quant_method.create_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.quant_method.apply(self, x)

    @property
    def quantized(self) -> bool:
        return not isinstance(self.quant_method, UnquantizedLinearMethod)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, bias={self.has_bias}, method={type(self.quant_method).__name__}"


def make_linear(
    in_features: int, out_features: int, bias: bool, quant: QuantConfig | None, prefix: str
) -> Linear:
    """A ``Linear`` with the quantization method ``quant`` gives the layer named ``prefix``
    (plain weights without ``quant`` or for layers it leaves alone, such as ``lm_head``)."""
    method = quant.linear_method(prefix) if quant is not None and quant.quantizes(prefix) else None
    return Linear(in_features, out_features, bias=bias, quant_method=method)
