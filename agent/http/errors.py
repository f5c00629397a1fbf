"""Errors in OpenAI's shape, ``{"error": {"message", "type", "code", "param"}}``, with the
HTTP status each kind of failure gets."""

from __future__ import annotations

from typing import Any

from agent.core.errors import (
    BAD_REQUEST,
    CANCELLED_CODE,
    INTERNAL_CODE,
    OVERLOADED_CODE,
    RATE_LIMITED_CODE,
    SHUTTING_DOWN_CODE,
    TOO_LONG,
    error_code,
)

# the core's error code -> (HTTP status, OpenAI error type)
_BY_CODE = {
    BAD_REQUEST: (400, "invalid_request_error"),
    TOO_LONG: (400, "invalid_request_error"),
    RATE_LIMITED_CODE: (429, "rate_limit_error"),
    OVERLOADED_CODE: (503, "server_error"),
    SHUTTING_DOWN_CODE: (503, "server_error"),
    INTERNAL_CODE: (500, "server_error"),
    CANCELLED_CODE: (499, "server_error"),  # nobody is there to read it
}


class ApiError(Exception):
    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 code: str | None = None, param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.param = (
            status, message, type, code, param)

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "code": self.code,
                          "param": self.param}}


def bad_request(message: str, param: str | None = None) -> ApiError:
    return ApiError(400, message, "invalid_request_error", BAD_REQUEST, param)


def from_core(text: str) -> ApiError:
    """The HTTP error of one of the core's error texts (``Error: ...``)."""
    code = error_code(text)
    status, kind = _BY_CODE.get(code, (500, "server_error"))
    return ApiError(status, text.removeprefix("Error: "), kind, code)
