"""API keys: ``Authorization: Bearer KEY``, compared in constant time, never logged."""

from __future__ import annotations

import hmac

from agent.http.errors import ApiError


class ApiKeys:
    """No keys: every client is let in (the agent then listens on loopback only)."""

    def __init__(self, keys: tuple[str, ...]) -> None:
        self._keys = [k.encode() for k in keys]

    def client(self, authorization: str | None, address: str) -> str:
        """Who the request is, for the rate limit: ``key-N`` (the N-th key), or the client's
        address without keys; ApiError 401 for a missing or wrong key."""
        if not self._keys:
            return address
        scheme, _, token = (authorization or "").partition(" ")
        given = token.strip().encode() if scheme.lower() == "bearer" else b""
        found = 0
        for n, key in enumerate(self._keys, 1):  # every key compared: no early exit
            if hmac.compare_digest(given, key) and not found:
                found = n
        if not found:
            raise ApiError(401, "a valid API key is needed: Authorization: Bearer KEY",
                           "authentication_error", "invalid_api_key")
        return f"key-{found}"
