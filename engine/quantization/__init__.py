"""Quantization methods by name, and which one a checkpoint + ``--quantization`` ask for.

The checkpoint says how it was quantized in ``config.json`` (``quantization_config``) or in
a file beside it (``quantize_config.json`` from AutoGPTQ, ``quant_config.json`` from older
AutoAWQ and SqueezeLLM). The flag may confirm that, or ask to quantize a plain model at
load time (fp8, int8, bitsandbytes). A flag that contradicts the checkpoint is an error
that says what to do instead.
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path
from typing import Any

from engine.quantization.base import QuantConfig, QuantFormatError

# name -> "module:ConfigClass"; imported on first use so that each method stays optional
_METHODS: dict[str, str] = {
    "awq": "engine.quantization.awq:AWQConfig",
    "gptq": "engine.quantization.gptq:GPTQConfig",
    "squeezellm": "engine.quantization.squeezellm:SqueezeLLMConfig",
    "fp8": "engine.quantization.fp8:FP8Config",
    "int8": "engine.quantization.int8:Int8Config",
    "bitsandbytes": "engine.quantization.bitsandbytes:BitsAndBytesConfig",
}
PRE_QUANTIZED_ONLY = ("awq", "gptq", "squeezellm")  # cannot quantize a plain model at load
_ALIASES = {"awq_marlin": "awq", "gptq_marlin": "gptq", "marlin": "gptq", "bnb": "bitsandbytes"}
_SIDE_FILES = ("quantize_config.json", "quant_config.json")
COMPRESSED_TENSORS = "compressed-tensors"  # a format (fp8 or int8 inside), not a method

__all__ = ["QuantConfig", "QuantFormatError", "method_names", "normalise_method", "read_checkpoint_quant", "resolve"]


def method_names() -> tuple[str, ...]:
    return tuple(_METHODS)


def read_checkpoint_quant(path: Path, config_json_quant: dict | None) -> tuple[str, dict, str] | None:
    """``(method, raw config, source)`` that the checkpoint at ``path`` declares, or None."""
    if config_json_quant:
        merged = dict(config_json_quant)
        source = str(path / "config.json")
        side = _read_side_file(path)
        if side is not None:  # GPTQ checkpoints often repeat their keys beside config.json
            merged = {**side[0], **merged}
        return _method_of(merged, source), merged, source
    side = _read_side_file(path)
    if side is None:
        return None
    raw, source = side
    return _method_of(raw, source), raw, source


def resolve(flag: str | None, path: str | Path, config_json_quant: dict | None, options: dict[str, Any]) -> QuantConfig | None:
    """The ``QuantConfig`` for ``--quantization flag`` on the checkpoint at ``path``; None
    for plain weights."""
    path = Path(path)
    wanted = normalise_method(flag)
    declared = read_checkpoint_quant(path, config_json_quant)
    if flag is not None and _flag_name(flag) == COMPRESSED_TENSORS:
        _check_compressed_tensors(path, declared)
    if declared is None:
        if wanted is None:
            return None
        if wanted in PRE_QUANTIZED_ONLY:
            fmt = {"awq": "AWQ", "gptq": "GPTQ", "squeezellm": "SqueezeLLM"}[wanted]
            raise QuantFormatError(
                f"this model ({path}) is not {fmt}-quantized (its config.json has no "
                f"quantization_config, and there is no quantize_config.json or quant_config.json); "
                f"use --quantization bitsandbytes, fp8 or int8 to quantize it at load time, or "
                f"download a pre-quantized {fmt} model"
            )
        return _config_class(wanted).from_checkpoint(None, str(path), options)
    method, raw, source = declared
    if wanted is not None and wanted != method:
        raise QuantFormatError(
            f"--quantization {flag} contradicts the checkpoint: {source} says it is "
            f"{method}-quantized; use --quantization {method} (or leave --quantization unset), "
            f"or serve a plain fp16/bf16 model to quantize it with {wanted} at load time"
        )
    return _config_class(method).from_checkpoint(raw, source, options)


def _check_compressed_tensors(path: Path, declared: tuple[str, dict, str] | None) -> None:
    """``--quantization compressed-tensors`` names a format, not a method (the checkpoint's
    config tells fp8 from int8): it must be what the checkpoint holds."""
    if declared is None:
        raise QuantFormatError(
            f"--quantization compressed-tensors: this model ({path}) is not quantized (its "
            f"config.json has no quantization_config); use --quantization fp8 or int8 to "
            f"quantize it at load time, or download a compressed-tensors model"
        )
    method, raw, source = declared
    if str(raw.get("quant_method", "")).lower() != COMPRESSED_TENSORS:
        raise QuantFormatError(
            f"--quantization compressed-tensors contradicts the checkpoint: {source} says it "
            f"is {method}-quantized; use --quantization {method} (or leave --quantization unset)"
        )


def _flag_name(flag: str) -> str:
    """A ``--quantization`` value as compared: trimmed, lower case, aliases resolved."""
    name = flag.strip().lower()
    return _ALIASES.get(name, name)


def normalise_method(flag: str | None) -> str | None:
    """The method ``--quantization flag`` names (aliases resolved), None for "what the
    checkpoint says"; an unknown name is a ``QuantFormatError`` listing the choices."""
    if flag is None:
        return None
    name = _flag_name(flag)
    if name in ("", "none", "auto"):
        return None
    if name == COMPRESSED_TENSORS:
        return None  # the checkpoint's config tells fp8 from int8 (resolve checks the format)
    if name not in _METHODS:
        raise QuantFormatError(
            f"unknown quantization {flag!r}; choose one of none, {', '.join(_METHODS)}"
        )
    return name


