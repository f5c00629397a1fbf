"""compressed-tensors quantization configs (llm-compressor's output), shared by fp8 and int8.

What we read from ``quantization_config``:

- ``config_groups.<name>``: ``targets`` (``"Linear"``, a module name, or ``"re:<regex>"``),
  ``weights {num_bits: 8, type, symmetric: true, strategy: "tensor" | "channel"}`` and
  ``input_activations`` (``{strategy: "tensor", dynamic: false}`` static per tensor,
  ``{strategy: "token", dynamic: true}`` dynamic per token, or null for weight-only).
- ``ignore``: module names or ``"re:<regex>"`` left in the model dtype.

Names match as compressed-tensors matches them (``utils/match.py``): a plain entry equals
the module name, ``re:`` entries are ``re.match``-ed (anchored at the start only). Our layer
prefixes are the Hugging Face module names (no fused ``qkv_proj``), so entries apply as written.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import torch

from deploy_kernels.log_once import log_fallback_once
from engine.quantization.base import QuantFormatError, TensorSet

LINEAR_CLASS_TARGETS = ("Linear",)  # class-name targets that select every linear layer
_FORMATS = {"float": ("float-quantized", "naive-quantized"), "int": ("int-quantized", "naive-quantized")}
_WEIGHT_STRATEGIES = {"float": ("tensor", "channel", "block"), "int": ("tensor", "channel")}


@dataclass(frozen=True)
class CTScheme:
    """One config group's scheme, checked. ``input_strategy`` None: weight-only."""

    weight_strategy: str  # "tensor" | "channel" | "block" (fp8: a scale per [bn, bk] tile)
    # "tensor" (static, or dynamic read as per token) | "token" | "group" (dynamic, read as per
    # token) | None
    input_strategy: str | None
    input_dynamic: bool
    input_symmetric: bool
    block: tuple[int, int] | None = None  # weights' block_structure [bn, bk] with "block"

    def describe(self) -> str:
        if self.input_strategy is None:
            acts = "activations unquantized"
        elif self.input_dynamic:
            acts = "activations dynamic per-token"
        else:
            acts = "activations static per-tensor"
        if self.block is not None:
            return f"weights in {list(self.block)} blocks requantized per-channel, {acts}"
        return f"weights per-{self.weight_strategy}, {acts}"


@dataclass(frozen=True)
class CTConfig:
    """Which layer gets which scheme: first group whose targets match, unless ignored."""

    groups: tuple[tuple[tuple[str, ...], CTScheme], ...]
    ignore: tuple[str, ...]

    def scheme_for(self, prefix: str) -> CTScheme | None:
        if any(name_matches(prefix, entry) for entry in self.ignore):
            return None
        for targets, scheme in self.groups:
            if any(t in LINEAR_CLASS_TARGETS or name_matches(prefix, t) for t in targets):
                return scheme
        return None


def name_matches(name: str, entry: str) -> bool:
    """compressed-tensors' rule: ``re:`` entries ``re.match`` the name, others equal it."""
    if entry.startswith("re:"):
        return re.match(entry[3:], name) is not None
    return entry == name


def parse_compressed_tensors(raw: dict[str, Any], source: str, kind: str) -> CTConfig:
    """Check a compressed-tensors config of ``kind`` ``"float"`` (fp8) or ``"int"`` (int8)."""
    fmt = raw.get("format")
    if fmt is not None and fmt not in _FORMATS[kind]:
        raise QuantFormatError(
            f"{source}: compressed-tensors 'format' {fmt!r} is not supported for {kind} "
            f"weights; expected one of {', '.join(_FORMATS[kind])}"
        )
    groups = raw.get("config_groups")
    if not isinstance(groups, dict) or not groups:
        raise QuantFormatError(f"{source}: compressed-tensors config without 'config_groups'")
    parsed = []
    for name, group in groups.items():
        key = f"{source}: config_groups.{name}"
        if not isinstance(group, dict):
            raise QuantFormatError(f"{key} must be an object")
        group_fmt = group.get("format")
        if group_fmt is not None and group_fmt not in _FORMATS[kind]:
            raise QuantFormatError(f"{key}.format {group_fmt!r} is not supported for {kind} weights")
        targets = group.get("targets")
        if not isinstance(targets, list) or not all(isinstance(t, str) for t in targets):
            raise QuantFormatError(f"{key}.targets must be a list of strings, got {targets!r}")
        if group.get("output_activations") is not None:
            raise QuantFormatError(f"{key}.output_activations: output quantization is not supported")
        parsed.append((tuple(targets), _scheme(group, key, kind)))
    ignore = raw.get("ignore") or []
    if not isinstance(ignore, list) or not all(isinstance(i, str) for i in ignore):
        raise QuantFormatError(f"{source}: 'ignore' must be a list of strings, got {ignore!r}")
    for entry in ignore:
        if entry.startswith("re:"):
            try:
                re.compile(entry[3:])
            except re.error as exc:
                raise QuantFormatError(f"{source}: ignore entry {entry!r} is not a valid regex ({exc})") from exc
    return CTConfig(tuple(parsed), tuple(ignore))


