"""A turn's one final result, as the core hands it to the front door that asked."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Protocol

from engine.api import GenerationResult

INTERNAL = "Error: internal server error"
OVERLOADED = "Server is overloaded. Please try again in a moment."
SHUTTING_DOWN = "Error: the server is shutting down. Please try again later."
RESET_REPLY = "OK: session reset"
CANCELLED = "Error: the request was cancelled"  # the client went away (HTTP)


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
    def timeout_s(self) -> float | None:
        """How long the client waits for the reply (None: ``request_timeout``)."""
        ...
    @property
    def reset(self) -> bool:
        """Forget the session (history and system prompt) instead of a turn."""
        ...


class DeltaSink(Protocol):
    """Where a streamed turn's text deltas go (engine thread); ``restart()``: the reply is
    generated once more (output rules), its deltas start over."""

    def feed(self, delta: str) -> None: ...

    def restart(self) -> None: ...


@dataclass(frozen=True, eq=False)
class GivenConversation:
    """A turn whose whole conversation comes with it (the HTTP door): no session is read or
    recorded, nothing is trimmed (a prompt that does not fit is an error that says how many
    tokens do), and a ``max_tokens`` beyond what fits after the prompt is lowered to that.

    ``messages`` go through the model's chat template (with ``tools`` and
    ``template_kwargs``); ``prompt``, if given instead, is the raw text to complete.
    ``client_id`` keys the rate limit (an API key's name, or the client's address).
    ``as_project``: the project's generation defaults and output rules apply (else only its
    KV share: the conversation is the model's own). ``raw``: the reply is the completion's
    text as the model wrote it (no reasoning removed, no output rules)."""

    project: str
    as_project: bool = True
    raw: bool = False
    messages: list[dict[str, Any]] | None = None
    prompt: str | None = None
    tools: list[dict[str, Any]] | None = None
    template_kwargs: dict[str, Any] = field(default_factory=dict)
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None
    stop: tuple[str, ...] = ()
    client_id: str | None = None
    request_id: str | None = None
    # the core's lane key: one lane of its own per conversation ("#": no MQTT session id has it)
    session_id: str = field(default="", compare=False)
    system_prompt: str | None = None  # unused: the messages hold it
    message: str = ""  # unused: the messages hold it
    reset: bool = False
    timeout_s: float | None = None
