"""Two agents with one ``--agent_id``: the younger one stops, the elder serves on.

Both use the same MQTT client id, so each connection takes the other's session over (the
broker drops the older connection), and both reconnecting made them flap: 15 and 28
reconnects in 23 s, 43 of 300 requests answered twice. When its connection is dropped, an
agent reads its own retained status topic with a second, throw-away connection: the agent
that is online there now is the one that took the session over. If that is another
process (another ``instance``) that started earlier, this one is the second agent: it
stops with one ERROR line instead of taking the session back. A broker restart shows our
own status (or none), so the agent reconnects as before.
"""

from __future__ import annotations

import json
import logging
import secrets
import threading
import time
from typing import TYPE_CHECKING, Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from agent.mqtt.tls import configure_tls

if TYPE_CHECKING:
    from agent.service.config import AgentConfig

log = logging.getLogger(__name__)

SETTLE_S = 0.3  # the agent that took the session over publishes its status right after


def read_retained(config: AgentConfig, topic: str, timeout: float) -> dict[str, Any] | None:
    """The retained JSON object on ``topic`` (None: none, not JSON, or no broker in time),
    read by a connection of its own (a random client id, a clean session)."""
    got: dict[str, Any] = {}
    done = threading.Event()
    probe = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"probe-{secrets.token_hex(6)}",
                        protocol=mqtt.MQTTv5 if config.mqtt_protocol == "5" else mqtt.MQTTv311)
    if config.mqtt_username is not None:
        probe.username_pw_set(config.mqtt_username, config.mqtt_password)
    configure_tls(probe, config, lambda exc: None)

    def on_connect(client: mqtt.Client, userdata: object, flags: object, reason: Any,
                   properties: object) -> None:
        if reason.is_failure:
            done.set()
        else:
            client.subscribe(topic, qos=0)

    def on_subscribe(*args: object) -> None:
        threading.Timer(min(0.5, timeout), done.set).start()  # retained ones come at once

    def on_message(client: mqtt.Client, userdata: object, message: mqtt.MQTTMessage) -> None:
        try:
            data = json.loads(message.payload)
        except ValueError:
            return
        if isinstance(data, dict):
            got.update(data)
            done.set()

    probe.on_connect, probe.on_subscribe, probe.on_message = on_connect, on_subscribe, on_message
    try:
        probe.connect(config.mqtt_broker, config.mqtt_port, keepalive=10)
    except OSError:
        return None
    probe.loop_start()
    try:
        done.wait(timeout)
    finally:
        probe.disconnect()
        probe.loop_stop()
    return got or None


def elder_rival(mine: tuple[str, str], status: dict[str, Any] | None) -> str | None:
    """If ``status`` (our status topic's) is another agent's, online and older than
    ``mine`` (our startedAt, instance), what it says of that agent; else None."""
    if not status or status.get("state") != "online":
        return None
    theirs = (str(status.get("startedAt", "")), str(status.get("instance", "")))
    if not theirs[1] or theirs[1] == mine[1] or theirs > mine:
        return None
    return f"started at {theirs[0]}, instance {theirs[1]}"


class RivalCheck:
    """Called when the connection is dropped: a message if we are the second agent."""

    def __init__(self, config: AgentConfig, status_topic: str, started_at: str,
                 instance: str, timeout: float = 2.0) -> None:
        self.config = config
        self.status_topic = status_topic
        self.mine = (started_at, instance)
        self.timeout = timeout

    def __call__(self) -> str | None:
        time.sleep(SETTLE_S)
        rival = elder_rival(self.mine, read_retained(self.config, self.status_topic,
                                                     self.timeout))
        if rival is None:
            return None
        return (f"another agent with the same agent id ({rival}) took over our MQTT session: "
                "two agents must not share --agent_id (or --client_id); this one, started "
                f"later, stops (set a unique --agent_id, e.g. the host name)")
