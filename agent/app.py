"""The agent: wires topics, the MQTT connection, the router and the engine together."""

from __future__ import annotations

import logging
import signal
import threading
from types import FrameType

from agent.config import AgentConfig
from agent.mqtt_client import MqttClient, MqttConnectError
from agent.router import Router
from agent.sessions import SessionStore
from agent.topics import Topics
from engine.api import EngineProtocol
from projects import ProjectSpec, load_project

log = logging.getLogger(__name__)

__all__ = ["Agent", "MqttConnectError"]


class Agent:
    """Serves part A of PROTOCOL.md for ``config.projects`` with one engine.

    ``start()`` starts the engine, then connects; ``stop()`` answers every
    pending request, disconnects and shuts the engine down.
    """

    def __init__(
        self,
        config: AgentConfig,
        engine: EngineProtocol,
        projects: dict[str, ProjectSpec] | None = None,
        store: SessionStore | None = None,
    ) -> None:
        self.config = config
        self.engine = engine
        given = projects or {}
        self.projects = {name: given.get(name) or load_project(name) for name in config.projects}
        self.topics = Topics(config.projects, config.topic_prefix)
        self.mqtt = MqttClient(config, self.topics.subscriptions(), self._on_message)
        self.router = Router(config, engine, self.projects, self.topics, self.mqtt.publish, store)
        self._stop_requested = threading.Event()
        self._lock = threading.Lock()
        self._started = False
        self._stopped = False

    @property
    def ready(self) -> bool:
        """Connected to the broker and subscribed."""
        return self.mqtt.ready

    def _on_message(self, topic: str, payload: bytes) -> None:
        self.router.handle_message(topic, payload)

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
            log.info("starting agent for projects %s", ", ".join(self.config.projects))
            self.engine.start()
            self.router.start()
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
        self.router.stop()
        self.mqtt.stop()
        self.engine.shutdown()
        log.info("agent stopped")

    def request_stop(self) -> None:
        """Makes ``run_forever`` return; safe from signal handlers and other threads."""
        self._stop_requested.set()

    def run_forever(self) -> None:
        """Serves until SIGINT/SIGTERM (in the main thread) or ``request_stop()``, then stops.

        Raises MqttConnectError only if the broker refuses the agent (credentials, ACL).
        """
        previous: dict[int, object] = {}
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                previous[sig] = signal.signal(sig, self._on_signal)
        try:
            if not self._started:
                self.start(wait=False)
                self._wait_for_broker()
            while not self._stop_requested.wait(1.0):
                pass
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)  # type: ignore[arg-type]
            self.stop()

    def _wait_for_broker(self) -> None:
        """A broker that refuses us is fatal; one that is down is retried in the background."""
        timeout = self.config.connect_timeout
        ready = self.mqtt.wait_ready(timeout, cancel=self._stop_requested)
        if not ready and not self._stop_requested.is_set():
            log.warning("MQTT broker %s not reachable within %g s; still trying in the background",
                        self.mqtt.where, timeout)

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        log.info("signal %s received: stopping", signal.Signals(signum).name)
        self.request_stop()

    def __enter__(self) -> Agent:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
