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
same packet id, DUP set). Such a copy is not served again
(agent.mqtt.redelivery): the request's ``Ack`` is moved to the new connection
(``rebind``), or, if it was called already, the copy is acknowledged at once.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

SendAck = Callable[[int, int], object]  # paho's Client.ack(mid, qos)


class Ack:
    """One received message's acknowledgement: call it once its reply was handed to paho."""

    __slots__ = ("_connection", "_current", "_done", "_guard", "_send", "held", "mid", "qos")

    def __init__(self, send: SendAck, mid: int, qos: int, connection: int,
                 current: Callable[[], int]) -> None:
        self._send = send
        self.mid = mid
        self.qos = qos
        self._connection = connection  # the connection the message came in on
        self._current = current  # the connection now
        self._guard = threading.Lock()
        self._done = False
        self.held = False  # someone (a turn) calls it later; the receiving thread must not

    def hold(self) -> Ack:
        """Takes the acknowledgement over from the receiving thread."""
        self.held = True
        return self

    @property
    def connection(self) -> int:
        return self._connection

    def __call__(self) -> None:
        """Sends the PUBACK; later calls do nothing."""
        with self._guard:
            if self._done:
                return
            self._done = True
            here = self._connection == self._current()
        if here:
            self._send(self.mid, self.qos)

    def rebind(self, connection: int) -> bool:
        """Moves the acknowledgement to ``connection`` (its message came again on it); False
        if it was called already."""
        with self._guard:
            if self._done:
                return False
            self._connection = connection
            return True


class _NoAck(Ack):
    """QoS 0 messages and messages from other sources (tests, the door's own callers)."""

    def __init__(self) -> None:  # noqa: D107 - nothing to remember
        self.held = False

    def hold(self) -> Ack:
        return self

    def __call__(self) -> None:
        pass


NO_ACK: Ack = _NoAck()
