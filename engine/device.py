"""Which device and dtype the engine runs on, from the user's choice and the checkpoint."""

from __future__ import annotations

import torch

from engine.api import EngineError

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def resolve_device(name: str) -> torch.device:
    """``auto``: the GPU when there is one, else the CPU. ``cuda`` without a GPU is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name == "cuda" or name.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise EngineError(
                f"device {name!r} was asked for but torch sees no CUDA GPU "
                f"(torch {torch.__version__}, CUDA build: {torch.version.cuda}); use --device cpu"
            )
        device = torch.device(name)
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise EngineError(f"device {name!r}: only {torch.cuda.device_count()} GPU(s) visible")
        return device
    raise ValueError(f"device must be auto, cpu, cuda or cuda:N, got {name!r}")


def resolve_dtype(name: str, config_dtype: str | None, device: torch.device) -> torch.dtype:
    """``auto``: float32 on the CPU; on a GPU the checkpoint's fp16/bf16, and for a float32
    (or unknown) checkpoint bf16 where the GPU supports it, else fp16."""
    if name != "auto":
        if name not in _DTYPES:
            raise ValueError(f"dtype must be auto, {', '.join(_DTYPES)}, got {name!r}")
        dtype = _DTYPES[name]
        if dtype == torch.bfloat16 and device.type == "cuda" and not torch.cuda.is_bf16_supported():
            raise EngineError(
                f"this GPU ({torch.cuda.get_device_name(device)}) has no bfloat16; use float16"
            )
        return dtype
    if device.type != "cuda":
        return torch.float32
    if config_dtype in ("float16", "bfloat16"):
        dtype = _DTYPES[config_dtype]
        if dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported():
            return torch.float16
        return dtype
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
