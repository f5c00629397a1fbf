"""The replies of answered requests, by (project, session, requestId, message), for a while.

MQTT delivers a QoS 1 request again after a reconnect or a broker restart, also one that
was answered (its PUBACK lost with the connection). Such a copy gets the same reply again,
not a second generation (which would add the turn to the session twice) and not silence
(the client may have missed the first reply). Only requests that were answered with
success are kept: a request that was refused (overloaded, rate limited, invalid) or failed
is forgotten, so that a retry with the same ``requestId`` is served. A copy is the same
message too (a digest of it is part of the key): whoever sends a session's next
``requestId`` first with another message neither silences that request nor answers it.

Bounded by entries and by bytes (the client chooses the ids and the reply's length follows
from its prompt); the oldest entries go first, and every entry after ``ttl`` seconds.
"""

from __future__ import annotations

import hashlib
import sys
import threading
import time
from array import array
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import replace

from agent.core.outcome import Outcome

RequestKey = tuple[str, str, str, bytes]  # project, session id, requestId, message digest

MAX_ENTRIES = 10_000
MAX_BYTES = 32 * 1024 * 1024
_ENTRY_OVERHEAD = 400  # the dict slot, the tuples, the Outcome, the result: roughly


def request_key(project: str, session_id: str, request_id: str, message: str) -> RequestKey:
    digest = hashlib.blake2b(message.encode("utf-8", "surrogatepass"), digest_size=16).digest()
    return project, session_id, request_id, digest


def outcome_bytes(key: RequestKey, outcome: Outcome) -> int:
    """What keeping ``outcome`` under ``key`` costs, roughly, in bytes."""
    size = _ENTRY_OVERHEAD + sum(sys.getsizeof(part) for part in (*key, outcome.text))
    if outcome.result is not None:
        size += sys.getsizeof(outcome.result.text) + 8 * len(outcome.result.token_ids)
    return size


def slim(outcome: Outcome) -> Outcome:
    """The outcome as kept: its result's token ids as a compact array (the reply's shape
    reads only their number)."""
    result = outcome.result
    if result is None:
        return outcome
    return outcome._replace(result=replace(result, token_ids=array("l", result.token_ids)))


class AnsweredRequests:
    """Answered requests' outcomes for ``ttl`` seconds, within ``max_entries`` and
    ``max_bytes``. Thread-safe."""

    def __init__(self, ttl: float, max_entries: int = MAX_ENTRIES, max_bytes: int = MAX_BYTES,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if ttl <= 0 or max_entries < 1 or max_bytes < 1:
            raise ValueError("ttl, max_entries and max_bytes must be > 0")
        self.ttl = ttl
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self._clock = clock
        self._lock = threading.Lock()
        self._entries: OrderedDict[RequestKey, tuple[float, int, Outcome]] = OrderedDict()
        self._bytes = 0

    def remember(self, key: RequestKey, outcome: Outcome) -> None:
        """Keeps a successful ``outcome``; one larger than the whole bound is not kept."""
        size = outcome_bytes(key, outcome)
        if size > self.max_bytes:
            return
        kept = slim(outcome)
        with self._lock:
            self._drop(key)
            self._entries[key] = (self._clock(), size, kept)
            self._bytes += size
            self._expire()

    def reply_of(self, key: RequestKey) -> Outcome | None:
        """The outcome ``key`` was answered with, if it still is kept."""
        with self._lock:
            self._expire()
            entry = self._entries.get(key)
            return None if entry is None else entry[2]

    @property
    def bytes(self) -> int:
        return self._bytes

    def __len__(self) -> int:
        return len(self._entries)

    def _drop(self, key: RequestKey) -> None:
        entry = self._entries.pop(key, None)
        if entry is not None:
            self._bytes -= entry[1]

    def _expire(self) -> None:
        now = self._clock()
        while self._entries:
            oldest, (at, _, _) = next(iter(self._entries.items()))
            if (now - at < self.ttl and len(self._entries) <= self.max_entries
                    and self._bytes <= self.max_bytes):
                break
            self._drop(oldest)
