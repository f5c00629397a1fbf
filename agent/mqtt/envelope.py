"""The JSON envelope of a reply (PROTOCOL.md part C, ``"responseFormat": "json"``).

One JSON object per reply, error included::

    {"requestId", "sessionId", "project", "clientId", "text", "finishReason",
     "usage": {"promptTokens", "completionTokens", "cachedPromptTokens"},
     "timings": {"queueMs", "ttftMs", "totalMs"},
     "error": {"code", "message"},   # only on failure
     "reasoning": "...",             # only with "includeReasoning": true
     "maxTokens", "maxTokensApplied",          # only when the request gave maxTokens
     "warnings": [{"code", "message"}, ...]}   # only when something asked was not done

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
- ``maxTokens``: the request's, as sent; ``maxTokensApplied``: the cap the
  reply was generated under (lowered to ``--max_tokens_limit``, not refused).
- ``warnings``: what the request asked that was not done, the request still
  answered: ``max_tokens_capped`` (maxTokens above the limit), ``images_ignored``
  (a text model answers the text only). A plain-text reply says nothing of
  these: old clients show the payload verbatim.
"""

from __future__ import annotations

import json
from typing import Any

from agent.core.errors import BAD_REQUEST, INTERNAL_CODE, error_code
from agent.core.outcome import Outcome
from agent.core.reasoning import split_completion
from agent.mqtt.options import wants_json
from agent.mqtt.protocol import ChatRequest, ProtocolError
from engine.api import GenerationResult


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


MAX_TOKENS_CAPPED, IMAGES_IGNORED = "max_tokens_capped", "images_ignored"


def request_notes(request: ChatRequest) -> dict[str, Any]:
    """The envelope's fields on what was made of the request: its maxTokens and warnings."""
    notes: dict[str, Any] = {}
    warnings = []
    asked, applied = request.max_tokens_asked, request.max_tokens
    if asked is not None:
        notes["maxTokens"], notes["maxTokensApplied"] = asked, applied
        if applied is not None and applied < asked:
            warnings.append({"code": MAX_TOKENS_CAPPED, "message": (
                f"maxTokens {asked} is above this agent's limit (--max_tokens_limit): "
                f"{applied} applied")})
    if request.images_ignored:
        n = request.images_ignored
        warnings.append({"code": IMAGES_IGNORED, "message": (
            f"{n} image{'s' if n > 1 else ''} ignored: this model reads text only; "
            f"the text was answered")})
    if warnings:
        notes["warnings"] = warnings
    return notes


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
        envelope = build(
            request_id=req.request_id, session_id=req.session_id, project=req.project,
            client_id=req.client_id, text=text, ok=ok, result=result, reasoning=reasoning,
        )
        envelope.update(request_notes(req))
        return _dumps(envelope)


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
