"""Prometheus metrics of one app, through ``prometheus_client`` (each app its own registry, so two
apps in one process, as in the tests, do not count each other's requests).

Example::

    >>> m = Metrics(queue_depth=lambda: 3)
    >>> m.observe_request("/v1/classify", 200, 0.01, None)
    >>> m.observe_batch("classify", 4)
    >>> text = m.render().decode()
    >>> 'lopa_requests_total{endpoint="/v1/classify",status="200"} 1.0' in text, "lopa_queue_depth 3.0" in text
    (True, True)
    >>> stats = {"hits": 5, "misses": 1, "evictions": 0, "bytes": 640, "entries": 1}
    >>> "lopa_prefix_cache_hits_total 5.0" in Metrics(prefix_cache=lambda: stats).render().decode()
    True
"""

from __future__ import annotations

from typing import Callable, Iterator

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from .errors import error_type

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
CONTENT_TYPE = CONTENT_TYPE_LATEST


class Metrics:
    """Requests and errors by endpoint, latency, rows per backend call, the queue's depth (read from
    ``queue_depth`` at each scrape) and, given ``prefix_cache``, the soft-prompt prefix cache's hits,
    misses, evictions, bytes and entries (read from it at each scrape). Endpoint labels are the app's
    fixed set of paths."""

    def __init__(self, queue_depth: Callable[[], int] = lambda: 0,
                 prefix_cache: Callable[[], dict[str, int] | None] | None = None):
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter("lopa_requests", "HTTP requests by endpoint and status code.",
                                ["endpoint", "status"], registry=r)
        self.errors = Counter("lopa_errors", "Error answers by endpoint and error type.", ["endpoint", "type"],
                              registry=r)
        self.latency = Histogram("lopa_request_duration_seconds", "Time from request to answer, by endpoint.",
                                 ["endpoint"], buckets=LATENCY_BUCKETS, registry=r)
        self.batch = Histogram("lopa_batch_size", "Rows per backend call, by kind (classify or generate; "
                               "continuous scheduling: generation rows started together).",
                               ["kind"], buckets=BATCH_BUCKETS, registry=r)
        self.queue = Gauge("lopa_queue_depth", "Requests waiting for a batch.", registry=r)
        self.queue.set_function(lambda: float(queue_depth()))
        if prefix_cache is not None:
            r.register(_PrefixCacheCollector(prefix_cache))

    def observe_request(self, endpoint: str, status: int, seconds: float, etype: str | None) -> None:
        self.requests.labels(endpoint, str(status)).inc()
        self.latency.labels(endpoint).observe(seconds)
        if status >= 400:
            self.errors.labels(endpoint, etype or error_type(status)).inc()

    def observe_batch(self, kind: str, size: int) -> None:
        self.batch.labels(kind).observe(size)

    def render(self) -> bytes:
        """The Prometheus text exposition of everything above."""
        return generate_latest(self.registry)


class _PrefixCacheCollector(Collector):
    """The soft-prompt prefix cache's counters, read from the backend at each scrape: the backend's
    worker thread owns the cache, so nothing here writes to it."""

    def __init__(self, stats: Callable[[], dict[str, int] | None]):
        self._stats = stats

    def describe(self) -> list:
        return []  # the families are read at scrape time only

    def collect(self) -> Iterator:
        s = self._stats()
        if s is None:
            return
        yield CounterMetricFamily("lopa_prefix_cache_hits", "Rows whose soft prompt's keys and values were "
                                  "cached.", value=s["hits"])
        yield CounterMetricFamily("lopa_prefix_cache_misses", "Rows whose soft prompt's keys and values were "
                                  "computed.", value=s["misses"])
        yield CounterMetricFamily("lopa_prefix_cache_evictions", "Cached soft prompts dropped for room.",
                                  value=s["evictions"])
        yield GaugeMetricFamily("lopa_prefix_cache_bytes", "Bytes of keys and values in the prefix cache.",
                                value=s["bytes"])
        yield GaugeMetricFamily("lopa_prefix_cache_entries", "Soft prompts in the prefix cache.", value=s["entries"])
