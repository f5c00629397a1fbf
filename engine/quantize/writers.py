"""Write the quantized checkpoint folder: safetensors shards (with an index when there is
more than one), config.json with ``quantization_config``, the method's side file
(AutoGPTQ's ``quantize_config.json``), and the source's tokenizer and generation files.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

log = logging.getLogger(__name__)

MAX_SHARD_BYTES = 4 * 2**30
# Source files that the output replaces or must not carry over.
_NOT_COPIED = (
    "config.json",
    "model.safetensors.index.json",
    "quantize_config.json",
    "quant_config.json",
)
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf")


class ShardWriter:
    """Collects tensors and writes a shard whenever ``max_shard_bytes`` is reached; the
    shards get their ``model-0000i-of-0000n`` names in ``finish``."""

    def __init__(self, dst: Path, max_shard_bytes: int = MAX_SHARD_BYTES) -> None:
        self.dst, self.max_bytes = dst, max_shard_bytes
        self._pending: dict[str, torch.Tensor] = {}
        self._pending_bytes = 0
        self._parts: list[tuple[Path, list[str]]] = []
        self.total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if name in self._pending or any(name in names for _, names in self._parts):
            raise AssertionError(f"tensor {name!r} written twice")
        size = tensor.numel() * tensor.element_size()
        if self._pending and self._pending_bytes + size > self.max_bytes:
            self._flush()
        self._pending[name] = tensor.detach().to("cpu").contiguous()
        self._pending_bytes += size
        self.total_bytes += size

    def _flush(self) -> None:
        part = self.dst / f".part-{len(self._parts):05d}.safetensors"
        save_file(self._pending, str(part), metadata={"format": "pt"})
        self._parts.append((part, list(self._pending)))
        self._pending, self._pending_bytes = {}, 0

    def finish(self) -> None:
        if self._pending or not self._parts:
            self._flush()
        count = len(self._parts)
        if count == 1:
            self._parts[0][0].rename(self.dst / "model.safetensors")
            return
        weight_map: dict[str, str] = {}
        for i, (part, names) in enumerate(self._parts, start=1):
            fname = f"model-{i:05d}-of-{count:05d}.safetensors"
            part.rename(self.dst / fname)
            weight_map.update(dict.fromkeys(names, fname))
        index = {
            "metadata": {"total_size": self.total_bytes},
            "weight_map": dict(sorted(weight_map.items())),
        }
        (self.dst / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def prepare_destination(src: Path, dst: Path) -> None:
    """``dst`` must not be ``src`` and must be new or empty."""
    if dst.resolve() == src.resolve():
        raise ValueError(f"the output folder {dst} is the input checkpoint; choose another")
    if dst.exists() and (not dst.is_dir() or any(dst.iterdir())):
        raise ValueError(f"the output folder {dst} already exists and is not empty")
    dst.mkdir(parents=True, exist_ok=True)


def write_configs(
    src: Path, dst: Path, quant_config: dict, dtype: torch.dtype, method: str
) -> None:
    """config.json with ``quantization_config`` (and the written dtype); AutoGPTQ's
    ``quantize_config.json`` for gptq."""
    config = json.loads((src / "config.json").read_text(encoding="utf-8"))
    config["quantization_config"] = quant_config
    name = str(dtype).removeprefix("torch.")
    for key in ("torch_dtype", "dtype"):
        if key in config:
            config[key] = name
    if "torch_dtype" not in config and "dtype" not in config:
        config["torch_dtype"] = name
    (dst / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    if method == "gptq":
        (dst / "quantize_config.json").write_text(json.dumps(quant_config, indent=2) + "\n")


def copy_side_files(src: Path, dst: Path) -> list[str]:
    """Tokenizer files, generation_config.json, chat template and the like (every file
    that is not a weight file or a config this tool rewrites)."""
    copied = []
    for file in sorted(src.iterdir()):
        if not file.is_file() or file.name in _NOT_COPIED or file.name.startswith("."):
            continue
        if file.suffix in _WEIGHT_SUFFIXES or file.name.endswith(".index.json"):
            continue
        shutil.copy2(file, dst / file.name)
        copied.append(file.name)
    return copied


def folder_bytes(path: Path, suffix: str = ".safetensors") -> int:
    return sum(f.stat().st_size for f in path.iterdir() if f.is_file() and f.name.endswith(suffix))
