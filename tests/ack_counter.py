"""Counts the agent's PUBACKs against the QoS 1 messages paho delivered to it (agent.mqtt.acks).

    @pytest.fixture(autouse=True)
    def acks() -> Iterator[AckCounter]:
        with counting_acks() as counter:
            yield counter
        counter.assert_balanced()   # after the agents are stopped

Every agent created inside the ``with`` is counted (the patch is on the classes),
a test's own paho clients are not (they acknowledge automatically, never
through ``Client.ack``).
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager

import paho.mqtt.client as mqtt
import pytest

from agent.mqtt.client import MqttClient

Delivery = tuple[int, int]  # (id of the paho client, packet id)


class AckCounter:
    def __init__(self) -> None:
        self.delivered: Counter[Delivery] = Counter()
        self.acked: Counter[Delivery] = Counter()
        self.redelivered = 0  # deliveries with the DUP flag
        self.cond = threading.Condition()

    def delivery(self, client: mqtt.Client, mid: int, dup: bool) -> None:
        with self.cond:
            self.delivered[(id(client), mid)] += 1
            self.redelivered += dup

    def ack(self, client: mqtt.Client, mid: int) -> None:
        with self.cond:
            self.acked[(id(client), mid)] += 1
            self.cond.notify_all()

    def assert_balanced(self, timeout: float = 5.0) -> None:
        """Each delivery acknowledged exactly once, and nothing else acknowledged (waits up to
        ``timeout`` s for replies still on their way)."""
        deadline = time.monotonic() + timeout
        with self.cond:
            while self.acked != self.delivered and time.monotonic() < deadline:
                self.cond.wait(0.05)
            missing = self.delivered - self.acked
            extra = self.acked - self.delivered
        assert not missing and not extra, (
            f"{sum(self.delivered.values())} deliveries, {sum(self.acked.values())} acks; "
            f"never acknowledged: {sorted(missing)[:10]}; acknowledged too often or unasked: "
            f"{sorted(extra)[:10]}")


@contextmanager
def counting_acks() -> Iterator[AckCounter]:
    counter = AckCounter()
    on_message, ack = MqttClient._on_message, mqtt.Client.ack

    def counted_on_message(self: MqttClient, client: mqtt.Client, userdata: object,
                           message: mqtt.MQTTMessage) -> None:
        if message.qos:
            counter.delivery(client, message.mid, bool(message.dup))
        on_message(self, client, userdata, message)

    def counted_ack(client: mqtt.Client, mid: int, qos: int) -> mqtt.MQTTErrorCode:
        counter.ack(client, mid)
        return ack(client, mid, qos)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(MqttClient, "_on_message", counted_on_message)
        patch.setattr(mqtt.Client, "ack", counted_ack)
        yield counter


@pytest.fixture
def every_request_acked() -> Iterator[AckCounter]:
    """For ``pytest.mark.usefixtures``: after the test (its agents stopped), each request the
    agents received was acknowledged exactly once."""
    with counting_acks() as counter:
        yield counter
    counter.assert_balanced()
