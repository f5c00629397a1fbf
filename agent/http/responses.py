"""The objects the OpenAI API answers with: completions, chunks of a stream, usage."""

from __future__ import annotations

import json
import secrets
import time
from typing import Any

from engine.api import GenerationResult

DONE = "data: [DONE]\n\n"


def new_id(kind: str) -> tuple[str, int]:
    """(``chatcmpl-...`` or ``cmpl-...``, the creation time in seconds)."""
    return f"{kind}-{secrets.token_hex(12)}", int(time.time())


def finish_reason(result: GenerationResult | None) -> str:
    return "length" if result is not None and result.finish_reason == "length" else "stop"


def usage(result: GenerationResult | None) -> dict[str, Any]:
    prompt = result.prompt_tokens if result else 0
    completion = len(result.token_ids) if result else 0
    return {"prompt_tokens": prompt, "completion_tokens": completion,
            "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": result.cached_prompt_tokens if result else 0}}


def chat_completion(rid: str, created: int, model: str, message: dict[str, Any], finish: str,
                    result: GenerationResult | None) -> dict[str, Any]:
    return {"id": rid, "object": "chat.completion", "created": created, "model": model,
            "choices": [{"index": 0, "message": message, "logprobs": None,
                         "finish_reason": finish}],
            "usage": usage(result)}


def text_completion(rid: str, created: int, model: str, text: str, finish: str,
                    result: GenerationResult | None) -> dict[str, Any]:
    return {"id": rid, "object": "text_completion", "created": created, "model": model,
            "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}],
            "usage": usage(result)}


def chat_chunk(rid: str, created: int, model: str, delta: dict[str, Any],
               finish: str | None = None) -> dict[str, Any]:
    return {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}


def text_chunk(rid: str, created: int, model: str, text: str,
               finish: str | None = None) -> dict[str, Any]:
    return {"id": rid, "object": "text_completion", "created": created, "model": model,
            "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}]}


def usage_chunk(rid: str, created: int, model: str, obj: str,
                result: GenerationResult | None) -> dict[str, Any]:
    return {"id": rid, "object": obj, "created": created, "model": model, "choices": [],
            "usage": usage(result)}


def sse(obj: dict[str, Any]) -> str:
    """One server-sent event."""
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"
