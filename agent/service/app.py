"""The agent: wires the core, the MQTT door and its connection, and the engine together."""

from __future__ import annotations

import logging
import threading
from typing import TYPE_CHECKING

from agent.core.conversation import build_conversation
from agent.core.metrics import summary
from agent.core.sessions import SessionStore
from agent.http.auth import ApiKeys
from agent.http.requests import ModelIds
from agent.mqtt.acks import NO_ACK, Ack
from agent.mqtt.client import MqttClient, MqttConnectError
from agent.mqtt.door import MqttDoor
from agent.mqtt.legacy import legacy_projects
from agent.mqtt.rival import RivalCheck
from agent.mqtt.share_group import shared_subscriptions
from agent.mqtt.status import (
    AgentInfo,
    StatusReporter,
    check_service_topics,
    default_agent_id,
    utc_iso,
)
from agent.mqtt.topics import Topics
from agent.service.checks import check_agent_config
from agent.service.config import AgentConfig
from agent.service.mosquitto_acl import log_control_access
from agent.service.notifier import ServiceNotifier, status_text
from agent.service.prometheus import AgentCollector, PrometheusEndpoint, exposition
from agent.service.session_store import open_store
from agent.service.shutdown import ShutdownSignals, drain
from engine.api import EngineProtocol
from projects import ProjectSpec, load_project

if TYPE_CHECKING:
    from agent.http.server import HttpServer

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
    lets the pending ones finish first. ``service`` tells systemd (agent.service.notifier).
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
        check_agent_config(config)
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
        self.core = build_conversation(config.core_settings(), engine, self.projects,
                                       store if store is not None else open_store(config))
        self.door = MqttDoor(config, self.core, self.projects, self.topics, self.mqtt.publish)
        info = info or AgentInfo()
        self._init_status(info, [t for t, _ in subscriptions])
        self.http = self._http_server(info) if config.http_port is not None else None
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
        """paho's thread: to the door (``self.door`` is set once the client exists)."""
        self.door.on_message(topic, payload, properties, ack)

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
        self.mqtt.rival_check = RivalCheck(config, self.status.status_topic,
                                           utc_iso(self.status.started_at), self.status.instance)
        labels = {"agent_id": self.agent_id, "model": info.model or "",
                  "quantization": info.quantization or "", "version": self.status.version}
        self._collector = AgentCollector(self.core.metrics, self.metrics_summary, labels)
        self.prometheus = None if config.metrics_port is None else PrometheusEndpoint(
            config.metrics_port, self._collector)

    def _http_server(self, info: AgentInfo) -> HttpServer:
        """The OpenAI-compatible door, on the same core (agent/http/)."""
        from agent.http.app import build_app  # FastAPI and uvicorn only where asked for
        from agent.http.door import HttpDoor
        from agent.http.server import HttpServer

        config = self.config
        served = config.served_model_name or served_name(info.model)
        door = HttpDoor(self.core, ModelIds(served, tuple(config.projects)),
                        ApiKeys(config.api_key))
        app = build_app(door, max_body_bytes=config.max_payload_bytes, healthy=self.healthy,
                        metrics=exposition(self._collector), cors_origins=config.http_cors_origins)
        return HttpServer(app, config.http_host, config.http_port or 0,
                          config.http_ssl_certfile, config.http_ssl_keyfile)

    def healthy(self) -> bool:
        """Started (the model is loaded), not stopped, and the engine loop progresses."""
        return self._started and not self._stopped and self.service.engine_alive()

    def _on_subscribed(self) -> None:
        """Each (re)connect, once subscribed (paho's thread): online status, then READY=1."""
        self.status.online()
        self.service.subscribed()

    def metrics_summary(self) -> dict:
        """What the metrics topic carries (agent.core.metrics.summary)."""
        try:
            engine = self.engine.stats()
        except Exception:  # counters must never cost the agent
            log.exception("reading the engine's counters failed")
            engine = {}
        core = self.core.stats()
        return summary(self.core.metrics, core["pending"], engine, core["output_rules"])

    def stats(self) -> dict:
        """The engine's counters, the core's (pending turns, output-rule repairs), and the
        metrics topic's summary."""
        return {"engine": self.engine.stats(), "agent": self.core.stats(),
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
            log_control_access(self.config)
            self._start_or_stop(self.prometheus)
            self.engine.start()
            self.service.watch(self.engine, lambda: status_text(self.projects, self.metrics_summary()))
            # WATCHDOG=1 also needs paho's thread alive and coming round (not while reconnecting)
            self.service.watch_loop("MQTT network loop", self.mqtt.loop_age)
            self.service.start()
            self.core.start()
            self._start_or_stop(self.http)
            self.status.start()
        try:
            self.mqtt.start(wait=wait, timeout=timeout)
        except MqttConnectError:
            self.stop()
            raise

    def _start_or_stop(self, server: PrometheusEndpoint | HttpServer | None) -> None:
        """Starts a listening server of the agent; one that cannot listen stops the agent."""
        if server is None:
            return
        try:
            server.start()
        except ValueError:
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
        self.core.stop()
        if self.http is not None:
            self.http.stop()
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
            self.core.refuse_new()  # before STOPPING=1: a request sent after it is refused
            self.service.stopping()
            drain(lambda: self.core.lanes.pending,
                  self.config.shutdown_timeout if timeout is None else timeout)
        self.stop()

    def request_stop(self) -> None:
        """Makes ``run_forever`` return; safe from signal handlers and other threads."""
        self._stop_requested.set()

    def run_forever(self) -> None:
        """Serves until SIGINT/SIGTERM (in the main thread) or ``request_stop()``, then stops
        gracefully (agent.service.shutdown: a second signal exits at once).

        Raises MqttConnectError only if the broker refuses the agent (credentials, ACL).
        """
        with ShutdownSignals(self.request_stop).installed():
            try:
                if not self._started:
                    self.start(wait=False)
                    self._wait_for_broker()
                while not self._stop_requested.wait(1.0):
                    if self.mqtt.gave_up:  # a second agent with our id: agent.mqtt.rival
                        raise MqttConnectError(f"MQTT broker {self.mqtt.where}: "
                                               f"{self.mqtt.gave_up}")
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


def served_name(model: str | None) -> str:
    """The model's id in the HTTP API: the last part of its folder or hub id."""
    name = (model or "").rstrip("/").rsplit("/", 1)[-1]
    return name or "model"
