"""The agent: wires topics, the MQTT connection, the router and the engine together."""

from __future__ import annotations

import logging
import threading

from agent.acks import NO_ACK, Ack
from agent.config import AgentConfig
from agent.control import Control
from agent.legacy import LegacyTopics, legacy_projects
from agent.maze_state import MazeHints
from agent.metrics import summary
from agent.mqtt_client import MqttClient, MqttConnectError
from agent.prometheus import AgentCollector, PrometheusEndpoint
from agent.router import Router
from agent.service import ServiceNotifier, status_text
from agent.session_store_redis import open_store
from agent.sessions import SessionStore
from agent.share_group import shared_subscriptions
from agent.shutdown import ShutdownSignals, drain
from agent.status import AgentInfo, StatusReporter, check_service_topics, default_agent_id
from agent.topics import MAZE, Topics
from engine.api import EngineProtocol
from projects import ProjectSpec, load_project

log = logging.getLogger(__name__)

__all__ = ["Agent", "MqttConnectError", "served_projects"]


def served_projects(config: AgentConfig) -> list[str]:
    """Every project the agent answers for: ``--projects``, then the legacy topics' ones."""
    names = list(config.projects)
    if config.legacy_topics:
        names += [p for p in legacy_projects(config).values() if p not in names]
    return names


