"""Tiny random checkpoints for tests, built once and cached on disk.

Use ``tiny_checkpoint("qwen2")`` or ``tiny_variant("llama3-rope")`` (read-only: shared
by every test and run), or ``tiny_checkpoint_copy(tmp_path, "qwen2")`` for a copy a test
may edit.
The cache lives in ``$VLLM_DEPLOY_CACHE/tiny-models`` or ``<repo>/.cache/tiny-models``
and is keyed by the arguments and the source of ``engine/tiny_checkpoint.py``.
"""

from __future__ import annotations

import json
import shutil
from functools import cache
from pathlib import Path
from typing import Any

from engine.tiny_checkpoint import ARCHITECTURES, LLAMA3_ROPE, cached_tiny_checkpoint

__all__ = [
    "ARCHITECTURES",
    "LLAMA3_ROPE",
    "VARIANTS",
    "tiny_checkpoint",
    "tiny_checkpoint_copy",
    "tiny_variant",
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
