"""agent.mqtt.redelivery: a request the broker delivers again (DUP, same packet id) after a
reconnect is served once; its PUBACK goes once, on the connection it can reach."""

from __future__ import annotations

from agent.mqtt.acks import Ack
from agent.mqtt.redelivery import Redeliveries


class Connection:
    def __init__(self) -> None:
        self.now = 1
        self.sent: list[tuple[int, int]] = []  # (connection, packet id)

    def ack(self, mid: int, connection: int) -> Ack:
        return Ack(lambda m, qos: self.sent.append((self.now, m)), mid, 1, connection,
                   lambda: self.now)


def test_a_copy_of_a_request_being_answered_is_acknowledged_after_its_reply() -> None:
    link, seen = Connection(), Redeliveries()
    first = link.ack(7, 1)
    assert not seen.copy_handled(first, dup=False, connection=1)  # served
    link.now = 2  # reconnected: the broker sends it again
    copy = link.ack(7, 2)
    assert seen.copy_handled(copy, dup=True, connection=2) and copy.held  # not served
    first()  # its reply went out: the PUBACK, on the new connection
    assert link.sent == [(2, 7)]


def test_a_copy_of_an_answered_request_is_acknowledged_at_once() -> None:
    link, seen = Connection(), Redeliveries()
    first = link.ack(7, 1)
    seen.copy_handled(first, dup=False, connection=1)
    link.now = 2
    first()  # answered while the connection was down: nothing could be sent
    copy = link.ack(7, 2)
    assert seen.copy_handled(copy, dup=True, connection=2) and not copy.held
    copy()  # what the receiving thread does with an Ack it did not hold
    assert link.sent == [(2, 7)]


def test_new_requests_and_strangers_are_served() -> None:
    link, seen = Connection(), Redeliveries()
    old = link.ack(7, 1)
    seen.copy_handled(old, dup=False, connection=1)
    old()
    assert not seen.copy_handled(link.ack(7, 1), dup=False, connection=1)  # the id freed, reused
    assert not seen.copy_handled(link.ack(8, 1), dup=True, connection=1)  # not ours: a new process
    seen.new_session()  # the broker kept nothing: no copy of before can come
    link.now = 2
    assert not seen.copy_handled(link.ack(7, 2), dup=True, connection=2)
