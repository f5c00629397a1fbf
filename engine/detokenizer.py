"""Incremental detokenization of one completion, with EOS ids and stop strings.

Decoding token by token is wrong for byte-level vocabularies: one character
may span several tokens, and a single token decodes to U+FFFD until the rest
arrives. So each step decodes a short window of recent tokens and emits only
the text that grew past the previous window, holding back text that ends in
U+FFFD (a split character) until it completes.

Stop strings: generation stops when the text contains one; the text returned
excludes it (and everything after it). While streaming, the last
``len(longest stop) - 1`` characters are held back, so a stop string is never
half streamed. EOS ids stop too and never reach the text.
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Protocol

_REPLACEMENT = "\ufffd"
_PROMPT_CONTEXT = 4  # prompt tokens kept as decoding context (word-boundary spaces)
# A UTF-8 character has at most 4 bytes, so it spans at most 4 byte-level tokens: text
# still ending in U+FFFD after that many pending tokens is really invalid, not split.
_MAX_SPLIT_TOKENS = 4


class Decoder(Protocol):
    def decode(self, token_ids: list[int], skip_special_tokens: bool = True) -> str: ...


class IncrementalDetokenizer:
    """Feed sampled tokens with ``add_token``; read ``text``, ``stopped`` and ``stop_reason``."""

    def __init__(
        self,
        tokenizer: Decoder,
        prompt_token_ids: list[int],
        stop: Collection[str] = (),
        eos_token_ids: Collection[int] = (),
    ) -> None:
        self.tokenizer = tokenizer
        self.stop = tuple(s for s in stop if s)
        self.eos_token_ids = frozenset(eos_token_ids)
        self._max_stop = max((len(s) for s in self.stop), default=0)
        context = list(prompt_token_ids[-_PROMPT_CONTEXT:])
        self._ids: list[int] = context  # decoding window source: context + completion
        self._prefix_offset = 0  # window start
        self._read_offset = len(context)  # tokens already turned into text
        self._text = ""  # decoded completion text (stop string cut off once found)
        self._emitted = 0  # characters of _text already returned by add_token / flush
        self.stopped = False
        self.stop_reason: str | None = None  # "eos" | "stop_string"
        self.matched_stop: str | None = None

    @property
    def text(self) -> str:
        """The completion text so far (final once stopped or flushed)."""
        return self._text

    def add_token(self, token_id: int) -> str:
        """Take one sampled token; return the new text that is safe to stream (maybe "")."""
        if self.stopped:
            return ""
        if token_id in self.eos_token_ids:
            self.stopped, self.stop_reason = True, "eos"
            return self.flush()
        self._ids.append(token_id)
        prefix = self._decode(self._ids[self._prefix_offset : self._read_offset])
        full = self._decode(self._ids[self._prefix_offset :])
        split = full.endswith(_REPLACEMENT) and len(self._ids) - self._read_offset < _MAX_SPLIT_TOKENS
        if len(full) <= len(prefix) or split:
            return ""  # nothing new yet, or a character still split across tokens
        self._append_text(full[len(prefix) :])
        self._prefix_offset, self._read_offset = self._read_offset, len(self._ids)
        return self._take(final=self.stopped)

    def flush(self) -> str:
        """End of generation: decode whatever is held back and return the rest of the text."""
        if not self.stopped or self.stop_reason == "eos":
            pending = self._ids[self._read_offset :]
            if pending:
                prefix = self._decode(self._ids[self._prefix_offset : self._read_offset])
                full = self._decode(self._ids[self._prefix_offset :])
                if len(full) > len(prefix):
                    self._append_text(full[len(prefix) :])
                self._read_offset = len(self._ids)
        return self._take(final=True)

    # ---------------------------------------------------------------------------------------

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True) if ids else ""

    def _append_text(self, delta: str) -> None:
        if self.stopped and self.stop_reason == "stop_string":
            return
        start = max(len(self._text) - self._max_stop + 1, 0)
        self._text += delta
        if not self.stop:
            return
        hit = min(
            ((i, s) for s in self.stop if (i := self._text.find(s, start)) >= 0),
            default=None,
        )
        if hit is not None:
            self._text = self._text[: hit[0]]
            self.stopped, self.stop_reason, self.matched_stop = True, "stop_string", hit[1]

    def _take(self, final: bool) -> str:
        hold = 0 if final else max(self._max_stop - 1, 0)
        end = max(len(self._text) - hold, self._emitted)
        out = self._text[self._emitted : end]
        self._emitted = end
        return out
