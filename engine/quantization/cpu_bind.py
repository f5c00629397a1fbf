"""Choose, once at load, how an AWQ / GPTQ / SqueezeLLM layer multiplies on the CPU.

On a GPU the Triton kernels read the packed buffers as they are. On the CPU the
reference (dequantize the whole weight, then matmul) would run on every call, so the
layer is rebound here instead, by activation dtype:

- bfloat16 / float16: group-wise 4-bit (and 2-, 3-bit) weights go to torch's int4 CPU
  kernel, one-group 8-bit weights to its int8 kernel, group-wise 8-bit weights to the int4
  kernel as two nibbles (``engine.quantization.cpu_kernels``); what none takes (group sizes
  not a multiple of 32, N not a multiple of 16, lookup tables) is dequantized once to the
  model dtype.
- float32: the kernels compute in bf16, short of float32's exactness, so the weight is
  dequantized once to float32 (bit-exact to the reference weight, float32 matmul speed;
  serve with ``--dtype bfloat16`` for the int kernels).

Each choice is logged once per process (one line naming the layer kind and why).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import torch

from deploy_kernels.int_gemm_ref import unpack_along_k
from deploy_kernels.log_once import log_once
from engine.quantization.cpu_kernels import (
    dense_cpu_weight,
    int4_kernel_group,
    pack_int4_cpu,
    pack_int8_cpu,
    pack_int8_pair_cpu,
)

if TYPE_CHECKING:
    from engine.layers.linear import Linear
    from engine.quantization.int_linear import PackedLinearMethod

log = logging.getLogger(__name__)
PACKED_BUFFERS = ("qweight", "scales", "zeros", "lut")


def bind_packed_cpu(method: PackedLinearMethod, layer: Linear, dtype: torch.dtype) -> None:
    """Replace the layer's packed buffers by what its CPU path reads; sets ``method.cpu_kind``
    to ``"int4"``, ``"int8"`` or ``"dense"``."""
    label = type(method.config).label
    k, n = layer.in_features, layer.out_features
    bits, group = method.runtime_bits, method.group_size
    if getattr(layer, "dense_weight", None) is not None:  # scattered g_idx: dense already
        method.cpu_kind = "dense"
        return
    if dtype == torch.float32:
        _log(label, "float32", "%s on the CPU with float32 activations: weights dequantized once at load to "
             "float32 (exact; the int4/int8 CPU kernels compute in bfloat16: serve with --dtype bfloat16 "
             "to use them)", label)
        _bind_dense(method, layer, dtype)
        return
    if method.lut_gemm:
        _log(label, "lut", "%s on the CPU: no lookup-table CPU kernel; weights dequantized once at load to %s",
             label, dtype)
        _bind_dense(method, layer, dtype)
        return
    if bits in (2, 4):
        kernel_group = int4_kernel_group(k, n, group)
        if isinstance(kernel_group, int):
            _log(label, "int4", "%s %d-bit on the CPU: torch int4 weight-only kernel (_weight_int4pack_mm_for_cpu, "
                 "bfloat16 compute)", label, getattr(method.config, "bits", bits))
            _bind_int4(method, layer, k)
            return
        reason = kernel_group
    elif bits == 8 and group == k:
        _log(label, "int8", "%s 8-bit on the CPU: torch int8 weight-only kernel (_weight_int8pack_mm, "
             "bfloat16 compute)", label)
        _bind_int8(method, layer, k)
        return
    elif bits == 8 and isinstance(int4_kernel_group(k, n, group), int):
        _log(label, "int8-pair", "%s 8-bit with a scale per %d on the CPU: its values as two nibbles "
             "through torch's int4 weight-only kernel (bfloat16 compute; the int8 kernel takes one "
             "scale per output channel only)", label, group)
        _bind_int8_pair(method, layer, k)
        return
    else:
        reason = f"group size {group}: neither the int8 kernel (one scale per output channel) nor the int4 kernel takes it"
    _log(label, f"dense-{reason}", "%s %d-bit on the CPU: no CPU kernel for this layer (%s); weights "
         "dequantized once at load to %s", label, getattr(method.config, "bits", bits), reason, dtype)
    _bind_dense(method, layer, dtype)


def _log(label: str, key: str, message: str, *args: object) -> None:
    log_once(log, f"cpu-bind-{label}-{key}", message, *args)


def _drop_packed(layer: Linear) -> None:
    for name in PACKED_BUFFERS:
        if name in layer._buffers:
            delattr(layer, name)


def _bind_dense(method: PackedLinearMethod, layer: Linear, dtype: torch.dtype) -> None:
    """``dense_weight [K, N]`` in the checkpoint's channel order (a view of ``[N, K]``
    contiguous, the layout a plain layer's matmul reads), no ``perm``."""
    w = method.dequantize(layer)  # float32, the reference formula
    _drop_packed(layer)
    if "perm" in layer._buffers:
        delattr(layer, "perm")
    layer.register_buffer("dense_weight", dense_cpu_weight(w, dtype))
    method.cpu_kind = "dense"


def _bind_int4(method: PackedLinearMethod, layer: Linear, k: int) -> None:
    q = unpack_along_k(layer.qweight, method.runtime_bits, k)  # [K, N], runtime channel order
    scales = layer.scales.float()
    bits = getattr(method.config, "bits", method.runtime_bits)  # 3-bit values sit in 4-bit fields
    packed = pack_int4_cpu(q, scales, -layer.zeros.double() * scales.double(), method.group_size, bits)
    _drop_packed(layer)
    layer.register_buffer("cpu_qweight", packed.qweight)
    layer.register_buffer("cpu_scales_zeros", packed.scales_and_zeros)
    method.cpu_group = packed.group
    method.cpu_kind = "int4"


def _bind_int8_pair(method: PackedLinearMethod, layer: Linear, k: int) -> None:
    q = unpack_along_k(layer.qweight, 8, k)  # [K, N], runtime channel order
    scales = layer.scales.float()
    pair = pack_int8_pair_cpu(q, scales, -layer.zeros.double() * scales.double(), method.group_size)
    _drop_packed(layer)
    for half, weights in (("high", pair.high), ("low", pair.low)):  # buffers: counted as weights
        layer.register_buffer(f"cpu_{half}_qweight", weights.qweight)
        layer.register_buffer(f"cpu_{half}_scales_zeros", weights.scales_and_zeros)
    method.cpu_pair = pair  # the same tensors, as the kernel takes them
    method.cpu_kind = "int8_pair"


def _bind_int8(method: PackedLinearMethod, layer: Linear, k: int) -> None:
    q = unpack_along_k(layer.qweight, 8, k)
    packed = pack_int8_cpu(q, layer.scales.float(), layer.zeros.float())
    _drop_packed(layer)
    layer.register_buffer("cpu_qweight", packed.qweight)
    layer.register_buffer("cpu_scales", packed.scales)
    layer.register_buffer("cpu_offsets", packed.offsets)
    method.cpu_kind = "int8"
