"""Quantize a checkpoint folder: check everything, then quantize and write.

Without calibration (``rtn`` algorithms, fp8/int8 with dynamic activations) each linear
weight is read from the source files and quantized on its own; with calibration (AWQ
search, GPTQ, static activation scales) ``layerwise.calibrated_pass`` runs the model layer
by layer. Every other tensor is copied (floating ones in the output dtype: the source's
fp16/bf16, or fp16 for an fp32 source). A failure removes what was written.

The source's tensors (safetensors, or PyTorch state dicts such as ``pytorch_model.bin``)
are read through ``engine.tensor_files``; the run is one ``reading_checkpoint()``, so each
state-dict file is unpickled once.
"""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path

import torch

from engine.config import ModelConfig
from engine.loader import checkpoint_tensor_files
from engine.quantize.calibration import calibration_tokens, read_calibration_text
from engine.quantize.formats import QuantSpec, check_shapes, quantization_config
from engine.quantize.layerwise import LINEAR_WEIGHT, calibrated_pass, quantize_weight
from engine.quantize.writers import (
    ShardWriter,
    copy_side_files,
    folder_bytes,
    prepare_destination,
    write_configs,
)
from engine.tensor_files import open_tensor_file, reading_checkpoint

log = logging.getLogger(__name__)


@reading_checkpoint()
def run(
    src: Path,
    dst: Path,
    spec: QuantSpec,
    calibration: Path | None,
    num_samples: int,
    seq_len: int,
    seed: int,
    device: str | None,
) -> Path:
    started = time.monotonic()
    model_config = ModelConfig.from_pretrained(src)
    if model_config.quantization_config:
        method = model_config.quantization_config.get("quant_method")
        raise ValueError(
            f"{src} is already quantized ({method}); start from fp16/bf16/fp32 weights"
        )
    if spec.needs_calibration:
        if num_samples < 1 or seq_len < 2:
            raise ValueError(
                f"--num_samples must be >= 1 and --seq_len >= 2, got {num_samples} and {seq_len}"
            )
        read_calibration_text(calibration)  # a bad file fails now, not after loading the model
    files = checkpoint_tensor_files(src)
    shapes, src_dtype = _linear_shapes(files)
    if not shapes:
        raise ValueError(
            f"{src}: no decoder-layer linear weights (model.layers.N.*_proj.weight) found"
        )
    check_shapes(spec, shapes)
    out_dtype = src_dtype if src_dtype in (torch.float16, torch.bfloat16) else torch.float16
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))

    created = not dst.exists()
    prepare_destination(src, dst)
    try:
        writer = ShardWriter(dst)
        if spec.needs_calibration:
            tokens = calibration_tokens(src, calibration, num_samples, seq_len, seed)
            done = calibrated_pass(src, spec, tokens, dev, writer, out_dtype, set(files))
        else:
            done = _direct(files, spec, writer)
        for name, file in files.items():  # embeddings, norms, lm_head, biases
            if name not in done:
                writer.add(name, _read(file, name, out_dtype))
        writer.finish()
        write_configs(src, dst, quantization_config(spec), out_dtype, spec.method)
        copy_side_files(src, dst)
    except BaseException:
        if created:
            shutil.rmtree(dst, ignore_errors=True)
        else:
            for f in dst.iterdir():
                shutil.rmtree(f, ignore_errors=True) if f.is_dir() else f.unlink()
        raise
    before = sum(file.stat().st_size for file in set(files.values()))
    after = folder_bytes(dst)
    log.info(
        "wrote %s (%s) in %.1fs: weights %.2f MiB -> %.2f MiB (%.2fx smaller)",
        dst,
        _describe(spec),
        time.monotonic() - started,
        before / 2**20,
        after / 2**20,
        before / max(after, 1),
    )
    return dst


def _describe(spec: QuantSpec) -> str:
    if spec.method in ("fp8", "int8"):
        return f"{spec.method}, weights per {spec.strategy}, {spec.activations} activations"
    extra = (", act-order" if spec.act_order else "") + (", sym" if spec.sym else "")
    return f"{spec.method} {spec.bits}-bit, group {spec.group_size}, {spec.algorithm}{extra}"


def _linear_shapes(files: dict[str, Path]) -> tuple[dict[str, tuple[int, int]], torch.dtype]:
    """Each linear layer's ``(N, K)``, and the source dtype: that of the last linear weight
    stored in fp16, bf16 or fp32 (fp16 when none is)."""
    shapes: dict[str, tuple[int, int]] = {}
    dtype = torch.float16
    for name, file in files.items():
        if LINEAR_WEIGHT.match(name):
            with open_tensor_file(file) as fh:
                n, k = fh.shape(name)
                if fh.dtype(name) in _SOURCE_DTYPES:
                    dtype = fh.dtype(name)
            shapes[name.removesuffix(".weight")] = (n, k)
    return shapes, dtype


_SOURCE_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _read(file: Path, name: str, dtype: torch.dtype) -> torch.Tensor:
    with open_tensor_file(file) as fh:
        t = fh.get(name)
    return t.to(dtype) if t.is_floating_point() else t


def _direct(files: dict[str, Path], spec: QuantSpec, writer: ShardWriter) -> set[str]:
    done = set()
    for name, file in files.items():
        if not LINEAR_WEIGHT.match(name):
            continue
        prefix = name.removesuffix(".weight")
        tensors, _ = quantize_weight(spec, _read(file, name, torch.float32), None)
        for key, t in tensors.items():
            writer.add(f"{prefix}.{key}", t)
        done.add(name)
        log.debug("quantized %s", prefix)
    log.info("quantized %d linear layers", len(done))
    return done
