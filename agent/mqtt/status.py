"""Part C's status and metrics topics: ``<status_prefix>/<agentId>/status`` and ``.../metrics``.

The status is retained JSON: ``online`` on every (re)connect once subscribed,
``offline`` as the Last Will (an unclean end) and explicitly on a clean stop.
The metrics JSON (``agent.core.metrics.summary``) goes out every ``stats_interval``
seconds, with the same summary as one INFO log line.
"""

from __future__ import annotations

import json
import logging
import re
import secrets
import socket
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from agent import __version__
from agent.core.metrics import log_line
from agent.mqtt.topics import WILDCARDS, Topics, filters_overlap

log = logging.getLogger(__name__)

ONLINE, OFFLINE = "online", "offline"
STATUS, METRICS = "status", "metrics"
_NOT_IN_LEVEL = re.compile(r"[^A-Za-z0-9_.-]+")
MAX_AGENT_ID_CHARS = 128


@dataclass(frozen=True)
class AgentInfo:
    """What the status topic says about the model (the launcher knows it, the Agent does not)."""

    model: str | None = None
    quantization: str | None = None


def default_agent_id() -> str:
    """The host name, made one safe topic level: other characters become '-'."""
    name = _NOT_IN_LEVEL.sub("-", socket.gethostname()).strip("-.")
    return name[:MAX_AGENT_ID_CHARS] or "agent"


def agent_id_problem(agent_id: str) -> str | None:
    if not agent_id or len(agent_id) > MAX_AGENT_ID_CHARS:
        return f"agent_id must have 1 to {MAX_AGENT_ID_CHARS} characters"
    if any(c in agent_id for c in (*WILDCARDS, "/")):
        return f"agent_id must be one topic level, without '/', '+', '#' or NUL: {agent_id!r}"
    return None


def status_prefix_problem(prefix: str) -> str | None:
    if not prefix.strip("/"):
        return "status_prefix must not be empty"
    if any(c in prefix for c in WILDCARDS) or prefix.startswith("$"):
        return f"status_prefix must not contain '+', '#', NUL or start with '$': {prefix!r}"
    return None


def service_topics(status_prefix: str, agent_id: str) -> tuple[str, str]:
    """The status and metrics topics of one agent."""
    root = f"{status_prefix.strip('/')}/{agent_id}/"
    return root + STATUS, root + METRICS


def check_service_topics(topics: Topics, status_prefix: str, agent_id: str,
                         subscriptions: Iterable[str]) -> None:
    """ValueError unless the agent may publish its status and metrics and none of its
    subscriptions catches them or another agent's (PROTOCOL.md, Guarantees)."""
    problem = agent_id_problem(agent_id) or status_prefix_problem(status_prefix)
    for topic in service_topics(status_prefix, agent_id):
        problem = problem or topics.service_problem(topic)
    if problem is None:
        any_agent = service_topics(status_prefix, "+")
        caught = [s for s in subscriptions if any(filters_overlap(s, t) for t in any_agent)]
        if caught:
            problem = f"the agent's subscription {caught[0]!r} would catch status topics"
    if problem:
        raise ValueError(f"status topics under {status_prefix!r} for agent {agent_id!r}: "
                         f"{problem}; choose another --status_prefix or --agent_id")


def utc_iso(epoch: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(epoch))


Publish = Callable[[str, str, bool], None]  # topic, payload, retain


class StatusReporter:
    """Publishes the status (``online``/``offline``) and, with ``stats_interval`` > 0, the
    metrics from ``snapshot()`` every interval, while ``connected()``; logs them either way."""

    def __init__(
        self, agent_id: str, status_prefix: str, info: AgentInfo, projects: Iterable[str],
        publish: Publish, connected: Callable[[], bool], snapshot: Callable[[], dict[str, Any]],
        stats_interval: float,
    ) -> None:
        self.agent_id, self.version = agent_id, __version__
        self.status_topic, self.metrics_topic = service_topics(status_prefix, agent_id)
        self._info, self._projects = info, list(projects)
        self._publish, self._connected, self._snapshot = publish, connected, snapshot
        self._interval = stats_interval
        self.started_at = time.time()
        self.instance = secrets.token_hex(4)  # this process: tells two agents of one id apart
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._closed = False  # offline sent: a late reconnect must not say online again

    def status(self, state: str) -> str:
        return json.dumps({
            "state": state, "agentId": self.agent_id, "model": self._info.model,
            "quantization": self._info.quantization, "projects": self._projects,
            "startedAt": utc_iso(self.started_at), "instance": self.instance,
            "version": self.version,
        })

    def will(self) -> tuple[str, str]:
        """The Last Will: the retained offline status."""
        return self.status_topic, self.status(OFFLINE)

    def online(self) -> None:
        """On every (re)connect, once subscribed (MQTT network thread: must not block)."""
        if not self._closed:
            self._send_status(ONLINE)

    def offline(self) -> None:
        """On a clean stop, before disconnecting (the broker drops the Will then)."""
        self._closed = True
        self._send_status(OFFLINE)

    def _send_status(self, state: str) -> None:
        try:
            self._publish(self.status_topic, self.status(state), True)
            log.info("status %s published on %s", state, self.status_topic)
        except Exception:
            log.exception("publishing the %s status failed", state)

    def start(self) -> None:
        if self._interval > 0 and self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="agent-stats", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(5.0)

    def _loop(self) -> None:
        while not self._stop.wait(self._interval):
            self.report()

    def report(self) -> dict[str, Any] | None:
        """One metrics message and log line; None if the snapshot failed (logged)."""
        try:
            summary = self._snapshot()
            log.info("%s", log_line(summary))
            if not self._connected():  # not queued: stale metrics are no use after an outage
                return summary
            payload = {"agentId": self.agent_id, "time": utc_iso(time.time()), **summary}
            self._publish(self.metrics_topic, json.dumps(payload, allow_nan=False), False)
            return summary
        except Exception:
            log.exception("reporting the metrics failed")
            return None
