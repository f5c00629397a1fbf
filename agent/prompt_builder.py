"""System prompt + history + new user turn -> prompt token ids, trimmed by exact token count.

The rendered system prompt (the head of every prompt of a session, and of every
session of a project) is tokenized once and kept (``HeadCache``); each prompt
then tokenizes only what follows it, where that is known to give the same ids.
"""

from __future__ import annotations

import contextlib
import threading
from collections import OrderedDict
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


@dataclass(frozen=True)
class Head:
    text: str  # how every rendered prompt with this system prompt begins
    token_ids: list[int]


class HeadCache:
    """Token ids of the rendered system prompt, per system prompt (the ``max_heads`` last used).

    The head ends where a special token begins (``<|im_start|>`` of the user turn):
    tokenizers split the text at special tokens before anything else, so the ids of
    head + rest are the head's ids followed by the rest's. That is checked on a probe
    prompt when a head is made; a template or tokenizer where it does not hold (or that
    puts the system prompt elsewhere) gets no head, and its prompts are tokenized whole.
    """

    PROBE = "probe message"

    def __init__(self, tokenizer: Tokenizer, max_heads: int = 64) -> None:
        self.tokenizer = tokenizer
        self.max_heads = max_heads
        added = getattr(tokenizer.hf, "added_tokens_decoder", {}).values()
        self._specials = {str(t) for t in added if getattr(t, "special", False)} | set(
            getattr(tokenizer.hf, "all_special_tokens", []))
        self._specials.discard("")
        self._heads: OrderedDict[str, Head | None] = OrderedDict()
        self._lock = threading.Lock()

    def ids(self, system_prompt: str, turns: list[Turn], message: str) -> list[int]:
        text = self.tokenizer.render_chat(to_messages(system_prompt, turns, message))
        head = self._head(system_prompt)
        if head is not None and text.startswith(head.text):
            return head.token_ids + self.tokenizer.encode(text[len(head.text):])
        return self.tokenizer.encode(text)

    def _head(self, system_prompt: str) -> Head | None:
        with self._lock:
            if system_prompt in self._heads:
                self._heads.move_to_end(system_prompt)
                return self._heads[system_prompt]
        head = self._make(system_prompt)  # outside the lock: two threads may both make it
        with self._lock:
            self._heads[system_prompt] = head
            while len(self._heads) > self.max_heads:
                self._heads.popitem(last=False)
        return head

    def _make(self, system_prompt: str) -> Head | None:
        encode = self.tokenizer.encode
        probe = self.tokenizer.render_chat(to_messages(system_prompt, [], self.PROBE))
        before = probe[:max(0, probe.rfind(self.PROBE))]
        cut = max((before.rfind(s) for s in self._specials), default=-1)
        if not system_prompt or cut <= 0 or system_prompt not in before[:cut]:
            return None
        head = Head(before[:cut], encode(before[:cut]))
        if head.token_ids + encode(probe[cut:]) != encode(probe):
            return None
        return head


class PromptBuilder:
    """Drops the oldest whole turns until the prompt fits.

    The prompt's length shrinks as turns go, so a binary search over how many
    go needs O(log n) tokenizations, not one per dropped turn.
    """

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        # transformers' fast tokenizers may reconfigure their backend per call: one call at a
        # time, unless the tokenizer encodes through the backend itself.
        self.lock_free = getattr(tokenizer, "fast_encode", False)
        self._lock = contextlib.nullcontext() if self.lock_free else threading.Lock()
        self.heads = HeadCache(tokenizer) if self.lock_free else None

    def _ids(self, system_prompt: str, turns: list[Turn], message: str) -> list[int]:
        if self.heads is not None:
            return self.heads.ids(system_prompt, turns, message)
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
