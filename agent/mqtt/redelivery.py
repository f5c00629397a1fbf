"""A request the broker delivers again on a new connection is not served a second time.

The agent acknowledges a request after its reply (agent.mqtt.acks). When the connection
drops first (a broker restart, a network cut), the broker still counts the request
unacknowledged and, once we are back, delivers it again with the same packet id and the
DUP flag set (MQTT-4.4.0-1). Served again, it was generated twice: two answers, with
different texts where the client sent no ``requestId`` (59 of 200 requests in a broker
restart: bench/hostile.py). A DUP message whose packet id is that of a request this
process received is such a copy:

- that request is still being answered: its ``Ack`` moves to the new connection
  (``rebind``) and sends the PUBACK there after the reply; the copy is dropped;
- it was answered (its PUBACK lost with the connection, or never sent on it): the copy
  is acknowledged at once. The reply went out before the PUBACK, through paho's queue.

A copy that reaches a new process (the first one died) finds nothing here and is served.
Bounded: one entry per packet id, and packet ids have 16 bits.
"""

from __future__ import annotations

import logging
import threading

from agent.mqtt.acks import Ack

log = logging.getLogger(__name__)


class Redeliveries:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._last: dict[int, Ack] = {}  # packet id -> the Ack of the last request with it

    def copy_handled(self, ack: Ack, dup: bool, connection: int) -> bool:
        """True if the request of ``ack`` (received on ``connection``) is a copy handled here:
        do not serve it. ``ack`` is then held (the earlier request's Ack sends the PUBACK)
        or left to be sent as the message's handling ends (acknowledged at once)."""
        with self._lock:
            earlier = self._last.get(ack.mid) if dup else None
            if earlier is None or earlier is ack:
                self._last[ack.mid] = ack  # a new request (the broker freed the id)
                return False
        if earlier.connection != connection and earlier.rebind(connection):
            ack.hold()  # never sent: the earlier Ack, now on this connection, sends it
            with self._lock:
                self._last[ack.mid] = earlier
            log.info("request (packet %d) delivered again while being answered: "
                     "acknowledged after its reply", ack.mid)
        else:
            log.info("request (packet %d) delivered again after it was answered: "
                     "acknowledged, not served again", ack.mid)
        return True

    def new_session(self) -> None:
        """The broker kept no session for us: nothing of before comes again."""
        with self._lock:
            self._last.clear()
