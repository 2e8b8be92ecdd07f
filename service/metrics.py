"""Prometheus metrics: request latency by route template, batch sizes, index sizes, GPU memory,
and the ray backend's shards (state, rows, latency)."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from starlette.types import ASGIApp, Message, Receive, Scope, Send

log = logging.getLogger("dotsearch.metrics")

LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096)


class _StateCollector(Collector):
    """Reads index sizes and GPU memory at scrape time, never on the request path."""

    def __init__(self, collections: Callable[[], Iterable[tuple[str, int]]],
                 gpu_memory: Callable[[], dict[str, Any] | None],
                 shards: Callable[[], Iterable[tuple[str, dict[str, Any]]]]) -> None:
        self.collections = collections
        self.gpu_memory = gpu_memory
        self.shards = shards

    def collect(self) -> Iterator[Metric]:
        sizes = GaugeMetricFamily("dotsearch_collection_vectors",
                                  "Vectors held by each collection", labels=["collection"])
        try:
            for name, count in self.collections():
                sizes.add_metric([name], float(count))
        except Exception:
            log.exception("could not read collection sizes")
        yield sizes
        gpu = GaugeMetricFamily("dotsearch_gpu_memory_bytes", "GPU memory (bytes)",
                                labels=["kind"])
        try:
            info = self.gpu_memory() or {}
            for kind, value in info.items():
                if isinstance(value, int | float) and not isinstance(value, bool):
                    gpu.add_metric([str(kind)], float(value))
        except Exception:
            log.exception("could not read GPU memory")
        yield gpu
        yield from self._shard_metrics()

    def _shard_metrics(self) -> Iterator[Metric]:
        labels = ["collection", "shard"]
        state = GaugeMetricFamily("dotsearch_shard_state", "1 for each shard's current state "
                                  "(ready, loading, restarting, down, unresponsive)",
                                  labels=[*labels, "state"])
        rows = GaugeMetricFamily("dotsearch_shard_vectors", "Vectors held by each shard",
                                 labels=labels)
        latency = GaugeMetricFamily("dotsearch_shard_latency_seconds",
                                    "Each shard's latest answer time", labels=labels)
        try:
            for name, shard in self.shards():
                key = [name, str(shard.get("index"))]
                state.add_metric([*key, str(shard.get("state"))], 1.0)
                rows.add_metric(key, float(shard.get("rows") or 0))
                if shard.get("last_latency_ms") is not None:
                    latency.add_metric(key, float(shard["last_latency_ms"]) / 1000.0)
        except Exception:
            log.exception("could not read shard states")
        yield from (state, rows, latency)


class Metrics:
    """One registry per app, so several apps (tests) can live in one process."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.latency = Histogram("dotsearch_request_duration_seconds",
                                 "HTTP request latency by route template",
                                 ["method", "route", "status"], buckets=LATENCY_BUCKETS,
                                 registry=self.registry)
        self.batch_requests = Histogram("dotsearch_search_batch_requests",
                                        "Search requests merged into one engine call",
                                        buckets=BATCH_BUCKETS, registry=self.registry)
        self.batch_rows = Histogram("dotsearch_search_batch_queries",
                                    "Query vectors in one engine call",
                                    buckets=BATCH_BUCKETS, registry=self.registry)
        self.images = Counter("dotsearch_featurized_images", "Images run through the model",
                              registry=self.registry)

    def observe_batch(self, requests: int, rows: int) -> None:
        self.batch_requests.observe(requests)
        self.batch_rows.observe(rows)

    def add_state(self, collections: Callable[[], Iterable[tuple[str, int]]],
                  gpu_memory: Callable[[], dict[str, Any] | None],
                  shards: Callable[[], Iterable[tuple[str, dict[str, Any]]]] = tuple) -> None:
        self.registry.register(_StateCollector(collections, gpu_memory, shards))

    def render(self) -> bytes:
        return generate_latest(self.registry)


class LatencyMiddleware:
    """Pure ASGI middleware timing each HTTP request under its route template."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            route = scope.get("route")
            template = getattr(route, "path", None) or "unmatched"
            self.metrics.latency.labels(scope.get("method", ""), template,
                                        str(status)).observe(time.perf_counter() - start)
