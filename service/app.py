"""The app factory: `create_app(settings)` wires the service's parts together and holds no request logic.

Layout (FastAPI's reference layout; each module is usable and testable on its own):
- `service.app`: this factory: the lifespan (load the recommender, start one batcher per task, warm up,
  drain on shutdown), middleware, exception handlers and routers; per-app state on `app.state`.
- `service.routes`: the endpoints, thin: validate into jobs, await the batcher, answer in the request's ID form.
- `service.dependencies`: what a handler relies on: a ready recommender (else 503), the bearer token.
- `service.admission`: 429 at the door (full queue, or a foreseen wait over half the deadline), 504 past it;
  no HTTP in it.
- `service.middleware`: early shedding (429 before the body is read), JSON logs, the body-size limit (413),
  request ids, access log, the error shape.
- `service.loading`: the settings' runtime (ONNX bundle or PyTorch checkpoint) behind one `Recommender`.
- `service.models`: the model being served as one immutable value (`Served`), swapped whole.
- `service.admin`: model swaps and item availability, behind the token.
- `service.tracing`: OpenTelemetry spans (off unless `POD_TRACING`): request, queue wait, batch.
- `service.batcher` (queues; knows nothing of T5), `service.schemas` (strict request bodies),
  `service.metrics`, `service.settings`.
The model side is `pod.recommender` (jobs to beam searches, ID resolution; knows nothing of HTTP).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Security
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from pod import tracing as pod_tracing
from pod.recommender import Recommender
from service.admin import admin, load_availability
from service.admission import Admission, Throughput
from service.batcher import Batcher, Worker
from service.dependencies import api_token, authorized
from service.loading import load_recommender
from service.metrics import Metrics
from service.middleware import BodyLimit, Shed, http_error, invalid, request_context, setup_logging, unexpected
from service.models import Served, batch_formed, run_batch
from service.routes import UNAUTHORIZED, ops, recommend
from service.settings import ServeSettings
from service.tracing import check_available, setup_tracing, shutdown_tracing

__all__ = ["create_app", "setup_logging"]  # `pod serve` imports both from here

log = logging.getLogger("pod.service")


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    """Tracing (when on) for the whole life of the service, so that its last spans are sent at the end."""
    provider = setup_tracing(app.state.settings, app.state.span_exporter)
    try:
        async with serving(app):
            yield
    finally:
        shutdown_tracing(provider)


@asynccontextmanager
async def serving(app: FastAPI) -> AsyncIterator[None]:
    """Ready only once the model is loaded and warm; on shutdown, refuse new work but finish what was admitted.

    One model thread serves every task: batches of different tasks take turns instead of fighting over the
    cores, which is what the throughput estimate assumes. Loading and warm-up run in a thread of their own
    before it starts.
    """
    state, settings, metrics = app.state, app.state.settings, app.state.metrics
    throughput = state.admission.throughput
    loop = asyncio.get_running_loop()
    executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pod-model")
    recommender, label = await loop.run_in_executor(executor, load_recommender, settings)
    state.unavailable_raw = load_availability(settings.availability_file)
    state.model = Served(recommender, label).with_unavailable(state.unavailable_raw)
    state.swapping = asyncio.Lock()
    metrics.model_info.labels(label).set(1)
    metrics.unavailable.set(len(state.model.unavailable))
    state.batchers = {}
    worker = Worker("pod-model-batches")
    for task, method in (("sequential", "sequential"), ("topn", "topn"), ("explanation", "explain")):
        batcher = Batcher(
            task,
            run_batch(method, task),
            worker,
            settings.max_batch_size,
            settings.max_wait_ms,
            settings.max_queue,
            lambda *batch: (metrics.on_batch(*batch), throughput.on_batch(*batch)),
            metrics.on_depth,
            batch_formed if pod_tracing.tracer() is not None else None,
        )
        batcher.start()
        state.batchers[task] = batcher
    if settings.warmup:
        t0 = time.perf_counter()
        await loop.run_in_executor(executor, warmup, recommender)
        log.info("warm-up done", extra={"fields": {"seconds": round(time.perf_counter() - t0, 3)}})
    state.ready = True
    log.info("ready", extra={"fields": {"model": label, "runtime": settings.runtime}})
    yield
    state.ready = False
    await asyncio.gather(*(b.close() for b in state.batchers.values()))  # finish what was admitted
    await loop.run_in_executor(executor, worker.stop)
    executor.shutdown(wait=True)
    log.info("stopped")


def warmup(recommender: Recommender) -> None:
    with pod_tracing.span("warmup"):  # the warm-up's encoder and search spans under one root
        recommender.warmup()


def create_app(settings: ServeSettings, span_exporter: Any = None) -> FastAPI:
    """The service for `settings`. Nothing is loaded until the lifespan starts, so this is cheap and a bad
    setting (a short token, tracing without OpenTelemetry installed) fails here, before a port is bound.
    `span_exporter` (with `settings.tracing`): where spans go instead of OTLP, e.g. an in-memory exporter."""
    token = api_token(settings)
    if settings.tracing:
        check_available()
    app = FastAPI(
        title="POD recommendation service",
        version="0.1.0",
        lifespan=lifespan,
        description="Sequential and top-N recommendation and explanations from a prompt-distilled T5.",
    )
    app.state.settings = settings
    app.state.api_token = token
    app.state.metrics = Metrics()
    app.state.admission = Admission(settings.request_timeout_s, Throughput(), settings.max_in_flight)
    app.state.ready = False
    app.state.span_exporter = span_exporter

    app.add_middleware(BodyLimit, limit=settings.max_body_bytes)
    app.middleware("http")(request_context)  # sees every answer but early 429s, the 413s of BodyLimit included
    app.add_middleware(Shed)  # outermost: refuses before anything reads the body or builds a request

    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(RequestValidationError, invalid)
    app.add_exception_handler(Exception, unexpected)

    # Only when a token is set do the endpoints require (and OpenAPI declare) it; health, metrics, docs stay open.
    if token is None:
        app.include_router(recommend)
    else:
        app.include_router(recommend, dependencies=[Security(authorized)], responses=UNAUTHORIZED)
    app.include_router(ops)
    app.include_router(admin)  # 403 without a token, 401 without the right one
    return app