class Agent:
    """Serves PROTOCOL.md parts A, B and C for ``config.projects`` with one engine.

    ``start()`` starts the engine, then connects; ``stop()`` answers every
    pending request, disconnects and shuts the engine down; ``stop_gracefully()``
    lets the pending ones finish first. ``service`` tells systemd (agent.service).
    """

    def __init__(
        self,
        config: AgentConfig,
        engine: EngineProtocol,
        projects: dict[str, ProjectSpec] | None = None,
        store: SessionStore | None = None,
        info: AgentInfo | None = None,
        service: ServiceNotifier | None = None,
    ) -> None:
        self.config = config
        self.engine = engine
        self.service = service or ServiceNotifier()
        given = projects or {}
        self.projects = {name: given.get(name) or load_project(name)
                         for name in served_projects(config)}
        self.topics = Topics(config.projects, config.topic_prefix)
        subscriptions = self.topics.all_subscriptions(legacy=config.legacy_topics)
        self.mqtt = MqttClient(config, shared_subscriptions(subscriptions, self.topics,
                                                            config.share_group), self._on_message)
        self.router = Router(config, engine, self.projects, self.topics, self.mqtt.publish,
                             store if store is not None else open_store(config))
        self._init_status(info or AgentInfo(), [t for t, _ in subscriptions])
        self.maze = MazeHints(config, self.router, self.topics) if MAZE in config.projects else None
        # Tried in order before the chat topics; each takes the topics that are its own.
        self._handlers = [Control(config, self.router, self.topics, self.maze).handle]
        if self.maze is not None:
            self._handlers.append(self.maze.handle)
        if config.legacy_topics:
            self._handlers.append(LegacyTopics(config, self.router, self.topics).handle)
        self._stop_requested = threading.Event()
        self._lock = threading.Lock()
        self._started = False
        self._stopped = False

    @property
    def ready(self) -> bool:
        """Connected to the broker and subscribed."""
        return self.mqtt.ready

    def _on_message(self, topic: str, payload: bytes, properties: object = None,
                    ack: Ack = NO_ACK) -> None:
        """``properties``: MQTT v5 ones (a chat request's Response Topic, Correlation Data);
        ``ack``: held by the turn a request becomes, else sent as this returns (agent.acks)."""
        for handle in self._handlers:
            if handle(topic, payload, ack):
                return
        self.router.handle_message(topic, payload, properties, ack)

    def _init_status(self, info: AgentInfo, subscriptions: list[str]) -> None:
        """The status and metrics topics (and the Last Will); the Prometheus endpoint if asked."""
        config = self.config
        self.agent_id = config.agent_id or default_agent_id()
        check_service_topics(self.topics, config.status_prefix, self.agent_id, subscriptions)
        self.status = StatusReporter(
            self.agent_id, config.status_prefix, info, self.projects,
            lambda topic, payload, retain: self.mqtt.publish(topic, payload, retain=retain),
            lambda: self.mqtt.ready, self.metrics_summary, config.stats_interval,
        )
        self.mqtt.set_will(*self.status.will())
        self.mqtt.on_ready = self._on_subscribed
        labels = {"agent_id": self.agent_id, "model": info.model or "",
                  "quantization": info.quantization or "", "version": self.status.version}
        self.prometheus = None if config.metrics_port is None else PrometheusEndpoint(
            config.metrics_port, AgentCollector(self.router.metrics, self.metrics_summary, labels))

    def _on_subscribed(self) -> None:
        """Each (re)connect, once subscribed (paho's thread): online status, then READY=1."""
        self.status.online()
        self.service.subscribed()

    def metrics_summary(self) -> dict:
        """What the metrics topic carries (agent.metrics.summary)."""
        try:
            engine = self.engine.stats()
        except Exception:  # counters must never cost the agent
            log.exception("reading the engine's counters failed")
            engine = {}
        router = self.router.stats()
        return summary(self.router.metrics, router["pending"], engine, router["output_rules"])

    def stats(self) -> dict:
        """The engine's counters, the router's (pending turns, output-rule repairs), and the
        metrics topic's summary."""
        return {"engine": self.engine.stats(), "agent": self.router.stats(),
                "metrics": self.metrics_summary()}

    def start(self, wait: bool = True, timeout: float | None = None) -> None:
        """With ``wait`` (default) returns once subscribed, or raises MqttConnectError after
        ``timeout`` (default ``config.connect_timeout``); without, keeps retrying in the background.
        """
        with self._lock:
            if self._stopped:
                raise RuntimeError("this agent was stopped; build a new one")
            first = not self._started
            self._started = True
        if first:
            log.info("starting agent %s for projects %s", self.agent_id,
                     ", ".join(self.config.projects))
            if self.prometheus is not None:
                try:
                    self.prometheus.start()
                except ValueError:
                    self.stop()
                    raise
            self.engine.start()
            self.service.watch(self.engine, lambda: status_text(self.projects, self.metrics_summary()))
            self.service.start()
            self.router.start()
            self.status.start()
        try:
            self.mqtt.start(wait=wait, timeout=timeout)
        except MqttConnectError:
            self.stop()
            raise

    def stop(self) -> None:
        """Idempotent; safe from any thread but paho's."""
        with self._lock:
            if self._stopped or not self._started:
                self._stopped = True
                return
            self._stopped = True
        log.info("stopping agent")
        self._stop_requested.set()
        self.service.stopping()
        self.status.stop()
        self.router.stop()
        if self.mqtt.ready:  # else the Will says offline (or we never were online)
            self.status.offline()
        self.mqtt.stop()
        if self.prometheus is not None:
            self.prometheus.stop()
        self.engine.shutdown()
        self.service.stop()
        log.info("agent stopped")

    def stop_gracefully(self, timeout: float | None = None) -> None:
        """New requests get the shutting-down error; the accepted ones may finish within
        ``timeout`` (default ``config.shutdown_timeout``) s; then ``stop()`` answers the rest."""
        if self._started and not self._stopped:
            self.router.refuse_new()  # before STOPPING=1: a request sent after it is refused
            self.service.stopping()
            drain(lambda: self.router.lanes.pending,
                  self.config.shutdown_timeout if timeout is None else timeout)
        self.stop()

    def request_stop(self) -> None:
        """Makes ``run_forever`` return; safe from signal handlers and other threads."""
        self._stop_requested.set()

    def run_forever(self) -> None:
        """Serves until SIGINT/SIGTERM (in the main thread) or ``request_stop()``, then stops
        gracefully (agent.shutdown: a second signal exits at once).

        Raises MqttConnectError only if the broker refuses the agent (credentials, ACL).
        """
        with ShutdownSignals(self.request_stop).installed():
            try:
                if not self._started:
                    self.start(wait=False)
                    self._wait_for_broker()
                while not self._stop_requested.wait(1.0):
                    pass
            except BaseException:
                self.stop()
                raise
            self.stop_gracefully()

    def _wait_for_broker(self) -> None:
        """A broker that refuses us is fatal; one that is down is retried in the background."""
        timeout = self.config.connect_timeout
        ready = self.mqtt.wait_ready(timeout, cancel=self._stop_requested)
        if not ready and not self._stop_requested.is_set():
            log.warning("MQTT broker %s not reachable within %g s; still trying in the background",
                        self.mqtt.where, timeout)

    def __enter__(self) -> Agent:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
