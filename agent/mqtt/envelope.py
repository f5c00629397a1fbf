"""The JSON envelope of a reply (PROTOCOL.md part C, ``"responseFormat": "json"``).

One JSON object per reply, error included::

    {"requestId", "sessionId", "project", "clientId", "text", "finishReason",
     "usage": {"promptTokens", "completionTokens", "cachedPromptTokens"},
     "timings": {"queueMs", "ttftMs", "totalMs"},
     "error": {"code", "message"},   # only on failure
     "reasoning": "..."}             # only with "includeReasoning": true

- ``text``: the reply as the plain-text client would get it (after output
  rules); "" on failure, where ``error.message`` is the plain-text reply of the
  same failure (``Error: ...``, or the old overload text) and ``error.code``
  one of ``CODES``.
- ``finishReason``, ``usage`` and ``timings`` are the engine's, of the last
  generation of the request (a reply generated once more for a project's
  output rules counts only the second time); with no generation (refused,
  timed out while queued, ``command: reset``) ``finishReason`` is null and the
  numbers are 0. ``timings`` run from the request's submission to the engine:
  ``queueMs`` until first scheduled, ``ttftMs`` until the first token,
  ``totalMs`` until done.
- ``reasoning``: the text that ``--skip_thinking`` removed from the reply
  ("" if none; without ``--skip_thinking`` the reasoning stays in ``text``).
"""

from __future__ import annotations

import json
from typing import Any

from agent.core.outcome import INTERNAL, OVERLOADED, SHUTTING_DOWN, Outcome
from agent.core.rate_limit import RATE_LIMITED
from agent.core.reasoning import EMPTY_ANSWER, REASONING_CUT_OFF, split_completion
from agent.mqtt.options import wants_json
from agent.mqtt.protocol import ChatRequest, ProtocolError
from engine.api import GenerationResult

BAD_REQUEST, RATE_LIMITED_CODE, OVERLOADED_CODE = "bad_request", "rate_limited", "overloaded"
TOO_LONG, INTERNAL_CODE, SHUTTING_DOWN_CODE = "too_long", "internal", "shutting_down"
CODES = (BAD_REQUEST, RATE_LIMITED_CODE, OVERLOADED_CODE, TOO_LONG, INTERNAL_CODE,
         SHUTTING_DOWN_CODE)

# Every error text the agent sends for a chat request -> its code. Texts not listed are the
# engine's own failures (internal), or, for a request that failed validation, bad_request.
_EXACT = {
    RATE_LIMITED: RATE_LIMITED_CODE,
    OVERLOADED: OVERLOADED_CODE,
    SHUTTING_DOWN: SHUTTING_DOWN_CODE,
    INTERNAL: INTERNAL_CODE,
    REASONING_CUT_OFF: TOO_LONG,  # the answer did not fit maxTokens
    EMPTY_ANSWER: INTERNAL_CODE,
}
_PREFIXES = (
    ("Error: the message is too long", TOO_LONG),  # agent.core.prompt_builder.PromptTooLong
    ("Error: maxTokens leaves no room", TOO_LONG),  # ... likewise
    ("Error: the request is too large", TOO_LONG),  # over --max_payload_bytes
    ("Error: no answer within", OVERLOADED_CODE),  # --request_timeout: busy, try again later
)


def error_code(text: str, default: str = INTERNAL_CODE) -> str:
    """The envelope's ``error.code`` for the plain-text error reply ``text``."""
    code = _EXACT.get(text)
    if code is not None:
        return code
    return next((c for prefix, c in _PREFIXES if text.startswith(prefix)), default)


def _ms(seconds: float) -> float:
    return round(seconds * 1000.0, 1)


def build(
    *, request_id: str | None, session_id: str | None, project: str, client_id: str | None,
    text: str, ok: bool, result: GenerationResult | None = None, reasoning: str | None = None,
    default_code: str = INTERNAL_CODE,
) -> dict[str, Any]:
    r = result
    envelope: dict[str, Any] = {
        "requestId": request_id, "sessionId": session_id, "project": project,
        "clientId": client_id, "text": text if ok else "",
        "finishReason": r.finish_reason if r else None,
        "usage": {
            "promptTokens": r.prompt_tokens if r else 0,
            "completionTokens": len(r.token_ids) if r else 0,
            "cachedPromptTokens": r.cached_prompt_tokens if r else 0,
        },
        "timings": {
            "queueMs": _ms(r.queue_s) if r else 0.0,
            "ttftMs": _ms(r.ttft_s) if r else 0.0,
            "totalMs": _ms(r.total_s) if r else 0.0,
        },
    }
    if not ok:
        envelope["error"] = {"code": error_code(text, default_code), "message": text}
    if reasoning is not None:
        envelope["reasoning"] = reasoning
    return envelope


def _dumps(envelope: dict[str, Any]) -> str:
    return json.dumps(envelope, ensure_ascii=False)


class Envelope:
    """A reply shape (``agent.mqtt.chat.Shape``): the outcome of ``request`` as its envelope."""

    def __init__(self, request: ChatRequest, skip_thinking: bool, prompt_opened: bool) -> None:
        self.request = request
        self.skip_thinking = skip_thinking
        self.prompt_opened = prompt_opened

    def __call__(self, outcome: Outcome) -> str:
        req, result, text, ok = self.request, outcome.result, outcome.text, outcome.ok
        reasoning = None
        if req.options.include_reasoning:
            reasoning = ""
            if result is not None and self.skip_thinking:
                reasoning = split_completion(result.text, self.prompt_opened)[1]
        return _dumps(build(
            request_id=req.request_id, session_id=req.session_id, project=req.project,
            client_id=req.client_id, text=text, ok=ok, result=result, reasoning=reasoning,
        ))


def error_envelope(err: ProtocolError) -> str | None:
    """The envelope of a request that failed validation, if it asked for one; else None."""
    if not wants_json(err.data):
        return None
    data = err.data or {}
    client_id = data.get("clientId")
    if isinstance(client_id, (int, float)) and not isinstance(client_id, bool):
        client_id = str(client_id)
    if isinstance(client_id, str) and client_id:  # JSON may hold lone surrogates
        client_id = client_id.encode("utf-8", "replace").decode("utf-8")
    return _dumps(build(
        request_id=err.request_id, session_id=err.session_id, project=err.project,
        client_id=client_id or None if isinstance(client_id, str) else None,
        text=err.reply, ok=False, default_code=BAD_REQUEST,
        reasoning="" if data.get("includeReasoning") is True else None,
    ))
