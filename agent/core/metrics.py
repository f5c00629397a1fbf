"""The agent's request counters and a bounded window of recent latencies (thread-safe).

The core feeds them at its three outcomes: a request is *rejected* (never
admitted: bad request, rate-limited, overloaded, shutting down), or, once
admitted, answered as *processed* (a reply) or as an *error* (engine error,
prompt too long, timeout, shutdown). Latency is measured from admission to
the reply's publish. ``summary`` joins these with the engine's and the output
rules' counters into the metrics topic's JSON and the periodic log line.
"""

from __future__ import annotations

import bisect
import math
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from typing import Any

OK, ERROR = "ok", "error"
BAD_REQUEST, RATE_LIMITED, OVERLOADED, SHUTTING_DOWN = (
    "bad_request", "rate_limited", "overloaded", "shutting_down")
REJECTIONS = (BAD_REQUEST, RATE_LIMITED, OVERLOADED, SHUTTING_DOWN)
OUTCOMES = (OK, ERROR, *REJECTIONS)
LATENCY_WINDOW_S = 300.0  # average and p95 over the replies of the last five minutes ...
LATENCY_SAMPLES = 4096  # ... at most this many
# Upper bounds (s) of the cumulative latency histogram (Prometheus); clients give up at 45-120 s.
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 45.0, 120.0, math.inf)


def percentile(values: list[float], q: float) -> float:
    """The ``q`` quantile (0..1) of ``values`` by the nearest-rank method; 0 for none."""
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


class RequestMetrics:
    def __init__(
        self, clock: Callable[[], float] = time.monotonic, window_s: float = LATENCY_WINDOW_S,
        max_samples: int = LATENCY_SAMPLES,
    ) -> None:
        self._clock = clock
        self.window_s = window_s
        self._lock = threading.Lock()
        self._counts: dict[str, dict[str, int]] = {}  # project -> outcome -> count
        self._doors: dict[str, dict[str, int]] = {}  # front door -> outcome -> count
        self._recent: deque[tuple[float, float]] = deque(maxlen=max_samples)  # (at, latency)
        self._buckets = [0] * len(LATENCY_BUCKETS)  # not cumulative; summed in histogram()
        self._latency_sum = 0.0
        self.started = clock()

    def rejected(self, project: str | None, reason: str, *, door: str) -> None:
        """A request refused before a turn started; ``project`` None: it named none known
        (counted for its front door only)."""
        assert reason in REJECTIONS, reason
        with self._lock:
            self._count_locked(project, reason, door)

    def answered(self, project: str, ok: bool, latency: float, *, door: str) -> None:
        """An admitted request got its one reply (``ok``) or error, ``latency`` s after admission."""
        latency = max(0.0, latency)
        with self._lock:
            self._recent.append((self._clock(), latency))
            self._buckets[bisect.bisect_left(LATENCY_BUCKETS, latency)] += 1
            self._latency_sum += latency
            self._count_locked(project, OK if ok else ERROR, door)

    def _count_locked(self, project: str | None, outcome: str, door: str) -> None:
        for table, key in ((self._counts, project), (self._doors, door)):
            if key is None:
                continue
            counts = table.get(key)
            if counts is None:
                counts = table[key] = dict.fromkeys(OUTCOMES, 0)
            counts[outcome] += 1

    def counts(self) -> dict[str, dict[str, int]]:
        """project -> outcome -> count, since start."""
        with self._lock:
            return {p: dict(c) for p, c in self._counts.items()}

    def by_door(self) -> dict[str, dict[str, int]]:
        """front door (mqtt, http) -> outcome -> count, since start."""
        with self._lock:
            return {d: dict(c) for d, c in self._doors.items()}

    def latencies(self) -> list[float]:
        """Latencies (s) of the replies of the recent window."""
        horizon = self._clock() - self.window_s
        with self._lock:
            return [lat for at, lat in self._recent if at >= horizon]

    def histogram(self) -> tuple[list[tuple[float, int]], float]:
        """Cumulative ``(upper bound, count)`` pairs since start, and the sum of latencies."""
        with self._lock:
            buckets, total = list(self._buckets), self._latency_sum
        running, out = 0, []
        for bound, n in zip(LATENCY_BUCKETS, buckets, strict=True):
            running += n
            out.append((bound, running))
        return out, total

    def uptime(self) -> float:
        return self._clock() - self.started


def summary(
    metrics: RequestMetrics, queue_size: int, engine: Mapping[str, Any],
    output_rules: Mapping[str, Mapping[str, int]],
) -> dict[str, Any]:
    """The metrics topic's JSON object (without agentId and time, which the caller adds)."""
    counts = metrics.counts()
    latencies = metrics.latencies()
    by_reason = {r: sum(c[r] for c in counts.values()) for r in REJECTIONS}
    kv_total, kv_free = engine.get("kv_blocks_total"), engine.get("kv_blocks_free")
    return {
        "uptimeS": round(metrics.uptime(), 3),
        "processed": sum(c[OK] for c in counts.values()),
        "errors": sum(c[ERROR] for c in counts.values()),
        "rejected": sum(by_reason.values()),
        "rejectedBy": by_reason,
        "queueSize": queue_size,
        "latencyMs": {
            "avg": round(1000 * sum(latencies) / len(latencies), 1) if latencies else None,
            "p95": round(1000 * percentile(latencies, 0.95), 1) if latencies else None,
            "count": len(latencies),
            "windowS": metrics.window_s,
        },
        "tokensPerS": round(float(engine.get("tokens_per_s", 0.0)), 2),
        "engine": {k: engine[k] for k in ("running", "waiting", "preemptions") if k in engine},
        "kvBlocks": {
            "total": kv_total,
            "used": kv_total - kv_free if kv_total is not None and kv_free is not None else None,
            "byProject": dict(engine.get("kv_blocks_by_project") or {}),
        },
        "byProject": {p: {"processed": c[OK], "errors": c[ERROR],
                          "rejected": sum(c[r] for r in REJECTIONS)} for p, c in counts.items()},
        "byDoor": {d: {"processed": c[OK], "errors": c[ERROR],
                       "rejected": sum(c[r] for r in REJECTIONS)}
                   for d, c in metrics.by_door().items()},
        "outputRules": {p: dict(c) for p, c in output_rules.items()},
    }


def log_line(s: Mapping[str, Any]) -> str:
    """``summary`` as one line for the periodic INFO log: numbers only, no prompts or replies."""
    lat, kv = s["latencyMs"], s["kvBlocks"]
    rejected = " ".join(f"{k}={v}" for k, v in s["rejectedBy"].items() if v)
    per_project = " ".join(f"{p}={n}" for p, n in sorted(kv["byProject"].items()))
    rules = " ".join(f"{p}:{c.get('regenerated', 0)}/{c.get('repaired', 0)}"
                     for p, c in sorted(s["outputRules"].items()))
    return (
        f"stats: processed={s['processed']} errors={s['errors']} rejected={s['rejected']}"
        + (f" ({rejected})" if rejected else "")
        + f" queue={s['queueSize']} latency avg={_ms(lat['avg'])} p95={_ms(lat['p95'])}"
        f" (n={lat['count']}) tokens/s={s['tokensPerS']:g}"
        + (f" kv_used={kv['used']}/{kv['total']}" if kv["total"] is not None else "")
        + (f" [{per_project}]" if per_project else "")
        + (f" rules regenerated/repaired {rules}" if rules else "")
        + f" uptime={s['uptimeS']:.0f}s"
    )


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:g}ms"
