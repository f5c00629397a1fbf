"""The optional Prometheus endpoint (``--metrics_port``), with prometheus-client.

A custom collector reads the agent's counters at every scrape, so the
numbers are the ones the metrics topic carries, counted once.
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from agent.core.metrics import OUTCOMES, RequestMetrics

log = logging.getLogger(__name__)

PIP_HINT = "--metrics_port needs the prometheus-client package: pip install prometheus-client"
NS = "vllm_deploy"


def require_prometheus() -> None:
    """ValueError with the pip command when prometheus-client is not installed."""
    try:
        import prometheus_client  # noqa: F401
    except ImportError:
        raise ValueError(PIP_HINT) from None


class AgentCollector:
    """Every agent metric, from ``metrics`` and the summary that ``snapshot()`` returns."""

    def __init__(self, metrics: RequestMetrics, snapshot: Callable[[], dict[str, Any]],
                 info: Mapping[str, str]) -> None:
        self._metrics, self._snapshot, self._info = metrics, snapshot, dict(info)

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import (
            CounterMetricFamily,
            GaugeMetricFamily,
            HistogramMetricFamily,
        )

        def gauge(name: str, doc: str, value: float | None) -> GaugeMetricFamily | None:
            return None if value is None else GaugeMetricFamily(f"{NS}_{name}", doc, value=value)

        info = GaugeMetricFamily(f"{NS}_info", "agent, model and version", labels=list(self._info))
        info.add_metric(list(self._info.values()), 1)
        yield info
        def by_outcome(name: str, doc: str, label: str,
                       table: dict[str, dict[str, int]]) -> CounterMetricFamily:
            family = CounterMetricFamily(f"{NS}_{name}", doc, labels=[label, "outcome"])
            for key, counts in sorted(table.items()):
                for outcome in OUTCOMES:
                    family.add_metric([key, outcome], counts[outcome])
            return family

        yield by_outcome("requests", "requests by project and outcome (ok, error, bad_request, "
                         "rate_limited, overloaded, shutting_down)", "project",
                         self._metrics.counts())
        yield by_outcome("door_requests", "requests by front door (mqtt, http) and outcome; a "
                         "door's own refusals (bad field, key, size) count as bad_request", "door",
                         self._metrics.by_door())
        buckets, total = self._metrics.histogram()
        yield HistogramMetricFamily(
            f"{NS}_latency_seconds", "admission to reply published, answered requests",
            buckets=[("+Inf" if math.isinf(b) else repr(b), n) for b, n in buckets],
            sum_value=total)
        s = self._snapshot()
        lat, kv = s["latencyMs"], s["kvBlocks"]
        for family in (
            gauge("latency_p95_seconds", "p95 latency over the recent window",
                  None if lat["p95"] is None else lat["p95"] / 1000),
            gauge("queue_size", "admitted requests not yet answered", s["queueSize"]),
            gauge("tokens_per_second", "tokens generated per second (engine, recent)",
                  s["tokensPerS"]),
            gauge("kv_blocks_total", "KV-cache blocks", kv["total"]),
            gauge("kv_blocks_free", "KV-cache blocks free", None if kv["used"] is None
                  else kv["total"] - kv["used"]),
            gauge("uptime_seconds", "seconds since the agent was built", s["uptimeS"]),
        ):
            if family is not None:
                yield family
        used = GaugeMetricFamily(f"{NS}_kv_blocks_used", "KV-cache blocks in use by project",
                                 labels=["project"])
        for project, n in sorted(kv["byProject"].items()):
            used.add_metric([project], n)
        yield used
        rules = CounterMetricFamily(f"{NS}_output_rules", "replies regenerated or repaired by "
                                    "their project's output rules", labels=["project", "event"])
        for project, counts in sorted(s["outputRules"].items()):
            for event, n in sorted(counts.items()):
                rules.add_metric([project, event], n)
        yield rules


def exposition(collector: AgentCollector) -> Callable[[], tuple[bytes, str]] | None:
    """What GET /metrics of the HTTP API serves (body, content type); None without
    prometheus-client."""
    try:
        from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
    except ImportError:
        return None
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)  # type: ignore[arg-type]
    return lambda: (generate_latest(registry), CONTENT_TYPE_LATEST)


class PrometheusEndpoint:
    """An HTTP server on ``port`` (0: any free one) serving ``/metrics``."""

    def __init__(self, port: int, collector: AgentCollector, addr: str = "0.0.0.0") -> None:
        self._want, self._addr, self._collector = port, addr, collector
        self._server: Any = None

    @property
    def port(self) -> int | None:
        return None if self._server is None else self._server.server_port

    def start(self) -> None:
        require_prometheus()
        from wsgiref.simple_server import WSGIRequestHandler, make_server

        from prometheus_client import CollectorRegistry, make_wsgi_app
        from prometheus_client.exposition import ThreadingWSGIServer

        registry = CollectorRegistry(auto_describe=False)
        registry.register(self._collector)  # type: ignore[arg-type]
        metrics = make_wsgi_app(registry)

        def only_metrics(environ: dict, start_response: Callable) -> Any:
            if environ.get("PATH_INFO") == "/metrics":
                return metrics(environ, start_response)
            start_response("404 Not Found", [("Content-Type", "text/plain; charset=utf-8")])
            return [b"not found: this port serves /metrics only\n"]

        class Quiet(WSGIRequestHandler):
            def log_message(self, *args: Any) -> None:  # no line per scrape on stderr
                pass

        try:
            self._server = make_server(self._addr, self._want, only_metrics, ThreadingWSGIServer,
                                       handler_class=Quiet)
        except OSError as exc:
            raise ValueError(f"--metrics_port {self._want}: cannot listen: {exc.strerror or exc}") \
                from None
        threading.Thread(target=self._server.serve_forever, name="agent-prometheus",
                         daemon=True).start()
        log.info("Prometheus metrics on http://%s:%d/metrics", self._addr, self.port)

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
