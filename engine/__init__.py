"""Our own inference engine. ``import engine`` stays cheap: torch loads on first use."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from engine.api import EngineConfig
    from engine.llm_engine import LLMEngine


def create_engine(config: EngineConfig) -> LLMEngine:
    """Load tokenizer and model for ``config``; the caller then calls ``start()``."""
    from engine.llm_engine import LLMEngine

    return LLMEngine.from_config(config)
