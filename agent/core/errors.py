"""Every error text the core (and a front door) sends -> its error code: one table for the
MQTT JSON envelope's ``error.code`` and the HTTP door's status."""

from __future__ import annotations

from agent.core.outcome import CANCELLED, INTERNAL, OVERLOADED, SHUTTING_DOWN
from agent.core.rate_limit import RATE_LIMITED
from agent.core.reasoning import EMPTY_ANSWER, REASONING_CUT_OFF

BAD_REQUEST, RATE_LIMITED_CODE, OVERLOADED_CODE = "bad_request", "rate_limited", "overloaded"
TOO_LONG, INTERNAL_CODE, SHUTTING_DOWN_CODE = "too_long", "internal", "shutting_down"
CANCELLED_CODE = "cancelled"  # the client went away (HTTP); never sent to anyone
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
    CANCELLED: CANCELLED_CODE,
}
_PREFIXES = (
    ("Error: the message is too long", TOO_LONG),  # agent.core.prompt_builder.PromptTooLong
    ("Error: maxTokens leaves no room", TOO_LONG),  # ... likewise
    ("Error: the prompt is too long", TOO_LONG),  # ... of a conversation given whole (HTTP)
    ("Error: the request is too large", TOO_LONG),  # over --max_payload_bytes
    ("Error: no answer within", OVERLOADED_CODE),  # --request_timeout: busy, try again later
)


def error_code(text: str, default: str = INTERNAL_CODE) -> str:
    """The code of the plain-text error reply ``text`` (the MQTT envelope's ``error.code``)."""
    code = _EXACT.get(text)
    if code is not None:
        return code
    return next((c for prefix, c in _PREFIXES if text.startswith(prefix)), default)
