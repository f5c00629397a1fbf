"""The model's tokenizer and chat template, through transformers.

Everything that counts tokens (history trimming, budgets) goes through this
class, so that counts are exact for the model being served.
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

# Used only when a checkpoint ships no chat template (a warning says so).
FALLBACK_CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


class Tokenizer:
    """Thin wrapper over a transformers tokenizer: encode, decode, chat template, EOS ids."""

    def __init__(self, hf_tokenizer, extra_eos_token_ids: tuple[int, ...] = ()) -> None:
        self.hf = hf_tokenizer
        if not getattr(hf_tokenizer, "chat_template", None):
            log.warning("the tokenizer has no chat template; using a plain ChatML layout")
            hf_tokenizer.chat_template = FALLBACK_CHAT_TEMPLATE
        eos = set(extra_eos_token_ids)
        if hf_tokenizer.eos_token_id is not None:
            eos.add(int(hf_tokenizer.eos_token_id))
        self.eos_token_ids: frozenset[int] = frozenset(eos)
        # Detokenizing runs twice per generated token (engine/detokenizer.py); where
        # transformers adds nothing to the fast tokenizer's decode, call it directly.
        backend = getattr(hf_tokenizer, "_tokenizer", None)
        plain = not getattr(hf_tokenizer, "clean_up_tokenization_spaces", False)
        self._backend = backend if plain and hasattr(backend, "decode") else None
        # Encoding likewise (the agent tokenizes every prompt): transformers' encode of a fast
        # tokenizer resets truncation and padding (nothing here sets them) and then calls the
        # backend; taken only where a probe encodes the same both ways.
        self._encoder = backend if _encodes_like(hf_tokenizer, backend) else None

    @classmethod
    def from_pretrained(cls, path: str | Path, extra_eos_token_ids: tuple[int, ...] = ()) -> Tokenizer:
        from transformers import AutoTokenizer

        try:
            hf = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        except Exception as exc:  # transformers raises many types here
            raise ValueError(f"cannot load the tokenizer from {path}: {exc}") from exc
        return cls(hf, extra_eos_token_ids)

    @property
    def vocab_size(self) -> int:
        return len(self.hf)

    @property
    def fast_encode(self) -> bool:
        """Whether ``encode`` calls the Rust backend directly (safe from several threads)."""
        return self._encoder is not None

    def encode(self, text: str) -> list[int]:
        if self._encoder is not None:
            return self._encoder.encode(text, add_special_tokens=False).ids
        return list(self.hf.encode(text, add_special_tokens=False))

    def decode(self, token_ids: list[int], skip_special_tokens: bool = True) -> str:
        if self._backend is not None:  # the Rust tokenizer itself: a few µs less per call,
            return self._backend.decode(token_ids, skip_special_tokens=skip_special_tokens)
        return self.hf.decode(token_ids, skip_special_tokens=skip_special_tokens)

    def render_chat(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
                    tools: list[dict[str, Any]] | None = None, **template_kwargs: Any) -> str:
        """The conversation through the model's chat template; ``tools`` (OpenAI function
        schemas) and ``template_kwargs`` (``enable_thinking``, ...) go to the template."""
        return self.hf.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=add_generation_prompt, tools=tools,
            **template_kwargs,
        )

    @functools.cached_property
    def opens_reasoning(self) -> bool:
        """Whether the generation prompt itself opens ``<think>`` (QwQ, some Qwen3 templates):
        the completion then starts inside the reasoning and holds only ``</think>``."""
        prompt = self.render_chat([{"role": "user", "content": "x"}], add_generation_prompt=True)
        return prompt.rstrip().endswith("<think>")

    def apply_chat_template(
        self, messages: list[dict[str, str]], add_generation_prompt: bool = True
    ) -> list[int]:
        """Token ids of the rendered conversation, exactly as the engine will see them."""
        return self.encode(self.render_chat(messages, add_generation_prompt))


def _encodes_like(hf_tokenizer, backend) -> bool:
    """Whether the backend's own encode gives what ``hf_tokenizer.encode`` gives."""
    if (backend is None or not hasattr(backend, "encode") or getattr(backend, "truncation", 1)
            or getattr(backend, "padding", 1) or getattr(hf_tokenizer, "split_special_tokens", True)):
        return False
    special = "".join(str(t) for t in getattr(hf_tokenizer, "all_special_tokens", [])[:3])
    probe = f" Hello{special}  wörld\n\n\t<|x|> 42 ünïcode 🙂{special}end "
    try:
        return backend.encode(probe, add_special_tokens=False).ids == list(
            hf_tokenizer.encode(probe, add_special_tokens=False))
    except Exception:  # an unusual backend: the slow path is always right
        return False
