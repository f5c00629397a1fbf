"""System prompt + history + new user turn -> prompt token ids, trimmed by exact token count.

The rendered system prompt (the head of every prompt of a session, and of every
session of a project) is tokenized once and kept (``HeadCache``), and so is what
follows the newest user text (its end marker and the generation prompt); each
prompt then tokenizes only what lies between, where that is known to give the same
ids. A session's first prompt, the usual one, tokenizes only its message: all that
precedes it (the lead) is kept too, where probes show the split changes no ids. The
text itself comes from agent.core.chat_skeleton (no template render per prompt).
"""

from __future__ import annotations

import contextlib
import functools
import threading
from collections import OrderedDict
from dataclasses import dataclass

from agent.core.chat_skeleton import ChatSkeletons, Skeleton, Turn, to_messages
from engine.tokenizer import Tokenizer

__all__ = ["HeadCache", "Prompt", "PromptBuilder", "PromptTooLong", "Turn", "prompt_limit",
           "to_messages"]


class PromptTooLong(ValueError):
    """The system prompt and the newest user turn alone do not fit; ``str()`` is the reply."""


@dataclass(frozen=True)
class Prompt:
    token_ids: list[int]
    first_turn: int  # index in the history of the oldest turn kept


def prompt_limit(max_history_tokens: int, max_tokens: int, token_budget: int, max_model_len: int) -> int:
    """Most prompt tokens: within the history limit, and leaving room for ``max_tokens``."""
    return min(max_history_tokens, token_budget - max_tokens, max_model_len - max_tokens)


@dataclass(frozen=True)
class Head:
    text: str  # how every rendered prompt with this system prompt begins
    token_ids: list[int]


class HeadCache:
    """Token ids of the rendered system prompt, per system prompt (the ``max_heads`` last used),
    and of a prompt's tail (what follows the newest user text), per tail.

    The head ends where a special token begins (``<|im_start|>`` of the user turn), and
    the tail begins with one (``<|im_end|>``): tokenizers split the text at special
    tokens before anything else, so the ids of head + middle + tail are the head's ids,
    the middle's and the tail's. That is checked on a probe prompt when a head or tail
    is made; a template or tokenizer where it does not hold (or that puts the system
    prompt elsewhere) gets none, and its prompts are tokenized whole. A tail is split
    off only after a plain user text (agent.core.chat_skeleton.plain: nothing at its end
    that a special token could strip or join).
    """

    PROBE = "probe message"
    # First-turn messages starting with each kind of character: a lead is split off only
    # where all of them tokenize the same apart as whole (see ``_lead``).
    LEAD_PROBES = ("probe message", "Probe", "42 probes", "'s probe", '"probe"', "(probe)",
                   "-probe", ".probe", "_probe", "#probe", "ünï probe", "日本語", "🙂 probe",
                   "«probe»", "/probe", "*probe*")

    def __init__(self, tokenizer: Tokenizer, max_heads: int = 64) -> None:
        self.tokenizer = tokenizer
        self.max_heads = max_heads
        added = getattr(tokenizer.hf, "added_tokens_decoder", {}).values()
        self._specials = {str(t) for t in added if getattr(t, "special", False)} | set(
            getattr(tokenizer.hf, "all_special_tokens", []))
        self._specials.discard("")
        self._heads: OrderedDict[str, Head | None] = OrderedDict()
        self._tails: dict[str, list[int] | None] = {}
        self._leads: OrderedDict[str, list[int] | None] = OrderedDict()
        self._lock = threading.Lock()
        self.skeletons = ChatSkeletons(tokenizer.render_chat)

    def ids(self, system_prompt: str, turns: list[Turn], message: str) -> list[int]:
        text, skeleton = self.skeletons.render(system_prompt, turns, message)
        if skeleton is not None and not turns:  # a session's first turn: often the only one
            lead, tail = self._lead(skeleton), self._tail(skeleton, 0)
            if lead is not None and tail is not None:
                return lead + self.tokenizer.encode(message) + tail
        head = self._head(system_prompt)
        if head is None or not text.startswith(head.text):
            head = None
        tail = None if skeleton is None else self._tail(skeleton, len(turns))
        start = 0 if head is None else len(head.text)
        end = len(text) if tail is None or skeleton is None else len(text) - len(skeleton.tail)
        if start > end:  # the head reaches into the tail: split nowhere
            head, tail, start, end = None, None, 0, len(text)
        ids = self.tokenizer.encode(text[start:end])
        if head is not None:
            ids = head.token_ids + ids
        return ids if tail is None else ids + tail

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

    def _lead(self, skeleton: Skeleton) -> list[int] | None:
        """The ids of all that precedes the message of a first turn (system prompt and user
        turn opener), if they split off there: unlike the head and tail, the lead does not
        end at a special token, so this is checked on first-turn prompts whose message
        starts with each kind of character (``LEAD_PROBES``)."""
        lead = skeleton.pieces[0]
        with self._lock:
            if lead in self._leads:
                self._leads.move_to_end(lead)
                return self._leads[lead]
        encode = self.tokenizer.encode
        ids: list[int] | None = encode(lead)
        for probe in self.LEAD_PROBES:
            if ids + encode(probe + skeleton.tail) != encode(skeleton.fill([probe])):
                ids = None
                break
        with self._lock:
            self._leads[lead] = ids
            while len(self._leads) > self.max_heads:
                self._leads.popitem(last=False)
        return ids

    def _tail(self, skeleton: Skeleton, n_turns: int) -> list[int] | None:
        """The tail's ids, if it begins with a special token and splitting there keeps the ids
        (checked on the skeleton filled with probe texts)."""
        tail = skeleton.tail
        if tail in self._tails:  # a few distinct tails (one per template): no eviction
            return self._tails[tail]
        ids = None
        if any(tail.startswith(s) for s in self._specials):
            encode = self.tokenizer.encode
            probe = skeleton.fill([self.PROBE] * (2 * n_turns + 1))
            ids = encode(tail)
            if encode(probe[:len(probe) - len(tail)]) + ids != encode(probe):
                ids = None
        with self._lock:
            if len(self._tails) < 64:
                self._tails[tail] = ids
        return ids


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

    @functools.cached_property
    def chat_template(self) -> str:
        """The model's chat template (its text; "" without one)."""
        template = getattr(self.tokenizer.hf, "chat_template", None)
        return template if isinstance(template, str) else ""

    @functools.cached_property
    def renders_tools(self) -> bool:
        """Whether the chat template writes the tools it is given into the prompt."""
        probe = [{"role": "user", "content": "x"}]
        tool = {"type": "function", "function": {"name": "probe_tool_7f3a", "description": "d",
                                                 "parameters": {"type": "object"}}}
        with self._lock:
            try:
                return "probe_tool_7f3a" in self.tokenizer.render_chat(probe, tools=[tool])
            except Exception:  # a template that refuses tools
                return False

    def given(self, messages: list[dict] | None, prompt: str | None, tools: list[dict] | None,
              template_kwargs: dict) -> list[int]:
        """Token ids of a conversation given whole (the chat template with its tools), or of a
        raw prompt; ValueError (its text for the client) if the template refuses them."""
        with self._lock:
            if messages is None:
                return self.tokenizer.encode(prompt or "")
            try:
                return self.tokenizer.encode(self.tokenizer.render_chat(
                    messages, tools=tools, **template_kwargs))
            except Exception as exc:  # jinja2's TemplateError, or a template's raise_exception
                raise ValueError(f"the model's chat template refused the messages: {exc}") from None

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
