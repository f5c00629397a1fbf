"""Which device and dtype the engine runs on, from the user's choice and the checkpoint."""

from __future__ import annotations

import logging

import torch

from engine.api import EngineError

log = logging.getLogger(__name__)

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


def cpu_has_bf16_kernels() -> bool:
    """The CPU runs torch's bfloat16 int4/int8 weight-only kernels natively (AVX512-BF16)."""
    probe = getattr(torch.cpu, "_is_avx512_bf16_supported", None)
    return bool(probe is not None and probe())


def resolve_dtype(name: str, config_dtype: str | None, device: torch.device,
                  int_weights: bool = False) -> torch.dtype:
    """``auto``: on the CPU float32 (exact), but bfloat16 for ``int_weights`` (AWQ, GPTQ,
    GGUF blocks) where the CPU has native bf16: their CPU kernels compute in bf16, and in
    float32 those weights would be dequantized to a float32 copy, 8x their size and slower
    (``engine.quantization.cpu_bind``). On a GPU the checkpoint's fp16/bf16, and for a
    float32 (or unknown) checkpoint bf16 where the GPU supports it, else fp16."""
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
        if int_weights and cpu_has_bf16_kernels():
            log.info("dtype auto on the CPU: bfloat16 for the quantized weights' int kernels "
                     "(--dtype float32 for exact float32 math on a dequantized copy)")
            return torch.bfloat16
        return torch.float32
    if config_dtype in ("float16", "bfloat16"):
        dtype = _DTYPES[config_dtype]
        if dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported():
            return torch.float16
        return dtype
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
