"""A turn's sampling: the request's own values, else its project's defaults, else the
agent's (``CoreSettings``); the reply's length defaults to ``--max_tokens`` and is capped by
``--max_tokens_limit`` (``CoreSettings.token_limit``)."""

from __future__ import annotations

from agent.core.outcome import TurnRequest
from agent.core.settings import CoreSettings
from engine.api import SamplingParams
from projects import ProjectSpec


def reply_tokens(request: TurnRequest, spec: ProjectSpec, settings: CoreSettings) -> int:
    """Most tokens the reply may have, before the prompt's room is known: what the request
    asks for, else its project's default, else ``--max_tokens``; never above the limit."""
    return min(request.max_tokens or spec.max_tokens or settings.max_tokens, settings.token_limit)


def sampling_for(request: TurnRequest, spec: ProjectSpec, settings: CoreSettings,
                 max_tokens: int, stop: tuple[str, ...] = (),
                 seed: int | None = None) -> SamplingParams:
    temperature = request.temperature if request.temperature is not None else spec.temperature
    top_p = request.top_p if request.top_p is not None else spec.top_p
    return SamplingParams(
        temperature=settings.temperature if temperature is None else temperature,
        top_p=settings.top_p if top_p is None else top_p,
        max_tokens=max_tokens, stop=stop, seed=seed,
    )
