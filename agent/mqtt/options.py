"""Part C request options: ``stream``, ``responseFormat``, ``includeReasoning``, ``command``.

Every option is opt-in: a request without them is served exactly as in part A.
``includeReasoning`` only matters with ``responseFormat: "json"`` (a plain-text
reply has no place for it).
"""

from __future__ import annotations

import json
from dataclasses import dataclass

RESET = "reset"
JSON, TEXT = "json", "text"
FIELDS = ("stream", "responseFormat", "includeReasoning", "command")


@dataclass(frozen=True)
class Options:
    stream: bool = False  # deltas on "<reply topic>/stream"
    json: bool = False  # responseFormat "json": the reply is one JSON envelope
    include_reasoning: bool = False  # the envelope's "reasoning" (with json only)
    command: str | None = None  # "reset": clear the session instead of a turn


PLAIN = Options()
_FIELD_SET = frozenset(FIELDS)


def _flag(data: dict, key: str) -> bool:
    value = data.get(key)
    if value is None:
        return False
    if isinstance(value, bool):
        return value
    raise ValueError(f"{key} must be true or false, got {json.dumps(value)[:40]}")


def parse_options(data: dict) -> Options:
    """The part C options of a request object; ValueError naming the field if one is wrong."""
    if _FIELD_SET.isdisjoint(data):
        return PLAIN  # the usual request: no option given
    stream, include_reasoning = _flag(data, "stream"), _flag(data, "includeReasoning")
    fmt = data.get("responseFormat")
    if fmt is not None and fmt not in (JSON, TEXT):
        raise ValueError(f'responseFormat must be "json" or "text", got {json.dumps(fmt)[:40]}')
    command = data.get("command")
    if command is not None and command != RESET:
        raise ValueError(f'command must be "reset", got {json.dumps(command)[:40]}')
    return Options(stream, fmt == JSON, include_reasoning, command)


def wants_json(data: dict | None) -> bool:
    """Whether a request that failed validation asked for the JSON envelope."""
    return bool(data) and data.get("responseFormat") == JSON  # type: ignore[union-attr]
