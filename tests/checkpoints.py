"""Tiny random checkpoints for tests, built once and cached on disk.

Use ``tiny_checkpoint("qwen2")`` or ``tiny_variant("llama3-rope")`` (read-only: shared
by every test and run), or ``tiny_checkpoint_copy(tmp_path, "qwen2")`` for a copy a test
may edit.
The cache lives in ``$VLLM_DEPLOY_CACHE/tiny-models`` or ``<repo>/.cache/tiny-models``
and is keyed by the arguments and the source of ``agent/demo/tiny_checkpoint.py``.
"""

from __future__ import annotations

import json
import shutil
from functools import cache
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from agent.demo.tiny_checkpoint import ARCHITECTURES, LLAMA3_ROPE, cached_tiny_checkpoint

__all__ = [
    "ARCHITECTURES",
    "LLAMA3_ROPE",
    "VARIANTS",
    "as_state_dict",
    "tiny_checkpoint",
    "tiny_checkpoint_copy",
    "tiny_variant",
    "with_tensors",
]

# Named variants the parity tests cover: name -> (architecture, build options).
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "llama": ("llama", {}),
    "llama3-rope": ("llama", {"rope_parameters": LLAMA3_ROPE}),
    "mistral": ("mistral", {}),
    "qwen2": ("qwen2", {}),
    "qwen2-sharded": ("qwen2", {"shards": 3}),
    "qwen3": ("qwen3", {}),
}


def _freeze(kw: dict[str, Any]) -> str:
    return json.dumps(kw, sort_keys=True)


@cache
def _cached(architecture: str, frozen_kw: str) -> Path:
    return cached_tiny_checkpoint(architecture, **json.loads(frozen_kw))


def tiny_checkpoint(architecture: str = "qwen2", **kw: Any) -> Path:
    """Path of a cached tiny checkpoint; do not modify its files."""
    return _cached(architecture, _freeze(kw))


def tiny_variant(name: str) -> Path:
    """Path of one of ``VARIANTS``."""
    architecture, kw = VARIANTS[name]
    return tiny_checkpoint(architecture, **kw)


def tiny_checkpoint_copy(dest: Path, architecture: str = "qwen2", **kw: Any) -> Path:
    """A private copy of a cached tiny checkpoint under ``dest`` (e.g. pytest's tmp_path)."""
    target = Path(dest) / f"{architecture}-copy"
    shutil.copytree(tiny_checkpoint(architecture, **kw), target)
    return target


# -- the same checkpoint in another file layout ------------------------------------------------


def _take_tensors(src: Path, dest: Path) -> dict[str, torch.Tensor]:
    """Copy ``src`` to ``dest`` without its safetensors (and index); their tensors."""
    shutil.copytree(src, dest)
    tensors: dict[str, torch.Tensor] = {}
    for file in sorted(dest.glob("*.safetensors")):
        tensors.update(load_file(file))
        file.unlink()
    (dest / "model.safetensors.index.json").unlink(missing_ok=True)
    return tensors


def as_state_dict(src: Path, dest: Path, *names: str) -> Path:
    """``src``'s checkpoint with its safetensors replaced by ``torch.save`` files ``names``
    (the tensors split between them in name order)."""
    tensors = _take_tensors(src, dest)
    ordered = sorted(tensors)
    per_file = -(-len(ordered) // len(names))
    for i, name in enumerate(names):
        torch.save({n: tensors[n] for n in ordered[i * per_file : (i + 1) * per_file]}, dest / name)
    return dest


def with_tensors(src: Path, dest: Path, extra: dict[str, torch.Tensor]) -> Path:
    """``src``'s checkpoint with ``extra`` tensors, all in one ``model.safetensors``."""
    tensors = _take_tensors(src, dest) | extra
    save_file(tensors, str(dest / "model.safetensors"), metadata={"format": "pt"})
    return dest
