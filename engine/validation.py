"""Checks on what users can get wrong: engine options we do not support, bad requests.

Each returns or raises a message a user can act on.
"""

from __future__ import annotations

import time

from engine.api import EngineConfig, GenerationRequest, GenerationResult


def check_supported(config: EngineConfig) -> None:
    """Raise ``UnsupportedError`` for options this engine does not implement."""
    from engine.quantization import normalise_method

    normalise_method(config.quantization)  # the one place that knows the names and aliases


def validate_request(request: GenerationRequest, max_model_len: int, vocab_size: int) -> str | None:
    """Why ``request`` cannot run (a message), or ``None`` when it can."""
    ids = request.prompt_token_ids
    if not ids:
        return "the prompt is empty: at least one prompt token is needed"
    bad = next((t for t in ids if not (isinstance(t, int) and 0 <= t < vocab_size)), None)
    if bad is not None:
        return f"prompt token id {bad!r} is outside the vocabulary [0, {vocab_size})"
    total = len(ids) + request.sampling.max_tokens
    if total > max_model_len:
        return (
            f"prompt ({len(ids)} tokens) + max_tokens ({request.sampling.max_tokens}) = {total} "
            f"exceeds max_model_len {max_model_len}; shorten the prompt or lower max_tokens"
        )
    return None


def empty_result(
    request: GenerationRequest, reason: str, error: str, arrival: float | None = None
) -> GenerationResult:
    """The result of a request that never ran (rejected, or submitted after shutdown)."""
    total = time.monotonic() - arrival if arrival is not None else 0.0
    return GenerationResult(
        request_id=request.request_id,
        text="",
        token_ids=[],
        finish_reason=reason,
        prompt_tokens=len(request.prompt_token_ids),
        error=error,
        queue_s=total,
        total_s=total,
    )
