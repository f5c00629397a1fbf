"""System prompt + history + new user turn -> prompt token ids, trimmed by exact token count."""

from __future__ import annotations

import threading
from dataclasses import dataclass

from engine.tokenizer import Tokenizer

Turn = tuple[str, str]  # (user, assistant)


class PromptTooLong(ValueError):
    """The system prompt and the newest user turn alone do not fit; ``str()`` is the reply."""


@dataclass(frozen=True)
class Prompt:
    token_ids: list[int]
    first_turn: int  # index in the history of the oldest turn kept


def prompt_limit(max_history_tokens: int, max_tokens: int, token_budget: int, max_model_len: int) -> int:
    """Most prompt tokens: within the history limit, and leaving room for ``max_tokens``."""
    return min(max_history_tokens, token_budget - max_tokens, max_model_len - max_tokens)


def to_messages(system_prompt: str, turns: list[Turn], message: str) -> list[dict[str, str]]:
    messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
    for user, assistant in turns:
        messages.append({"role": "user", "content": user})
        messages.append({"role": "assistant", "content": assistant})
    messages.append({"role": "user", "content": message})
    return messages


class PromptBuilder:
    """Drops the oldest whole turns until the prompt fits.

    The prompt's length shrinks as turns go, so a binary search over how many
    go needs O(log n) tokenizations, not one per dropped turn.
    """

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        # transformers' fast tokenizers may reconfigure their backend per call:
        # one call at a time.
        self._lock = threading.Lock()

    def _ids(self, system_prompt: str, turns: list[Turn], message: str) -> list[int]:
        with self._lock:
            return self.tokenizer.apply_chat_template(to_messages(system_prompt, turns, message))

    def build(self, system_prompt: str, turns: list[Turn], message: str, limit: int) -> Prompt:
        ids = self._ids(system_prompt, turns, message)
        if len(ids) <= limit:
            return Prompt(ids, 0)
        if limit < 1:
            raise PromptTooLong("Error: maxTokens leaves no room for the prompt in the model's context")
        n = len(turns)
        shortest = ids if n == 0 else self._ids(system_prompt, [], message)
        if len(shortest) > limit:
            raise PromptTooLong(
                f"Error: the message is too long ({len(shortest)} prompt tokens; at most {limit} fit)"
            )
        lo, hi, best = 0, n, shortest  # dropping lo turns does not fit, dropping hi does
        while hi - lo > 1:
            mid = (lo + hi) // 2
            ids = self._ids(system_prompt, turns[mid:], message)
            if len(ids) <= limit:
                hi, best = mid, ids
            else:
                lo = mid
        return Prompt(best, hi)
