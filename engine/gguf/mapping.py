"""Our parameter names <-> GGUF tensor names, and llama.cpp's rotary row order of Q and K.

Names come from the ``gguf`` package's own table (``gguf.get_tensor_name_map``, the one
llama.cpp's converter and transformers' GGUF reader use): ``model.layers.3.self_attn.q_proj``
is ``blk.3.attn_q``. llama.cpp's converter permutes the rows of a Llama ``q_proj``/``k_proj``
(weight and bias) for its rotary layout; Qwen2/Qwen3 are written unpermuted. transformers'
``LlamaTensorProcessor`` undoes it on ``llama`` files; so do we, on whole rows (block rows of
a quantized weight move as they are, nothing is requantized).
"""

from __future__ import annotations

import gguf
import numpy as np

from engine.api import UnsupportedError

# GGUF general.architecture -> our model class (engine.config.SUPPORTED_ARCHITECTURES)
GGUF_ARCHITECTURES: dict[str, str] = {
    "llama": "LlamaForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
}
# our class -> GGUF architecture written (llama.cpp serves Mistral as llama)
WRITTEN_ARCHITECTURES: dict[str, str] = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "llama",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
}
PERMUTED_ARCHITECTURES = ("llama",)  # llama.cpp permutes Q/K rows for these


class GGUFArchitectureError(UnsupportedError, ValueError):
    """A GGUF file of an architecture our model code does not serve."""


def check_architecture(arch: str, source: str) -> str:
    """Our model class for GGUF architecture ``arch``; an unsupported one is a clear error."""
    if arch not in GGUF_ARCHITECTURES:
        raise GGUFArchitectureError(
            f"{source}: GGUF architecture {arch!r} is not supported; supported: "
            f"{', '.join(GGUF_ARCHITECTURES)}"
        )
    return GGUF_ARCHITECTURES[arch]


def gguf_names(arch: str, our_names: list[str], num_layers: int) -> dict[str, str]:
    """Our parameter name -> its GGUF tensor name (``...q_proj.weight`` -> ``blk.0.attn_q.weight``)."""
    table = gguf.get_tensor_name_map(_model_arch(arch), num_layers)
    out: dict[str, str] = {}
    for name in our_names:
        base, _, suffix = name.rpartition(".")
        mapped = table.get_name(base)
        if mapped is None:
            raise GGUFArchitectureError(f"no GGUF tensor name for {name!r} ({arch})")
        out[name] = f"{mapped}.{suffix}"
    return out


def _model_arch(arch: str) -> gguf.MODEL_ARCH:
    for key, value in gguf.MODEL_ARCH_NAMES.items():
        if value == arch:
            return key
    raise GGUFArchitectureError(f"the gguf package knows no architecture {arch!r}")


def rotary_rows(name: str, arch: str, num_heads: int, num_kv_heads: int) -> int | None:
    """The head count whose rows llama.cpp permuted in GGUF tensor ``name``, or None."""
    if arch not in PERMUTED_ARCHITECTURES:
        return None
    if ".attn_q." in name:
        return num_heads
    if ".attn_k." in name:
        return num_kv_heads
    return None


def unpermute_rows(rows: np.ndarray, heads: int) -> np.ndarray:
    """Undo llama.cpp's ``permute`` on the first axis (transformers' ``_reverse_permute_weights``):
    GGUF row order ``[head, 2, dim/2]`` read as ``[head, dim/2, 2]``."""
    dim = rows.shape[0] // heads // 2
    return rows.reshape(heads, dim, 2, *rows.shape[1:]).swapaxes(2, 1).reshape(rows.shape)


def permute_rows(rows: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's converter ``permute`` (``LlamaModel.permute``): the inverse of ``unpermute_rows``."""
    dim = rows.shape[0] // heads // 2
    return rows.reshape(heads, 2, dim, *rows.shape[1:]).swapaxes(1, 2).reshape(rows.shape)
