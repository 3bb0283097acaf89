"""The gateway's Prometheus metrics: the server's per-endpoint ones (:class:`lopa.serve.metrics.Metrics`:
requests, errors, latency, queue depth) plus the same per task, the size of each soft-prompt batch,
and whether the upstream answered last time it was asked.

Example::

    >>> m = GatewayMetrics()
    >>> m.observe_task("sentiment", "/v1/completions", 200, 0.02, None)
    >>> m.observe_task("sentiment", "/v1/completions", 504, 1.0, "timeout_error")
    >>> m.observe_soft_prompts("sentiment", 3)
    >>> text = m.render().decode()
    >>> 'lopa_gateway_task_requests_total{endpoint="/v1/completions",status="504",task="sentiment"} 1.0' in text
    True
    >>> 'lopa_gateway_task_errors_total{task="sentiment",type="timeout_error"} 1.0' in text
    True
"""

from __future__ import annotations

from typing import Callable

from prometheus_client import Counter, Gauge, Histogram

from ..serve.errors import error_type
from ..serve.metrics import BATCH_BUCKETS, LATENCY_BUCKETS, Metrics


class GatewayMetrics(Metrics):
    """Per endpoint (fed by the middleware) and per task (fed by the routes). Task labels are the
    gateway's fixed set of task names: an unknown name is never a label."""

    def __init__(self, queue_depth: Callable[[], int] = lambda: 0):
        super().__init__(queue_depth)
        r = self.registry
        self.task_requests = Counter("lopa_gateway_task_requests", "Requests by task, endpoint and status code.",
                                     ["task", "endpoint", "status"], registry=r)
        self.task_errors = Counter("lopa_gateway_task_errors", "Error answers by task and error type.",
                                   ["task", "type"], registry=r)
        self.task_latency = Histogram("lopa_gateway_task_duration_seconds",
                                      "Time from request to the end of the answer (a stream's last event), by task.",
                                      ["task"], buckets=LATENCY_BUCKETS, registry=r)
        self.soft_prompt_batch = Histogram("lopa_gateway_soft_prompt_batch_size",
                                           "Soft prompts computed in one generator call, by task.", ["task"],
                                           buckets=BATCH_BUCKETS, registry=r)
        self.upstream_up = Gauge("lopa_gateway_upstream_up",
                                 "1 when the upstream answered the last request or health check, else 0.", registry=r)

    def observe_task(self, task: str, endpoint: str, status: int, seconds: float, etype: str | None) -> None:
        self.task_requests.labels(task, endpoint, str(status)).inc()
        self.task_latency.labels(task).observe(seconds)
        if status >= 400:
            self.task_errors.labels(task, etype or error_type(status)).inc()

    def observe_soft_prompts(self, task: str, size: int) -> None:
        self.soft_prompt_batch.labels(task).observe(size)
