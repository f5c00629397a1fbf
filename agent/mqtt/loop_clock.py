"""paho's client with a clock on its network loop, for the systemd watchdog.

``MqttClient.loop_age`` reads it: a loop that stopped coming round (a callback stuck, or
its thread ended by an exception) stops the watchdog pings, while a loop that waits to
reconnect to a broker that is down is no stall.
"""

from __future__ import annotations

import time
from typing import Any

import paho.mqtt.client as mqtt


class LoopClient(mqtt.Client):
    """paho's client that notes when its network loop last came round (MqttClient.loop_age, for
    the systemd watchdog): each pass of the loop (a select of at most 1 s while connected),
    each reconnect attempt, and the end of the loop's thread (an exception out of a callback
    ends it for good)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.last_tick = time.monotonic()
        self.loop_ended = False

    def loop_start(self) -> mqtt.MQTTErrorCode:
        self.last_tick = time.monotonic()
        return super().loop_start()

    def loop_forever(self, *args: Any, **kwargs: Any) -> mqtt.MQTTErrorCode:
        try:
            return super().loop_forever(*args, **kwargs)
        finally:
            self.loop_ended = True

    def loop_misc(self) -> mqtt.MQTTErrorCode:
        self.last_tick = time.monotonic()
        return super().loop_misc()

    def reconnect(self) -> mqtt.MQTTErrorCode:
        self.last_tick = time.monotonic()
        try:
            return super().reconnect()
        finally:
            self.last_tick = time.monotonic()
