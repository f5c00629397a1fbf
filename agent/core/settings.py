"""What the core needs to know of the service's settings: limits and generation defaults."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class CoreSettings:
    # generation defaults (a request or a project may narrow them)
    temperature: float = 0.7
    top_p: float = 0.9
    max_tokens: int = 256  # a reply's length unless the request or its project asks otherwise
    max_tokens_limit: int | None = None  # most a request may ask for; None: max_tokens
    max_history_tokens: int = 2000  # system prompt + history + new message
    skip_thinking: bool = True  # <think>...</think> out of replies
    # limits
    max_requests_per_session: int = 20  # per rate_limit_window
    max_requests_per_client: int = 120  # per rate_limit_window, over the client's sessions
    rate_limit_window: float = 60.0
    max_queue: int = 256  # accepted but unanswered turns, over every session
    request_timeout: float = 100.0  # a turn still unanswered then gets the timeout error
    num_workers: int = 4  # threads that build prompts and deliver results

    @property
    def token_limit(self) -> int:
        """The cap of a reply's length, whatever a request asks (``--max_tokens_limit``)."""
        return self.max_tokens if self.max_tokens_limit is None else self.max_tokens_limit
