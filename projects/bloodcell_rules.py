"""Blood-cell game: replies stay within the word limit its prompt sets (20 words).

A longer reply keeps its whole sentences that fit (a fragment at the end, as
max_tokens leaves it, is no sentence); if not even the first one fits, it is
cut after the limit's last word and ends with "...".
"""

from __future__ import annotations

import re

MAX_WORDS = 20
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def finalize(text: str) -> str:
    text = text.strip()
    words = text.split()
    if len(words) <= MAX_WORDS:
        return text
    kept: list[str] = []
    count = 0
    for sentence in _SENTENCE_END.split(text):
        n = len(sentence.split())
        if count + n > MAX_WORDS or not sentence.endswith((".", "!", "?")):
            break  # over the limit, or a fragment (the reply was cut off by max_tokens)
        kept.append(" ".join(sentence.split()))
        count += n
    if kept:
        return " ".join(kept)
    return " ".join(words[:MAX_WORDS]).rstrip(",;:-") + "..."
