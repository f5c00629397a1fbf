"""Registry of model classes by the Hugging Face architecture name in config.json."""

from __future__ import annotations

import torch

from engine.api import UnsupportedError
from engine.models.llama import LlamaForCausalLM

_REGISTRY: dict[str, type[torch.nn.Module]] = {
    "LlamaForCausalLM": LlamaForCausalLM,
    "MistralForCausalLM": LlamaForCausalLM,
    "Qwen2ForCausalLM": LlamaForCausalLM,
    "Qwen3ForCausalLM": LlamaForCausalLM,
}


def supported_architectures() -> tuple[str, ...]:
    return tuple(sorted(_REGISTRY))


def get_model_class(architecture: str) -> type[torch.nn.Module]:
    try:
        return _REGISTRY[architecture]
    except KeyError:
        raise UnsupportedError(
            f"architecture {architecture!r} is not supported; supported: "
            + ", ".join(supported_architectures())
        ) from None
