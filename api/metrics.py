"""Prometheus metrics: job counts read from the database at scrape time, request latency by route.

Job gauges are computed per scrape rather than kept in process: the worker changes job states in
another process, and several API replicas would otherwise each report their own partial counts.
Each app has its own registry so several apps (tests, or API + admin) never collide.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .counters import DROPPED, requeued
from .jobs.models import QUEUED, STATUSES
from .redispatch import REASONS

log = logging.getLogger("slim.api")


class JobCollector(Collector):
    def __init__(self, count_by_status: Callable[[], dict[str, int]]) -> None:
        self._count = count_by_status

    def collect(self) -> Iterator[GaugeMetricFamily]:
        try:
            counts = self._count()
        except Exception:  # a scrape must not fail because the database blinked
            log.exception("could not count jobs for /metrics")
            return
        jobs = GaugeMetricFamily("slim_jobs", "Jobs in the database by status", labels=["status"])
        for status in STATUSES:
            jobs.add_metric([status], counts.get(status, 0))
        yield jobs
        yield GaugeMetricFamily("slim_queue_depth", "Jobs waiting for a worker (status queued)",
                                value=counts.get(QUEUED, 0))


class DeliveryCollector(Collector):
    """Re-sent messages by reason and dropped deliveries, counted by the workers in the database."""

    def __init__(self, read_counters: Callable[[], dict[str, int]]) -> None:
        self._read = read_counters

    def collect(self) -> Iterator[CounterMetricFamily]:
        try:
            values = self._read()
        except Exception:
            log.exception("could not read the delivery counters for /metrics")
            return
        sent = CounterMetricFamily("slim_requeues", "Job messages re-sent by the reconciler, by reason "
                                   "(heartbeat, message-lost, dispatch-timeout)", labels=["reason"])
        for reason in REASONS:
            sent.add_metric([reason], values.get(requeued(reason), 0))
        yield sent
        yield CounterMetricFamily("slim_deliveries_dropped", "Deliveries a worker dropped because the job "
                                  "could not be claimed (duplicates, or finished meanwhile)",
                                  value=values.get(DROPPED, 0))


class Metrics:
    def __init__(self, count_by_status: Callable[[], dict[str, int]],
                 read_counters: Callable[[], dict[str, int]] | None = None) -> None:
        self.registry = CollectorRegistry()
        self.registry.register(JobCollector(count_by_status))
        if read_counters is not None:
            self.registry.register(DeliveryCollector(read_counters))
        self.latency = Histogram(
            "slim_http_request_duration_seconds", "HTTP request latency by route template",
            ["method", "route", "status"], registry=self.registry,
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300),
        )
        self.submitted = Counter("slim_jobs_submitted", "Jobs accepted by POST /jobs", registry=self.registry)


class LatencyMiddleware:
    """Times every HTTP request under its route template (``/jobs/{job_id}``), never the raw path,
    so label cardinality stays bounded whatever ids clients send."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            route = scope.get("route")
            template = getattr(route, "path", None) or "<unmatched>"
            self.metrics.latency.labels(scope["method"], template, str(status)).observe(time.perf_counter() - start)
