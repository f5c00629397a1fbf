"""Driving game: every reply ends with the state tags ``<Cont or EOS><PlayerOp:x><AgentOP:y>``.

The game reads the conversation state and both operations from the tags at the
very end of the reply. A reply without them is generated once more (``check``);
if it still lacks them, ``finalize`` appends the tags it can infer from the
text (stray or misspelt tags, words such as "brake"), else ``<Cont>`` and
``keep``.
"""

from __future__ import annotations

import re

OPERATIONS = ("accelerate", "brake", "left", "right", "keep")
DEFAULT_STATE, DEFAULT_OPERATION = "Cont", "keep"
_TAGS_AT_END = re.compile(r"<(?:Cont|EOS)><PlayerOp:[^<>\s][^<>]*><AgentOP:[^<>\s][^<>]*>\s*\Z")
_STATE = re.compile(r"<\s*(cont|eos)\s*>", re.IGNORECASE)
_PLAYER = re.compile(r"<\s*player\s*_?op\s*:\s*([^<>]*?)\s*>", re.IGNORECASE)
_AGENT = re.compile(r"<\s*agent\s*_?op\s*:\s*([^<>]*?)\s*>", re.IGNORECASE)
_PLACEHOLDER = re.compile(r"<\s*cont\s+or\s+eos\s*>", re.IGNORECASE)
_WORDS = (  # what the text says the player should do, when no tag says it
    ("brake", re.compile(r"\b(brak\w*|slow\w* down|stop)\b", re.IGNORECASE)),
    ("accelerate", re.compile(r"\b(accelerat\w*|speed up|faster)\b", re.IGNORECASE)),
    ("left", re.compile(r"\b(turn|steer|go|move|keep) left\b", re.IGNORECASE)),
    ("right", re.compile(r"\b(turn|steer|go|move|keep) right\b", re.IGNORECASE)),
)


def check(text: str) -> str | None:
    if _TAGS_AT_END.search(text):
        return None
    return "the reply does not end with <Cont or EOS><PlayerOp:x><AgentOP:y>"


def _last(pattern: re.Pattern[str], text: str) -> str | None:
    """The last value of a tag in ``text``; the prompt's placeholders x and y do not count."""
    found = [m.group(1).strip() for m in pattern.finditer(text)
             if m.group(1).strip() and m.group(1).strip() not in ("x", "y")]
    return found[-1] if found else None


def _said_operation(text: str) -> str | None:
    hits = [(m.start(), op) for op, pattern in _WORDS for m in [pattern.search(text)] if m]
    return min(hits)[1] if hits else None


def finalize(text: str) -> str:
    """The reply with its tags at the end: kept if they are there, else inferred."""
    if _TAGS_AT_END.search(text):
        return text.strip()
    state = _last(_STATE, text)
    player = _last(_PLAYER, text)
    agent = _last(_AGENT, text)
    body = text
    for pattern in (_PLACEHOLDER, _STATE, _PLAYER, _AGENT):
        body = pattern.sub(" ", body)
    body = re.sub(r"[ \t]+", " ", body).strip()
    player = player or _said_operation(body) or DEFAULT_OPERATION
    tags = f"<{'EOS' if state and state.lower() == 'eos' else DEFAULT_STATE}>" \
        f"<PlayerOp:{player}><AgentOP:{agent or DEFAULT_OPERATION}>"
    return f"{body} {tags}" if body else tags
