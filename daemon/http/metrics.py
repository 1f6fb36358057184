"""`/metrics`: Prometheus text format from a registry of this daemon's own.

Two sources, no copies: the socket `stats` frame's counters (read at scrape
time through the same `stats()` call the frame uses), and the HTTP side's own
histograms and counters. The registry is per daemon, never prometheus-client's
process-global one, so several daemons (or several servers in one test
process) cannot collide.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from typing import Final

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

PREFIX: Final = "overlapd_"
CONTENT_TYPE: Final = "text/plain; version=0.0.4; charset=utf-8"

# stats keys that only ever grow (engine's and socket server's); the rest are gauges
COUNTER_KEYS: Final = frozenset(
    {
        "requests", "tokens", "aborted", "overloaded", "steps", "preemptions", "failed_steps",
        "ring_records", "ring_readers_evicted", "graph_captures", "graph_replays",
        "spec_verify_rows", "spec_proposed", "spec_accepted", "spec_emitted", "spec_chained_rows", "spec_lagged_rows",
        "spec_paused_steps",
        "finished", "rejected",  # the echo engine's
        "connections_total", "connections_refused", "frames_in", "frames_out", "errors",
        "requests_accepted", "requests_rejected", "disconnect_aborts", "slow_client_disconnects",
    }
)
# A counter's family drops `_total`; this one would then clash with the `connections` gauge.
RENAMED: Final = {"connections_total": "connections_opened"}
_BAD_CHARS = re.compile(r"[^a-zA-Z0-9_]")

LATENCY_BUCKETS: Final = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
TOKEN_GAP_BUCKETS: Final = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.5)


class StatsCollector(Collector):
    """Every numeric field of the `stats` frame, as `overlapd_<field>`."""

    def __init__(self, stats: Callable[[], dict[str, int | float]]) -> None:
        self._stats = stats

    def collect(self) -> Iterator[Metric]:
        for key, value in sorted(self._stats().items()):
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            name = PREFIX + _BAD_CHARS.sub("_", RENAMED.get(key, key))
            doc = f"the socket stats frame's `{key}`"
            if key in COUNTER_KEYS:
                yield CounterMetricFamily(name, doc, value=value)
            else:
                yield GaugeMetricFamily(name, doc, value=value)


class HttpMetrics:
    def __init__(
        self,
        stats: Callable[[], dict[str, int | float]],
        live: Callable[[], int],
        connections: Callable[[], int] = lambda: 0,
    ) -> None:
        r = self.registry = CollectorRegistry(auto_describe=True)
        r.register(StatsCollector(stats))
        self.requests = Counter(
            "overlapd_http_requests", "HTTP generation requests by endpoint and outcome "
            "(a finish reason, or the HTTP status of a refusal)", ["endpoint", "outcome"], registry=r,
        )
        self.prompt_tokens = Counter("overlapd_http_prompt_tokens", "prompt tokens of finished HTTP requests", registry=r)
        self.completion_tokens = Counter(
            "overlapd_http_completion_tokens", "tokens generated for HTTP requests", registry=r
        )
        self.ttft = Histogram(
            "overlapd_http_time_to_first_token_seconds", "from the request's admission to its first token",
            buckets=LATENCY_BUCKETS, registry=r,
        )
        self.itl = Histogram(
            "overlapd_http_inter_token_latency_seconds", "time between a request's consecutive tokens",
            buckets=TOKEN_GAP_BUCKETS, registry=r,
        )
        self.e2e = Histogram(
            "overlapd_http_request_duration_seconds", "from admission to the last token of a generation request",
            buckets=LATENCY_BUCKETS, registry=r,
        )
        live_gauge = Gauge("overlapd_http_live_requests", "HTTP requests generating now", registry=r)
        live_gauge.set_function(live)
        conn_gauge = Gauge("overlapd_http_connections", "open HTTP connections", registry=r)
        conn_gauge.set_function(connections)

    def render(self) -> bytes:
        return generate_latest(self.registry)
