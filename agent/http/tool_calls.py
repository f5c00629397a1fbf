"""Tool calls in a model's output, as vLLM's parsers read them: ``hermes`` for the Qwen family
(QwQ, Qwen2.5, Qwen3: ``<tool_call>{"name", "arguments"}</tool_call>``) and ``llama3_json``
for Llama 3.x (a JSON object ``{"name", "parameters"}``, maybe after ``<|python_tag|>``,
several separated by ``;``). Which one: what the model's chat template writes."""

from __future__ import annotations

import json
import re
import secrets
from dataclasses import dataclass
from typing import Any

HERMES, LLAMA3_JSON = "hermes", "llama3_json"
_HERMES_CALL = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.DOTALL)
_PYTHON_TAG = "<|python_tag|>"
_DECODER = json.JSONDecoder()


@dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: str  # JSON text, as OpenAI's API carries it
    id: str

    def as_openai(self, index: int | None = None) -> dict[str, Any]:
        call = {"id": self.id, "type": "function",
                "function": {"name": self.name, "arguments": self.arguments}}
        return call if index is None else {"index": index, **call}


def parser_for(chat_template: str) -> str | None:
    """The parser of a model whose chat template is ``chat_template`` (None: no tool format
    known)."""
    if "<tool_call>" in chat_template:
        return HERMES
    if _PYTHON_TAG in chat_template or "ipython" in chat_template:
        return LLAMA3_JSON
    return None


def parse(text: str, parser: str) -> tuple[str | None, list[ToolCall]]:
    """(the content that stays text, or None; the tool calls). Text that does not parse as a
    call stays content, as vLLM leaves it."""
    return _hermes(text) if parser == HERMES else _llama3_json(text)


def _call(obj: Any, arguments_key: str) -> ToolCall | None:
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    arguments = obj.get(arguments_key, obj.get("arguments", {}))
    text = arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False)
    return ToolCall(obj["name"], text, f"call_{secrets.token_hex(12)}")


def _hermes(text: str) -> tuple[str | None, list[ToolCall]]:
    start = text.find("<tool_call>")
    if start == -1:
        return text, []
    calls = []
    for body in _HERMES_CALL.findall(text[start:]):
        try:
            call = _call(json.loads(body), "arguments")
        except ValueError:
            call = None
        if call is None:
            return text, []  # a broken call: the text as it is
        calls.append(call)
    content = text[:start].strip()
    return content or None, calls


def _llama3_json(text: str) -> tuple[str | None, list[ToolCall]]:
    body = text.strip()
    if body.startswith(_PYTHON_TAG):
        body = body[len(_PYTHON_TAG):].lstrip()
    if not body.startswith("{"):
        return text, []
    calls, pos = [], 0
    while pos < len(body):
        try:
            obj, end = _DECODER.raw_decode(body, pos)
        except ValueError:
            return text, []
        call = _call(obj, "parameters")
        if call is None:
            return text, []
        calls.append(call)
        pos = end
        while pos < len(body) and body[pos] in " \t\r\n;":
            pos += 1
    return None, calls
