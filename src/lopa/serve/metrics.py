"""Prometheus metrics of one app, through ``prometheus_client`` (each app its own registry, so two
apps in one process, as in the tests, do not count each other's requests).

Example::

    >>> m = Metrics(queue_depth=lambda: 3)
    >>> m.observe_request("/v1/classify", 200, 0.01, None)
    >>> m.observe_batch("classify", 4)
    >>> text = m.render().decode()
    >>> 'lopa_requests_total{endpoint="/v1/classify",status="200"} 1.0' in text, "lopa_queue_depth 3.0" in text
    (True, True)
"""

from __future__ import annotations

from typing import Callable

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from .errors import error_type

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
CONTENT_TYPE = CONTENT_TYPE_LATEST


class Metrics:
    """Requests and errors by endpoint, latency, rows per backend call, and the queue's depth
    (read from ``queue_depth`` at each scrape). Endpoint labels are the app's fixed set of paths."""

    def __init__(self, queue_depth: Callable[[], int] = lambda: 0):
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
