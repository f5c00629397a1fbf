"""Quantize a plain fp16/bf16/fp32 Llama-family checkpoint into AWQ, GPTQ, FP8 or INT8.

``quantize_checkpoint(src, dst, method, ...)`` writes a folder in the standard format
(AutoAWQ GEMM, AutoGPTQ v1, compressed-tensors float-/int-quantized; see FORMATS.md) that
our loader and other engines read. ``python -m engine.quantize`` is its command line.
"""

from __future__ import annotations

from pathlib import Path

from engine.quantize.formats import METHODS, QuantSpec, make_spec

__all__ = ["METHODS", "QuantSpec", "make_spec", "quantize_checkpoint"]


def quantize_checkpoint(
    src: str | Path,
    dst: str | Path,
    method: str,
    bits: int | None = None,
    group_size: int = 128,
    algorithm: str = "auto",
    act_order: bool = False,
    sym: bool = False,
    calibration: str | Path | None = None,
    num_samples: int = 32,
    seq_len: int = 128,
    strategy: str = "channel",
    activations: str = "dynamic",
    damp_percent: float = 0.01,
    seed: int = 0,
    static_groups: bool = False,
    device: str | None = None,
) -> Path:
    """Quantize the checkpoint folder ``src`` into the new folder ``dst``; returns ``dst``.

    ``bits``: 4 for awq (the only choice) and gptq (2, 3, 4 or 8) when None; fp8/int8 are
    8-bit. ``algorithm``: "auto" (awq: the AWQ scale search; gptq: GPTQ), or "rtn" (plain
    round to nearest, no calibration). ``act_order``, ``sym``, ``static_groups``,
    ``damp_percent``: GPTQ's. ``strategy`` (weight scale per "tensor" or "channel") and
    ``activations`` ("dynamic" per token, or "static": one calibrated scale per layer):
    fp8/int8. ``calibration``: a text or .jsonl file (default: a built-in text).
    Settings that do not fit the method or the model raise ``ValueError`` before any work.
    """
    from engine.quantize.pipeline import run

    # by keyword: three of these settings are booleans, easy to swap by position
    spec = make_spec(
        method, bits=bits, group_size=group_size, algorithm=algorithm, act_order=act_order,
        sym=sym, static_groups=static_groups, strategy=strategy, activations=activations,
        damp_percent=damp_percent,
    )
    src, dst = Path(src), Path(dst)
    if not (src / "config.json").is_file():
        raise ValueError(f"{src} is not a checkpoint folder (no config.json)")
    return run(
        src,
        dst,
        spec,
        None if calibration is None else Path(calibration),
        num_samples,
        seq_len,
        seed,
        device,
    )
