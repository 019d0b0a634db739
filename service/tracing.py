"""OpenTelemetry tracing of the service, off unless `POD_TRACING=true` (or `pod serve --tracing`).

Where spans go is OpenTelemetry's own environment: `OTEL_EXPORTER_OTLP_ENDPOINT` (OTLP over HTTP, default
http://localhost:4318; `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` for a full URL), `OTEL_SERVICE_NAME` (default
"pod-serve"), `OTEL_TRACES_SAMPLER`/`_ARG` (default: every request). A request is one trace:

    POST /recommend/sequential   (SERVER; request_id, http.request.method, url.path, http.route,
      |                           http.response.status_code; continues a client's W3C `traceparent`)
      +-- queue.wait             (request_id, task; event `batch.formed` when the batcher closed its batch;
                                  ends when the model thread starts the batch, `dropped` if it never does)

and a batch, run in the model thread for several requests at once, is a trace of its own, linked to each
request's span (and each `queue.wait` linked back to it):

    batch                        (task, batch.size, model, model.generation, request_ids)
      +-- encoder                (task, rows)                       from `pod.tracing`, in the core
      +-- search                 (task, mode: beam/one_step/score, rows, beams or k)
            +-- decoder.step     (step, rows), one per decoder call

Nothing here imports OpenTelemetry until tracing is set up, and with tracing off every hook returns at its
first line: `pod.tracing.tracer()` is None.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Any

from pod import tracing

log = logging.getLogger("pod.service")

SERVICE_NAME = "pod-serve"
_NOOP: AbstractContextManager[None] = nullcontext()


def check_available() -> None:
    """Raise a ValueError naming the extra to install when tracing is asked for but OpenTelemetry is absent."""
    try:
        import opentelemetry.exporter.otlp.proto.http.trace_exporter  # noqa: F401
        import opentelemetry.sdk.trace  # noqa: F401
    except ImportError as exc:
        raise ValueError(
            f"POD_TRACING needs the OpenTelemetry SDK and OTLP exporter ({exc.name} is missing): "
            "pip install 'pod-rec[serve]'"
        ) from None


def setup_tracing(settings: Any, exporter: Any = None) -> Any:
    """Turn tracing on when `settings.tracing` is: a TracerProvider sending spans in batches to the OTLP/HTTP
    endpoint of the environment, or synchronously to `exporter` (tests pass an in-memory one). Returns the
    provider, for `shutdown_tracing`, or None when tracing is off."""
    if not settings.tracing:
        return None
    check_available()
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor

    from pod import __version__

    name = os.environ.get("OTEL_SERVICE_NAME") or SERVICE_NAME
    provider = TracerProvider(resource=Resource.create({"service.name": name, "service.version": __version__}))
    if exporter is None:
        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
        endpoint = (
            os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
            or os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")
            or "http://localhost:4318"
        )
    else:
        provider.add_span_processor(SimpleSpanProcessor(exporter))
        endpoint = type(exporter).__name__
    tracing.enable(provider)
    log.info("tracing on", extra={"fields": {"service": name, "endpoint": endpoint}})
    return provider


def shutdown_tracing(provider: Any) -> None:
    """Stop tracing and send the spans still buffered."""
    if provider is None:
        return
    tracing.disable()
    provider.shutdown()


# ------------------------------------------------------------------------------------------------ the request


def request_span(request: Any, request_id: str) -> AbstractContextManager[Any]:
    """The server span of one HTTP request, current for the handler (a no-op yielding None when off)."""
    t = tracing.tracer()
    if t is None:
        return _NOOP
    from opentelemetry import propagate
    from opentelemetry.trace import SpanKind

    return t.start_as_current_span(
        request.method,
        context=propagate.extract(request.headers),  # a caller's `traceparent`: the request joins its trace
        kind=SpanKind.SERVER,
        attributes={"request_id": request_id, "http.request.method": request.method, "url.path": request.url.path},
    )


def finish_request(span: Any, request: Any, status: int) -> None:
    """Name the span after its route template (`POST /recommend/sequential`), as OpenTelemetry's HTTP
    conventions do, and record the status; a 5xx marks it an error."""
    route = getattr(request.scope.get("route"), "path", None)
    if route:
        span.update_name(f"{request.method} {route}")
        span.set_attribute("http.route", route)
    span.set_attribute("http.response.status_code", status)
    if status >= 500:
        from opentelemetry.trace import StatusCode

        span.set_status(StatusCode.ERROR)


# ------------------------------------------------------------------------------------------------ queue, batch


@dataclass(eq=False)
class JobTrace:
    """What a job carries to its batch: its request's id and span context (for the batch's links) and its open
    `queue.wait` span, ended once, by whichever comes first: its batch starting, or the request ending."""

    request_id: str
    request: Any  # the request span's SpanContext
    wait: Any  # the queue.wait span
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _open: bool = True

    def _close(self) -> bool:
        with self._lock:
            was, self._open = self._open, False
        return was

    def started(self, batch: Any) -> None:
        """The job's batch started (in the model thread): the wait ends, linked to the batch's span context."""
        if self._close():
            self.wait.add_link(batch)
            self.wait.end()

    def left(self) -> None:
        """The request is over; a wait still open was never served (cancelled, past its deadline, refused)."""
        if self._close():
            self.wait.set_attribute("dropped", True)
            self.wait.end()


def queued(request: Any, task: str) -> JobTrace | None:
    """Open the `queue.wait` span of a job about to be submitted (None when tracing is off)."""
    t = tracing.tracer()
    if t is None:
        return None
    from opentelemetry import trace

    parent = getattr(request.state, "span", None)
    if parent is None:
        parent = trace.get_current_span()
    rid = request.state.request_id
    wait = t.start_span(
        "queue.wait", context=trace.set_span_in_context(parent), attributes={"request_id": rid, "task": task}
    )
    return JobTrace(rid, parent.get_span_context(), wait)


def left(job: JobTrace | None) -> None:
    if job is not None:
        job.left()


def formed(jobs: Sequence[JobTrace | None]) -> None:
    """The batcher closed a batch of these jobs: an event on each one's wait."""
    now = time.time_ns()
    for job in jobs:
        if job is not None:
            job.wait.add_event("batch.formed", {"batch.size": len(jobs)}, timestamp=now)


def batch_span(task: str, model: str, generation: int, jobs: Sequence[JobTrace | None]) -> AbstractContextManager[Any]:
    """The span of one batch in the model thread: the parent of the core's encoder, search and decoder spans,
    linked to the span of every request it serves (it runs for several, so it is no one request's child)."""
    t = tracing.tracer()
    if t is None:
        return _NOOP
    return _batch_span(t, task, model, generation, jobs)


@contextmanager
def _batch_span(t: Any, task: str, model: str, generation: int, jobs: Sequence[JobTrace | None]) -> Iterator[Any]:
    from opentelemetry.trace import Link

    mine = [j for j in jobs if j is not None]
    attributes = {
        "task": task,
        "batch.size": len(jobs),
        "model": model,
        "model.generation": generation,
        "request_ids": [j.request_id for j in mine],
    }
    links = [Link(j.request, {"request_id": j.request_id}) for j in mine if j.request.is_valid]
    with t.start_as_current_span("batch", links=links, attributes=attributes) as span:
        context = span.get_span_context()
        for job in mine:
            job.started(context)
        yield span
