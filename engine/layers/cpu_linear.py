"""Float32 linear layers on the CPU, their weights packed once at load into oneDNN's layout.

``F.linear`` hands a row-major ``[out, in]`` weight to MKL's sgemm, which streams it well
for one token but runs a 16-token decode batch about 1.5x slower than oneDNN on the same
weight reordered into its blocked layout (SmolLM2-135M here: 94 vs 142 ms a step at one
thread; with two threads on a busy box MKL's spinning also costs far more). Reordering once
at load is what ``torch.compile``'s freezing does on the CPU; doing it here keeps eager
mode and every batch size. The results differ from ``F.linear`` by rounding only (another
summation order, ~1e-6 relative); a layer whose packed product does not match its weight
on a check input, or a build without oneDNN, keeps ``F.linear`` (logged once).

A packed weight replaces the layer's ``weight`` parameter (same memory); a weight shared
with another module (the token embedding of a tied head) stays, and the packed copy adds
its size, which the KV-cache plan then sees (packing runs before it).
"""

from __future__ import annotations

import logging

import torch

from engine.layers.linear import Linear, UnquantizedLinearMethod

log = logging.getLogger(__name__)

PACK_BATCH = 16  # the rows oneDNN tunes the layout for; 1-token steps run as fast as unpacked


def onednn_available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


class PackedCpuLinearMethod(UnquantizedLinearMethod):
    """A plain layer's product through its oneDNN-packed weight (still unquantized)."""

    def __init__(self, packed: torch.Tensor) -> None:
        self.packed = packed  # opaque mkldnn tensor [out, in]

    def create_weights(self, layer: Linear) -> None:
        raise TypeError("a packed layer is made from a loaded one by pack_cpu_linears")

    def cpu_operands(self, layer: Linear) -> None:
        return None  # packed after fusion: its plain weight is gone

    def apply(self, layer: Linear, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, x.shape[-1])  # [T, in]
        y = torch.ops.mkldnn._linear_pointwise(rows, self.packed, layer.bias, "none", [], "")
        return y.view(*x.shape[:-1], y.shape[-1])


def pack_weight(weight: torch.Tensor) -> torch.Tensor | None:
    """``weight [out, in]`` (float32, CPU) in oneDNN's layout, or None when its product on a
    check input strays from ``F.linear`` by more than rounding."""
    packed = torch.ops.mkldnn._reorder_linear_weight(weight, PACK_BATCH)
    x = torch.randn(3, weight.shape[1], generator=torch.Generator().manual_seed(0))
    ref = torch.nn.functional.linear(x, weight)
    got = torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], "")
    scale = float(ref.abs().max()) + 1e-30
    return packed if bool(((got - ref).abs() <= 1e-4 * scale).all()) else None


@torch.inference_mode()
def pack_cpu_linears(model: torch.nn.Module) -> int:
    """Pack every plain float32 CPU ``Linear`` of ``model`` in place; returns how many."""
    layers = [m for m in model.modules() if isinstance(m, Linear)
              and type(m.quant_method) is UnquantizedLinearMethod
              and m.weight.dtype == torch.float32 and m.weight.device.type == "cpu"]
    if not layers:
        return 0
    if not onednn_available():
        log.info("CPU linear layers: this torch build has no oneDNN linear; F.linear (MKL) kept")
        return 0
    shared = {p.data_ptr() for m in model.modules() if not isinstance(m, Linear)
              for p in m.parameters(recurse=False)}  # e.g. the embedding a head is tied to
    packed_count = 0
    for layer in layers:
        packed = pack_weight(layer.weight)
        if packed is None:
            log.warning("a %dx%d linear layer does not match its oneDNN-packed product: F.linear kept",
                        layer.out_features, layer.in_features)
            continue
        if layer.weight.data_ptr() not in shared:
            del layer.weight  # the packed copy replaces it (same bytes)
        layer.register_buffer("packed_weight", packed, persistent=False)
        layer.quant_method = PackedCpuLinearMethod(packed)
        packed_count += 1
    log.info("CPU linear layers: %d of %d float32 weights packed for oneDNN (batch %d layout)",
             packed_count, len(layers), PACK_BATCH)
    return packed_count
