"""Prometheus metrics with buckets fit for milliseconds, one registry per app."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.latency = Histogram(
            "pod_request_latency_seconds",
            "Request latency by endpoint and status",
            ["endpoint", "status"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_wait = Histogram(
            "pod_queue_wait_seconds", "Time a job waited for its batch", ["task"], buckets=LATENCY_BUCKETS, registry=r
        )
        self.batch_size = Histogram(
            "pod_batch_size", "Jobs per model batch", ["task"], buckets=BATCH_BUCKETS, registry=r
        )
        self.model_time = Histogram(
            "pod_model_seconds", "Model time per batch", ["task"], buckets=LATENCY_BUCKETS, registry=r
        )
        self.tokens = Counter("pod_tokens_generated_total", "Decoder tokens generated", ["task"], registry=r)
        self.queue_depth = Gauge("pod_queue_depth", "Jobs waiting for a batch", ["task"], registry=r)
        self.errors = Counter("pod_errors_total", "Error responses by status code", ["code"], registry=r)
        self.model_info = Gauge("pod_model_info", "1: serving now; 0: swapped out", ["model"], registry=r)
        self.answered = Counter("pod_answers_total", "Answers by task and model", ["task", "model"], registry=r)
        self.unavailable = Gauge("pod_unavailable_items", "Items marked unavailable (never recommended)", registry=r)

    def on_batch(self, task: str, size: int, seconds: float, waits: list[float]) -> None:
        self.batch_size.labels(task).observe(size)
        self.model_time.labels(task).observe(seconds)
        for w in waits:
            self.queue_wait.labels(task).observe(w)

    def on_depth(self, task: str, depth: int) -> None:
        self.queue_depth.labels(task).set(depth)
