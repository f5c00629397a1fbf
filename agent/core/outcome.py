"""A turn's one final result, as the core hands it to the front door that asked."""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple, Protocol

from engine.api import GenerationResult

INTERNAL = "Error: internal server error"
OVERLOADED = "Server is overloaded. Please try again in a moment."
SHUTTING_DOWN = "Error: the server is shutting down. Please try again later."
RESET_REPLY = "OK: session reset"


class Outcome(NamedTuple):  # a tuple: made once per request, cheaply
    """``text``: the reply, or the error's text (``Error: ...``); ``ok`` tells which.
    ``result``: the engine's result of the turn's last generation (None without one).
    ``admitted``: False for a request refused at admission (no turn was started)."""

    text: str
    ok: bool
    result: GenerationResult | None = None
    admitted: bool = True


Deliver = Callable[[Outcome], None]  # called once per request, on any thread


class TurnRequest(Protocol):
    """What the core reads of a front door's request (the door's own type adds its wire data)."""

    @property
    def project(self) -> str: ...
    @property
    def session_id(self) -> str: ...
    @property
    def message(self) -> str: ...
    @property
    def temperature(self) -> float | None: ...
    @property
    def top_p(self) -> float | None: ...
    @property
    def max_tokens(self) -> int | None: ...
    @property
    def system_prompt(self) -> str | None: ...
    @property
    def client_id(self) -> str | None: ...
    @property
    def request_id(self) -> str | None: ...
    @property
    def reset(self) -> bool:
        """Forget the session (history and system prompt) instead of a turn."""
        ...


class DeltaSink(Protocol):
    """Where a streamed turn's text deltas go (engine thread); ``restart()``: the reply is
    generated once more (output rules), its deltas start over."""

    def feed(self, delta: str) -> None: ...

    def restart(self) -> None: ...
