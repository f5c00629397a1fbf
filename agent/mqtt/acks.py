"""Acknowledge a request (PUBACK) only once its reply is on its way: a crash loses nothing.

The connection runs paho with ``manual_ack=True``. Each QoS 1 (or 2) message
the agent receives comes with an ``Ack``; it is called after the message's
reply (answer, error, overloaded, ...) was handed to paho for publishing, or
after the agent decided to drop the message on purpose (no reply topic, a
duplicate ``requestId``). A message whose handler returns without holding its
``Ack`` is acknowledged as the handler returns (every synchronous reply has
been published by then); the core holds the ``Ack`` of a turn it accepted
(``on_sent``) and calls it from ``Conversation.finish``, after the reply. A process killed before
that leaves the message unacknowledged: the broker delivers it again (DUP) to
the next process with the same client id.

An ``Ack`` sends at most one PUBACK, and only on the connection its message came
in on: after a reconnect the broker resends every unacknowledged message (the
same packet id, DUP set) and the resent copy brings its own ``Ack``.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

SendAck = Callable[[int, int], object]  # paho's Client.ack(mid, qos)


class Ack:
    """One received message's acknowledgement: call it once its reply was handed to paho."""

    __slots__ = ("_connection", "_current", "_lock", "_mid", "_qos", "_send", "held")

    def __init__(self, send: SendAck, mid: int, qos: int, connection: int,
                 current: Callable[[], int]) -> None:
        self._send = send
        self._mid = mid
        self._qos = qos
        self._connection = connection  # the connection the message came in on
        self._current = current  # the connection now
        self._lock = threading.Lock()  # taken by the one call that sends, never released
        self.held = False  # someone (a turn) calls it later; the receiving thread must not

    def hold(self) -> Ack:
        """Takes the acknowledgement over from the receiving thread."""
        self.held = True
        return self

    def __call__(self) -> None:
        """Sends the PUBACK; later calls do nothing."""
        if not self._lock.acquire(blocking=False):
            return  # sent already, or being sent by another thread
        if self._connection == self._current():
            self._send(self._mid, self._qos)


class _NoAck(Ack):
    """QoS 0 messages and messages from other sources (tests, the door's own callers)."""

    def __init__(self) -> None:  # noqa: D107 - nothing to remember
        self.held = False

    def hold(self) -> Ack:
        return self

    def __call__(self) -> None:
        pass


NO_ACK: Ack = _NoAck()
