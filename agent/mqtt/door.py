"""The MQTT front door: every message the agent receives goes to the handler of its topic.

Chat requests (``P/user_input``, the most) are told by one lookup; else, in order, the
control topics of every project (``P/template``, ...), the projects' own topics (their
plug-ins: ``maze/state``) and the older clients' plain-text topics (with
``--legacy_topics``). No topic is two of these. Each takes the message's ``Ack``: a turn
holds it until its reply is out (agent.mqtt.acks).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from agent.core.conversation import Conversation
from agent.mqtt.acks import NO_ACK, Ack
from agent.mqtt.chat import ChatDoor
from agent.mqtt.control import Control
from agent.mqtt.legacy import LegacyTopics
from agent.mqtt.outbox import Outbox, Publish
from agent.mqtt.plugin_host import PluginHost
from agent.mqtt.topics import Topics
from projects import ProjectSpec
from projects.plugins import Plugin

if TYPE_CHECKING:
    from agent.service.config import AgentConfig

log = logging.getLogger(__name__)


class MqttDoor:
    def __init__(self, config: AgentConfig, core: Conversation, projects: dict[str, ProjectSpec],
                 topics: Topics, publish: Publish) -> None:
        self.core = core
        self.topics = topics
        self.outbox = Outbox(topics, publish)
        self.chat = ChatDoor(core, topics, self.outbox, config.max_payload_bytes,
                             redelivery=config.mqtt_protocol != "5" or config.session_expiry > 0)
        self._room_wait = config.mqtt_keepalive / 2  # the broker's patience with a silent client
        self.plugins: dict[str, Plugin] = {}
        self._own_topics: dict[str, tuple[Plugin, str]] = {}  # topic -> (plug-in, its name)
        for project in config.projects:
            module = projects[project].plugin
            if module is None:
                continue
            host = PluginHost(project, self.chat, topics, self.outbox, core.metrics,
                              config.max_payload_bytes, config.max_concurrent_sessions,
                              config.session_timeout, config.state_rate_limit)
            plugin = self.plugins[project] = module.make(host)
            for name in module.requests:
                self._own_topics[topics.base(project) + name] = (plugin, name)
        self.control = Control(core.sessions, topics, config.max_payload_bytes, self.plugins,
                               core.template_problem, self.outbox.publish)
        self.legacy = LegacyTopics(config, self.chat, core.sessions, core.metrics, self.outbox,
                                   topics) if config.legacy_topics else None

    def on_message(self, topic: str, payload: bytes, properties: Any = None,
                   ack: Ack = NO_ACK) -> None:
        """``properties``: MQTT v5 ones (a chat request's Response Topic, Correlation Data);
        ``ack``: held by the turn a request becomes, else sent as this returns."""
        if self.topics.project_of(topic) is not None:
            self._wait_for_room(ack)
            self.chat.handle_message(topic, payload, properties, ack)
            return
        if self.control.handle(topic, payload, ack):
            return
        self._wait_for_room(ack)  # every other topic may become a turn
        own = self._own_topics.get(topic)
        if own is not None:
            plugin, name = own
            plugin.handle(name, payload, ack)
            return
        if self.legacy is None or not self.legacy.handle(topic, payload, ack):
            self.chat.handle_message(topic, payload, properties, ack)  # logs the stray topic

    def _wait_for_room(self, ack: Ack) -> None:
        """With the core's queue full, a QoS 1 request waits here (up to half the keep-alive)
        before it is read, blocking the MQTT thread, so that the broker keeps the rest of a
        backlog instead of the agent answering it "overloaded". The Receive Maximum
        (``--max_queue``) should spare that, but Mosquitto 2.0 hands a resumed session's
        queued requests over all at once (docs/RELIABILITY.md). A QoS 0 request does not
        wait: the broker would not keep it."""
        if ack is not NO_ACK and not self.core.lanes.wait_for_room(self._room_wait):
            log.warning("queue still full after %g s: the request gets the overload reply",
                        self._room_wait)
