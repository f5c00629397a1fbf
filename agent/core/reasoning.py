"""Remove a reasoning model's ``<think>...</think>`` text from its answer.

QwQ-style templates open ``<think>`` inside the prompt, so the output may start
in the middle of the reasoning and hold only the closing tag. The model is not
stopped at ``</think>``: it goes on to write the answer, which is what we keep.
"""

from __future__ import annotations

import re

from engine.api import GenerationResult

OPEN, CLOSE = "<think>", "</think>"
REASONING_CUT_OFF = (
    "Error: the model was still reasoning when it reached maxTokens; "
    "raise maxTokens (up to --max_tokens_limit) for this reasoning model"
)
EMPTY_ANSWER = "Error: the model returned an empty answer"
_BLOCK = re.compile(re.escape(OPEN) + r"(.*?)" + re.escape(CLOSE), re.DOTALL)


def split_reasoning(text: str) -> tuple[str, str]:
    """``(answer, reasoning)``; the answer without surrounding whitespace."""
    if OPEN not in text and CLOSE not in text:
        return text.strip(), ""
    parts: list[str] = []
    first_close, first_open = text.find(CLOSE), text.find(OPEN)
    if first_close != -1 and (first_open == -1 or first_close < first_open):
        parts.append(text[:first_close])  # began mid-reasoning: the prompt opened <think>
        text = text[first_close + len(CLOSE):]

    def keep(match: re.Match[str]) -> str:
        parts.append(match.group(1))
        return ""

    text = _BLOCK.sub(keep, text)
    unterminated = text.find(OPEN)
    if unterminated != -1:  # cut off while still reasoning
        parts.append(text[unterminated + len(OPEN):])
        text = text[:unterminated]
    text = text.replace(CLOSE, "")  # a stray closing tag carries no answer text
    reasoning = "\n\n".join(p.strip() for p in parts if p.strip())
    return text.strip(), reasoning


def strip_reasoning(text: str) -> str:
    return split_reasoning(text)[0]


def split_completion(text: str, prompt_opened: bool) -> tuple[str, str]:
    """``split_reasoning`` of a completion; ``prompt_opened``: the prompt ended in ``<think>``,
    so all text up to a ``</think>`` is reasoning, also when the model never closed it."""
    if prompt_opened and not text.lstrip().startswith(OPEN):
        text = OPEN + text
    return split_reasoning(text)


def answer_of(result: GenerationResult, skip_thinking: bool, prompt_opened: bool) -> tuple[str, str | None]:
    """``(answer, None)`` for a usable completion, else ``("", error reply)``."""
    if result.finish_reason == "error" or result.error:
        return "", f"Error: {result.error or 'generation failed'}"
    if result.finish_reason == "cancelled":
        return "", "Error: the request was cancelled"
    text, reasoning = result.text, ""
    if skip_thinking:
        text, reasoning = split_completion(result.text, prompt_opened)
    if text.strip():
        return text, None
    if reasoning and result.finish_reason == "length":
        return "", REASONING_CUT_OFF
    return "", EMPTY_ANSWER


def _held_tail(text: str) -> int:
    """Where the suffix of ``text`` that may begin a tag (``<``, ``</th``, ...) starts."""
    start = text.rfind("<")
    if start != -1 and len(text) - start < len(CLOSE):
        tail = text[start:]
        if OPEN.startswith(tail) or CLOSE.startswith(tail):
            return start
    return len(text)


class AnswerFilter:
    """Turns a completion's deltas into the deltas of its answer, reasoning left out."""

    def __init__(self, skip_thinking: bool, prompt_opened: bool) -> None:
        self.skip = skip_thinking
        self.reasoning = skip_thinking and prompt_opened
        self._buffer = ""
        self._started = False  # some answer text went out (leading whitespace is dropped)

    def feed(self, delta: str) -> str:
        if not self.skip:
            return delta
        self._buffer += delta
        out: list[str] = []
        while True:
            if self.reasoning:
                end = self._buffer.find(CLOSE)
                if end == -1:  # keep only what may begin "</think>"
                    self._buffer = self._buffer[_held_tail(self._buffer):]
                    break
                self._buffer, self.reasoning = self._buffer[end + len(CLOSE):], False
                continue
            opened, closed = self._buffer.find(OPEN), self._buffer.find(CLOSE)
            tags = [(i, tag) for i, tag in ((opened, OPEN), (closed, CLOSE)) if i != -1]
            if not tags:
                held = _held_tail(self._buffer)
                out.append(self._buffer[:held])
                self._buffer = self._buffer[held:]
                break
            i, tag = min(tags)
            out.append(self._buffer[:i])
            self._buffer = self._buffer[i + len(tag):]
            self.reasoning = tag == OPEN  # a stray "</think>" is dropped, like in the reply
        return self._emit("".join(out))

    def flush(self) -> str:
        """The held-back rest at the end (a partial tag is answer text after all)."""
        rest, self._buffer = ("" if self.reasoning else self._buffer), ""
        return self._emit(rest) if self.skip else rest

    def _emit(self, text: str) -> str:
        if not self._started:
            text = text.lstrip()
            self._started = bool(text)
        return text
