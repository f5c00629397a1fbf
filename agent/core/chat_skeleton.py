"""Chat prompts by string substitution: the template rendered once per conversation shape.

Rendering a chat template through transformers costs ~30-60 µs a prompt, most of it
transformers' own preparation around Jinja; the agent renders one per request. A
``Skeleton`` is the template rendered once per (system prompt, number of turns) with
each user and assistant text replaced by a sentinel; a prompt is then the skeleton's
pieces joined with the texts.

That is the full render only where the template inserts those texts verbatim. It is
checked on probe texts (quotes, braces, ``&``, inner whitespace, non-ASCII, two
lengths) when a skeleton is made: a template that changes a text (escapes it, changes
its case, drops or repeats a message) fails the probe and gets no skeleton. Templates
do branch on a text's content, but on tags (Qwen3 on ``</think>`` in an assistant
text, on ``<tool_response>`` in a user text) and trim it (Llama 3): texts with a
``<`` or with whitespace at either end are therefore always rendered in full.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

Turn = tuple[str, str]  # (user, assistant)
Render = Callable[[list[dict[str, str]]], str]  # messages -> the prompt text

_OPEN, _CLOSE = "\ue000", "\ue001"  # private-use code points around a sentinel's number
PROBES = ('Probe "one" & {{ two }} {% three %}\n\tfour ünï 🙂', "p")


def to_messages(system_prompt: str, turns: list[Turn], message: str) -> list[dict[str, str]]:
    messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
    for user, assistant in turns:
        messages.append({"role": "user", "content": user})
        messages.append({"role": "assistant", "content": assistant})
    messages.append({"role": "user", "content": message})
    return messages


def plain(text: str) -> bool:
    """A text the template cannot tell from a probe text: no tag, nothing to trim."""
    return bool(text) and "<" not in text and not text[0].isspace() and not text[-1].isspace()


@dataclass(frozen=True)
class Skeleton:
    pieces: tuple[str, ...]  # the rendered text around the texts: one more than texts

    def fill(self, texts: list[str]) -> str:
        parts = [self.pieces[0]]
        for text, piece in zip(texts, self.pieces[1:], strict=True):
            parts.append(text)
            parts.append(piece)
        return "".join(parts)

    @property
    def tail(self) -> str:
        """What follows the newest user text (its end marker and the generation prompt)."""
        return self.pieces[-1]


class ChatSkeletons:
    """Skeletons per (system prompt, number of turns), the ``max_entries`` last used."""

    def __init__(self, render: Render, max_entries: int = 256) -> None:
        self._render = render
        self.max_entries = max_entries
        self._entries: OrderedDict[tuple[str, int], Skeleton | None] = OrderedDict()
        self._lock = threading.Lock()

    def render(self, system_prompt: str, turns: list[Turn], message: str) -> tuple[str, Skeleton | None]:
        """The prompt text, and the skeleton it was filled from (None: rendered in full)."""
        texts = [t for turn in turns for t in turn]
        texts.append(message)
        if all(map(plain, texts)):
            skeleton = self.get(system_prompt, len(turns))
            if skeleton is not None:
                return skeleton.fill(texts), skeleton
        return self._render(to_messages(system_prompt, turns, message)), None

    def get(self, system_prompt: str, n_turns: int) -> Skeleton | None:
        key = (system_prompt, n_turns)
        with self._lock:
            if key in self._entries:
                self._entries.move_to_end(key)
                return self._entries[key]
        skeleton = self._make(system_prompt, n_turns)  # outside the lock: two may make it
        with self._lock:
            self._entries[key] = skeleton
            while len(self._entries) > self.max_entries:
                self._entries.popitem(last=False)
        return skeleton

    def _make(self, system_prompt: str, n_turns: int) -> Skeleton | None:
        n = 2 * n_turns + 1
        marks = [f"{_OPEN}{i}{_CLOSE}" for i in range(n)]
        text = self._render(_messages(system_prompt, marks))
        pieces = []
        for mark in marks:
            before, found, text = text.partition(mark)
            if not found or _OPEN in before:  # dropped, repeated or out of order
                return None
            pieces.append(before)
        if _OPEN in text:
            return None
        skeleton = Skeleton((*pieces, text))
        for probe in PROBES:  # texts inserted verbatim (see the module's docstring)
            texts = [f"{probe} {i}" for i in range(n)]
            if skeleton.fill(texts) != self._render(_messages(system_prompt, texts)):
                return None
        return skeleton


def _messages(system_prompt: str, texts: list[str]) -> list[dict[str, str]]:
    turns = list(zip(texts[:-1:2], texts[1::2], strict=True))
    return to_messages(system_prompt, turns, texts[-1])
