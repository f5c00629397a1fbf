"""GGUF checkpoints (llama.cpp's format): read them into our model, write them for llama.cpp.

- ``types``: the tensor types, and the block maths that maps them onto group-wise ints.
- ``mapping``: our parameter names <-> GGUF tensor names, llama.cpp's Q/K row order.
- ``reader``: one file's tensors (``gguf.GGUFReader``), config and tokenizer (transformers).
- ``linear``: the block-quantized linear layer; ``load``: the whole model.
- ``writer``: a plain checkpoint folder -> one GGUF file (``gguf.GGUFWriter``).

This module imports neither torch nor gguf: ``engine.model_source`` uses it.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["is_gguf_path"]


def is_gguf_path(path: str | Path) -> bool:
    """Whether ``path`` is a GGUF file (what ``model_source`` resolves a GGUF model to)."""
    p = Path(path)
    return p.suffix.lower() == ".gguf" and p.is_file()
