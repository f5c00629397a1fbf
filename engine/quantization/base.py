"""What every quantization method provides: a config per checkpoint, a linear method per layer.

A ``QuantConfig`` is built once from the checkpoint's quantization config (or from the
``--quantization`` flag alone, for methods that quantize a plain model while loading it)
and hands each linear layer a ``QuantLinearMethod``. The method reads the layer's own
checkpoint tensors (``load``), keeps the runtime tensors the kernel wants (repacked if
that is faster) as buffers of the layer, and multiplies (``apply``).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from engine.api import UnsupportedError

if TYPE_CHECKING:
    from engine.layers.linear import Linear


class QuantFormatError(UnsupportedError, ValueError):
    """A quantized checkpoint that does not match its config or the format: names the tensor
    or key and what was expected."""


class QuantLinearMethod(ABC):
    """One linear layer's quantized weights (``y = x W^T + b`` with ``W [out, in]``)."""

    def create_weights(self, layer: Linear) -> None:
        """Nothing on the meta device: ``load`` registers the runtime tensors."""
        layer.bias = None

    @abstractmethod
    def load(
        self,
        layer: Linear,
        tensors: TensorSet,
        device: torch.device,
        dtype: torch.dtype,
    ) -> None:
        """Read the layer's checkpoint tensors (``tensors.take``), check them against the
        format, and register runtime tensors on ``layer`` (``layer.register_buffer``).
        ``dtype`` is the activation dtype the model runs in."""

    @abstractmethod
    def apply(self, layer: Linear, x: torch.Tensor) -> torch.Tensor:
        """``x [T, in]`` in the model dtype -> ``[T, out]`` in the same dtype."""


class QuantConfig(ABC):
    """A method's settings for one checkpoint, validated when built."""

    name: ClassVar[str]  # the --quantization value, e.g. "awq"
    # Layers left in the model dtype. The output head and embeddings are never quantized
    # by the formats we read; compressed-tensors lists more in ``ignore``.
    skip_prefixes: tuple[str, ...] = ("lm_head",)

    @classmethod
    @abstractmethod
    def from_checkpoint(cls, raw: dict[str, Any] | None, source: str, flag_options: dict[str, Any]) -> QuantConfig:
        """Build from the checkpoint's quantization config ``raw`` (read from ``source``), or,
        with ``raw`` None, for quantizing a plain model at load time (a method that cannot
        raises ``QuantFormatError``). ``flag_options``: engine settings that apply
        (``bnb_quant_type``)."""

    @abstractmethod
    def linear_method(self, prefix: str) -> QuantLinearMethod:
        """The method of the linear layer named ``prefix`` (e.g. ``model.layers.0.mlp.up_proj``)."""

    def quantizes(self, prefix: str) -> bool:
        return not any(prefix == p or prefix.startswith(p + ".") for p in self.skip_prefixes)

    def describe(self) -> str:
        """One line for the start-up log, e.g. ``awq 4-bit, group 128``."""
        return self.name


class TensorSet:
    """A layer's checkpoint tensors, by name relative to the layer (``qweight``,
    ``weight.absmax``); ``take`` checks and removes one, ``finish`` rejects leftovers."""

    def __init__(self, prefix: str, tensors: dict[str, torch.Tensor]) -> None:
        self.prefix = prefix
        self._tensors = dict(tensors)

    def names(self) -> list[str]:
        return sorted(self._tensors)

    def has(self, name: str) -> bool:
        return name in self._tensors

    def take(
        self,
        name: str,
        shape: Iterable[int] | None = None,
        dtypes: Iterable[torch.dtype] | None = None,
        optional: bool = False,
    ) -> torch.Tensor | None:
        """The tensor ``name``, checked: a missing, mis-shaped or mis-typed one is a clear
        ``QuantFormatError`` naming it (``None`` when ``optional`` and absent)."""
        full = f"{self.prefix}.{name}"
        tensor = self._tensors.pop(name, None)
        if tensor is None:
            if optional:
                return None
            raise QuantFormatError(f"missing tensor {full!r}")
        if shape is not None and tuple(tensor.shape) != tuple(shape):
            raise QuantFormatError(
                f"tensor {full!r} has shape {list(tensor.shape)}, but the config implies {list(shape)}"
            )
        if dtypes is not None:
            allowed = tuple(dtypes)
            if tensor.dtype not in allowed:
                names = ", ".join(str(d).removeprefix("torch.") for d in allowed)
                raise QuantFormatError(
                    f"tensor {full!r} has dtype {str(tensor.dtype).removeprefix('torch.')}, "
                    f"expected {names}"
                )
        return tensor

    def finish(self) -> None:
        if self._tensors:
            listed = ", ".join(f"{self.prefix}.{n}" for n in sorted(self._tensors))
            raise QuantFormatError(f"unexpected tensors for this format: {listed}")
