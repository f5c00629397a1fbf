"""How GGUF's group-wise layers multiply on the CPU, chosen once at load.

The reference forward dequantizes the whole weight on every call (4-7x slower than
float32). Instead, per layer:

- bfloat16 / float16 activations, 4-bit fields (Q4_0, Q4_1, Q4_K): torch's int4 CPU kernel
  (``engine.quantization.cpu_kernels.bind_int4_cpu``: ``W = q * scale + min`` per group, as
  GGUF stores it, no requantizing);
- the same, 8-bit fields with groups of 32 or more (Q8_0, Q5_K): the values as two nibbles
  through that kernel (``bind_int8_pair_cpu``), since torch's int8 kernel takes one scale
  per output channel only;
- everything else (float32 activations, whose exactness the bf16 kernel lacks; Q6_K, whose
  groups of 16 the kernel refuses; other shapes it refuses): dequantized once at load to the
  model dtype, if memory allows; else the reference forward stays, with a warning.

Each choice is logged once per process.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import TYPE_CHECKING

import torch

from engine.gguf.linear import GGUFLinearMethod, bind_cpu_kernel, group_affine
from engine.gguf.types import type_name
from engine.host_memory import available_bytes
from engine.quantization.cpu_kernels import (
    bind_int4_cpu,
    bind_int8_pair_cpu,
    dense_cpu_weight,
    int4_kernel_group,
    log_cpu_once,
)

if TYPE_CHECKING:
    from engine.layers.linear import Linear

log = logging.getLogger(__name__)
DENSE_SHARE = 0.8  # at most this share of the memory left may go to dense copies


def bind_gguf_cpu(layers: Iterable[Linear], dtype: torch.dtype) -> None:
    """Binds each GGUF layer's CPU path (see the module docstring)."""
    dense: list[Linear] = []
    for layer in layers:
        method = layer.quant_method
        if not isinstance(method, GGUFLinearMethod) or method.dense or method.int_gemm:
            continue
        name = type_name(method.ggml_type)
        reason = _int4_refusal(layer, method, dtype)
        if reason is None:
            weights = group_affine(layer)
            bias = None if weights.bias is None else weights.bias.float()
            if weights.bits <= 4:
                kernel = bind_int4_cpu(weights.q.t(), weights.scales.t(), weights.mins.t(),
                                       weights.group, bias, weights.bits)
                how = "torch int4 weight-only kernel (_weight_int4pack_mm_for_cpu, bfloat16 compute)"
            else:
                kernel = bind_int8_pair_cpu(weights.q.t(), weights.scales.t(), weights.mins.t(),
                                            weights.group, bias)
                how = ("its values as two nibbles through torch's int4 weight-only kernel "
                       "(bfloat16 compute; no CPU int8 kernel takes a scale per group)")
            bind_cpu_kernel(layer, kernel)
            log_cpu_once(f"gguf-{name}-int4", "GGUF %s on the CPU: %s", name, how)
            continue
        log_cpu_once(f"gguf-{name}-dense-{reason}", "GGUF %s on the CPU: %s; weights dequantized "
                     "once at load to %s", name, reason, dtype)
        dense.append(layer)
    need = sum(layer.in_features * layer.out_features for layer in dense) * dtype.itemsize
    if need and need > DENSE_SHARE * available_bytes():
        log.warning("GGUF on the CPU: %d layers would need %.1f GiB dequantized, more than the "
                    "memory left allows: they dequantize on every call instead (slow)",
                    len(dense), need / 2**30)
        return
    for layer in dense:
        _dequantize_once(layer, dtype)


def _int4_refusal(layer: Linear, method: GGUFLinearMethod, dtype: torch.dtype) -> str | None:
    """Why the int4 kernel cannot take this layer, or None."""
    if dtype == torch.float32:
        return ("float32 activations (the int4 kernel computes in bfloat16: serve with "
                "--dtype bfloat16 to use it)")
    group = int4_kernel_group(layer.in_features, layer.out_features, method.group)
    return group if isinstance(group, str) else None


def _dequantize_once(layer: Linear, dtype: torch.dtype) -> None:
    method = layer.quant_method
    weight = method.dequantize(layer)  # [K, N] float32, exactly gguf's dequantization
    for name in ("qweight", "scales", "mins"):
        if name in layer._buffers:
            delattr(layer, name)
    layer.register_buffer("dense_weight", dense_cpu_weight(weight, dtype))
    method.dense = True


PAIR_MAX_ROWS = 4  # above this many rows the nibble pair costs more than the bf16 table


def bind_tied_head_cpu(head: Linear, table: torch.Tensor) -> None:
    """A head tied to a block-quantized embedding: its blocks through the int4 kernel for a
    few rows (decode; a third to a half of the table's bytes), the embedding's dequantized
    ``table [vocab, hidden]`` through a plain matmul for more (the kernel's per-row cost
    grows past the table's at about 4-8 rows: ``bench/cpu_gemm.py``)."""
    method = head.quant_method
    blocks = method.cpu_kernel if isinstance(method, GGUFLinearMethod) else None
    if blocks is None:
        return  # dequantized or float32: the reference path, as for any GGUF layer

    def kernel(x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] <= PAIR_MAX_ROWS:
            return blocks(x)
        return torch.nn.functional.linear(x, table.to(x.dtype))

    kernel.pair = getattr(blocks, "pair", None)  # type: ignore[attr-defined]
    bind_cpu_kernel(head, kernel)