def _scheme(group: dict[str, Any], key: str, kind: str) -> CTScheme:
    weights = group.get("weights")
    if not isinstance(weights, dict):
        raise QuantFormatError(f"{key} has no 'weights' scheme")
    expected_bits = 8
    if weights.get("num_bits") != expected_bits or weights.get("type") != kind:
        raise QuantFormatError(
            f"{key}.weights: num_bits {weights.get('num_bits')!r}, type {weights.get('type')!r}; "
            f"expected num_bits 8, type {kind!r}"
        )
    if weights.get("symmetric", True) is not True:
        raise QuantFormatError(f"{key}.weights.symmetric: asymmetric weights are not supported")
    if weights.get("dynamic", False):
        raise QuantFormatError(f"{key}.weights.dynamic: dynamic weight quantization is not supported")
    strategy = weights.get("strategy")
    if strategy not in _WEIGHT_STRATEGIES[kind]:
        raise QuantFormatError(
            f"{key}.weights.strategy {strategy!r} is not supported for {kind} weights; expected "
            f"{' or '.join(repr(s) for s in _WEIGHT_STRATEGIES[kind])}"
        )
    block = _block_structure(weights, key) if strategy == "block" else None
    acts = group.get("input_activations")
    if acts is None:
        return CTScheme(strategy, None, False, True, block)
    if not isinstance(acts, dict):
        raise QuantFormatError(f"{key}.input_activations must be an object or null")
    if acts.get("num_bits") not in (None, 8) or acts.get("type", kind) != kind:
        raise QuantFormatError(
            f"{key}.input_activations: num_bits {acts.get('num_bits')!r}, type "
            f"{acts.get('type')!r}; expected num_bits 8, type {kind!r}"
        )
    a_strategy, dynamic = acts.get("strategy"), acts.get("dynamic", False)
    symmetric = acts.get("symmetric", True) is True
    if a_strategy == "token" and dynamic is True:
        pass
    elif a_strategy == "tensor" and dynamic in (True, False):
        pass  # dynamic per tensor runs per token (finer, the same kernel)
    elif a_strategy == "group" and dynamic is True and kind == "float":
        pass  # block-quantized presets (FP8_BLOCK): dynamic per token-group, run per token
    else:
        raise QuantFormatError(
            f"{key}.input_activations: strategy {a_strategy!r} with dynamic {dynamic!r} is not "
            "supported; expected strategy 'tensor' (static or dynamic), 'token' (dynamic) or, "
            "for fp8, 'group' (dynamic)"
        )
    if not symmetric and (kind == "float" or dynamic):
        raise QuantFormatError(
            f"{key}.input_activations.symmetric: asymmetric activations are supported only "
            "for static int8"
        )
    return CTScheme(strategy, a_strategy, bool(dynamic), symmetric, block)


def _block_structure(weights: dict[str, Any], key: str) -> tuple[int, int]:
    block = weights.get("block_structure")
    if not (isinstance(block, list) and len(block) == 2
            and all(isinstance(b, int) and not isinstance(b, bool) and b > 0 for b in block)):
        raise QuantFormatError(
            f"{key}.weights.block_structure must be [bn, bk] (positive integers) with strategy "
            f"'block', got {block!r}"
        )
    return block[0], block[1]


# -- layer tensors shared by the fp8 and int8 methods ---------------------------------------

SCALE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# KV-cache scales that some tools store under the k/v projection (``k_proj.output_scale``,
# ``k_proj.k_scale``): not the linear layer's business; engine.kv_setup owns KV scales.
KV_SCALE_NAMES = ("output_scale", "k_scale", "v_scale", "kv_scale")


def set_buffer(layer: torch.nn.Module, name: str, tensor: torch.Tensor | None) -> None:
    """Register a runtime tensor (``create_weights`` left ``bias`` as a plain attribute)."""
    layer.__dict__.pop(name, None)
    layer.register_buffer(name, tensor)


def take_scale(tensors: TensorSet, name: str, rows: int | None, device: torch.device) -> torch.Tensor:
    """``name`` as float32 ``(1,)`` (one value) or ``(rows, 1)`` (per output channel; ``rows``
    None: per tensor only). Accepts the shapes the tools write: ``()``, ``(1,)``, ``(N,)``, ``(N, 1)``."""
    scale = tensors.take(name, dtypes=SCALE_DTYPES)
    if scale.numel() == 1 and scale.dim() <= 1:
        return scale.to(device=device, dtype=torch.float32).reshape(1)
    if rows is not None and tuple(scale.shape) in ((rows,), (rows, 1)):
        return scale.to(device=device, dtype=torch.float32).reshape(rows, 1)
    wanted = "(1,)" if rows is None else f"(1,) or ({rows}, 1)"
    raise QuantFormatError(
        f"tensor {tensors.prefix}.{name!s} has shape {list(scale.shape)}, expected {wanted}"
    )


def take_bias(layer: torch.nn.Module, tensors: TensorSet, device: torch.device, dtype: torch.dtype) -> None:
    bias = tensors.take("bias", shape=(layer.out_features,), dtypes=FLOAT_DTYPES, optional=not layer.has_bias)
    set_buffer(layer, "bias", None if bias is None else bias.to(device=device, dtype=dtype))


def drop_kv_scales(tensors: TensorSet) -> None:
    """Accept KV-cache scales stored under a linear prefix; they are not used by the layer."""
    found = [n for n in KV_SCALE_NAMES if tensors.has(n)]
    for name in found:
        tensors.take(name)
    if found:
        log_fallback_once(
            "kv-scales-under-linear",
            "%s.%s: KV-cache scales stored under a linear layer are not read (engine.kv_setup "
            "reads model.layers.N.self_attn.k_scale / v_scale); the KV cache uses its own scales",
            tensors.prefix, found[0],
        )
