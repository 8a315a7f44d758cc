"""The access log and the HTTP request metrics: one pure ASGI middleware that times every request.

Metrics are labelled by route template (`/jobs/{job_id}`), never the raw path, so their number stays
bounded whatever callers send. Process metrics (CPU, memory, open files) and Python's GC come from
prometheus-client's standard collectors, registered next to the job metrics."""

from __future__ import annotations

import logging
import time

from prometheus_client import CollectorRegistry, Counter, Histogram, gc_collector, platform_collector, process_collector
from starlette.types import ASGIApp, Message, Receive, Scope, Send

access_log = logging.getLogger("patchdiff.access")

HTTP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)


class RequestObserver:
    def __init__(self, app: ASGIApp, registry: CollectorRegistry, access_log: bool = True):
        self.app, self.access_log = app, access_log
        self.requests = Counter("patchdiff_http_requests", "HTTP requests answered, by route and status",
                                ["method", "route", "status"], registry=registry)
        self.latency = Histogram("patchdiff_http_request_duration_seconds", "HTTP request latency (this process)",
                                 ["method", "route"], buckets=HTTP_BUCKETS, registry=registry)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500  # if the app raises before answering

        async def observed_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, observed_send)
        finally:
            elapsed = time.perf_counter() - started
            route = getattr(scope.get("route"), "path", None) or "unmatched"
            method = scope["method"]
            self.requests.labels(method, route, str(status)).inc()
            self.latency.labels(method, route).observe(elapsed)
            if self.access_log:
                client = scope.get("client")
                access_log.info("%s %s %d", method, scope["path"], status, extra={
                    "method": method, "path": scope["path"], "route": route, "status": status,
                    "duration_ms": round(elapsed * 1e3, 2), "client": client[0] if client else None})


def register_process_metrics(registry: CollectorRegistry) -> None:
    process_collector.ProcessCollector(registry=registry)
    platform_collector.PlatformCollector(registry=registry)
    gc_collector.GCCollector(registry=registry)