def _config_class(name: str) -> type[QuantConfig]:
    module_name, _, cls_name = _METHODS[name].partition(":")
    return getattr(importlib.import_module(module_name), cls_name)


def _read_side_file(path: Path) -> tuple[dict, str] | None:
    for name in _SIDE_FILES:
        file = path / name
        if file.is_file():
            try:
                raw = json.loads(file.read_text(encoding="utf-8"))
            except json.JSONDecodeError as exc:
                raise QuantFormatError(f"{file}: not valid JSON ({exc})") from exc
            if not isinstance(raw, dict):
                raise QuantFormatError(f"{file}: must hold a JSON object")
            return raw, str(file)
    return None


def _method_of(raw: dict, source: str) -> str:
    method = str(raw.get("quant_method", "")).lower()
    method = _ALIASES.get(method, method)
    if method == COMPRESSED_TENSORS:
        return _compressed_tensors_method(raw, source)
    if method in _METHODS:
        return method
    if not method:
        if "w_bit" in raw:
            return "awq"
        if "wbits" in raw:
            return "squeezellm"
        if "bits" in raw:
            return "gptq"
    raise QuantFormatError(
        f"{source}: quantization method {raw.get('quant_method')!r} is not supported; "
        f"supported: {', '.join(_METHODS)}, compressed-tensors (fp8 and int8)"
    )


def _compressed_tensors_method(raw: dict, source: str) -> str:
    fmt = raw.get("format")
    groups = raw.get("config_groups")
    if not isinstance(groups, dict) or not groups:
        raise QuantFormatError(f"{source}: compressed-tensors config without 'config_groups'")
    kinds = set()
    for name, group in groups.items():
        weights = group.get("weights") if isinstance(group, dict) else None
        if not isinstance(weights, dict):
            raise QuantFormatError(f"{source}: config_groups.{name} has no 'weights' scheme")
        kinds.add((weights.get("type"), weights.get("num_bits")))
    if kinds == {("float", 8)} and fmt in (None, "float-quantized", "naive-quantized"):
        return "fp8"
    if kinds == {("int", 8)} and fmt in (None, "int-quantized", "naive-quantized"):
        return "int8"
    raise QuantFormatError(
        f"{source}: compressed-tensors format {fmt!r} with weights {sorted(map(str, kinds))} is "
        "not supported; supported: float-quantized (8-bit float) and int-quantized (8-bit int)"
    )
