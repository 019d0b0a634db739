"""The endpoints. A recommendation handler checks what the schema cannot (IDs the catalog knows, history
limits, duplicates), turns the request into a job, waits for the task's batcher, and answers in the ID form
the request used. Bad input is a 4xx naming the field and the offending values, never a 500.

Two routers, because only `recommend` may be put behind the bearer token (`service.app` decides);
`ops` (health, readiness, metrics) must stay open to probes and scrapers.
"""

from __future__ import annotations

import time
from typing import Any

from fastapi import APIRouter, HTTPException, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from pod.dataset import MAX_HISTORY
from pod.ids import ANONYMOUS_USER
from pod.recommender import Catalog, ExplainJob, Ranked, SequentialJob, TopNJob
from service import tracing
from service.admission import ClientGone, DeadlinePassed, Overloaded
from service.dependencies import ReadyModel, Settings
from service.models import Served
from service.schemas import (
    ErrorResponse,
    ExplainRequest,
    ExplainResponse,
    RecommendResponse,
    SequentialRequest,
    TopNRequest,
)

ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse, "description": text}
    for code, text in (
        (400, "body unreadable as JSON: not UTF-8, nested too deeply, an integer of thousands of digits"),
        (413, "body over the size limit"),
        (422, "invalid body: wrong types or ranges, unknown IDs, duplicates (`loc` names the field)"),
        (429, "the task's queue is full; retry after `Retry-After` seconds"),
        (503, "not ready (loading or shutting down)"),
        (504, "not served within the request deadline"),
    )
}
UNAUTHORIZED: dict[int | str, dict[str, Any]] = {
    401: {"model": ErrorResponse, "description": "missing or wrong bearer token"}
}
CLIENT_GONE = 499  # nginx's "client closed request": nobody reads it, but the access log and metrics do

recommend = APIRouter(responses=ERRORS)
ops = APIRouter()


def bad(field: str, message: str, value: Any = None, status: int = 422) -> HTTPException:
    return HTTPException(status, detail=[{"loc": ["body", field], "msg": message, "input": value}])


def user_of(catalog: Catalog, value: int | str, has_history: bool = False) -> tuple[int, type]:
    """The internal user, and the ID form (int or str) the answer should use. A user new since training is
    served from the history the request sends (`user_0`); without one, an unknown user is a 422."""
    users, unknown = catalog.resolve_users([value])
    if unknown and has_history:
        return ANONYMOUS_USER, type(value)
    if unknown:
        raise bad("user_id", f"unknown user {value!r}", value)
    return users[0], type(value)


def items_of(catalog: Catalog, field: str, values: list[int | str]) -> list[int]:
    items, unknown = catalog.resolve_items(values)
    if unknown:
        raise bad(field, f"unknown item IDs: {unknown[:20]}" + (" ..." if len(unknown) > 20 else ""), unknown[:20])
    return items


async def served(request: Request, model: Served, task: str, job: Any, bucket: int) -> Any:
    """The job's result from its task's batcher, or the disconnect response (nobody is there to read it). The
    batch key holds the model's generation: a batch never mixes the models before and after a swap. The job
    travels as `(model, job, trace)`, `trace` its `queue.wait` span and request ids (None, tracing off)."""
    state = request.app.state
    if not model.recommender.serves(task):
        taught = ", ".join(model.recommender.runtime.tasks)
        raise HTTPException(404, detail=[{"loc": [], "msg": f"this model was not trained for {task} (only {taught})"}])
    elapsed = time.perf_counter() - request.state.arrived
    trace = tracing.queued(request, task)
    try:
        future = state.admission.admit(
            task, state.batchers[task], (model, job, trace), (model.generation, bucket), elapsed
        )
    except Overloaded as exc:
        tracing.left(trace)
        raise HTTPException(
            429, detail=[{"loc": [], "msg": str(exc), "input": None}], headers={"Retry-After": str(exc.retry_after_s)}
        ) from None
    try:
        return await state.admission.outcome(future, elapsed, disconnected(request))
    except ClientGone:
        return Response(status_code=CLIENT_GONE)
    except DeadlinePassed as exc:
        raise HTTPException(504, detail=[{"loc": [], "msg": str(exc), "input": None}]) from None
    finally:
        tracing.left(trace)  # a wait its batch never ended


async def disconnected(request: Request) -> None:
    """Returns when the client hangs up, so a job nobody waits for can leave the queue."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def ranked_response(
    request: Request, model: Served, task: str, result: Ranked | Response, form: type, started: float
) -> Response | RecommendResponse:
    """A ranked list in the ID form the request used (or the disconnect response, passed through)."""
    if isinstance(result, Response):
        return result
    metrics = request.app.state.metrics
    metrics.tokens.labels(task).inc(result.tokens)
    metrics.answered.labels(task, model.label).inc()
    catalog = model.recommender.catalog
    return RecommendResponse(
        items=[{"item_id": catalog.show_item(i, form), "score": s} for i, s in result.items],
        model=model.label,
        latency_ms=round(1000 * (time.perf_counter() - started), 2),
    )


@recommend.post("/recommend/sequential", response_model=RecommendResponse)
async def recommend_sequential(
    body: SequentialRequest, request: Request, model: ReadyModel, settings: Settings
) -> Response | RecommendResponse:
    started = time.perf_counter()
    recommender, catalog = model.recommender, model.recommender.catalog
    user, form = user_of(catalog, body.user_id, has_history=body.history is not None)
    if body.history is None:
        history = catalog.histories.get(user)
        if not history:
            raise bad("history", f"user {body.user_id!r} has no known history; send one", None)
    else:
        if not body.history:
            raise bad("history", "history is empty; send at least one item or leave it out", [])
        if len(body.history) > settings.max_history:
            raise bad(
                "history",
                f"history has {len(body.history)} items; the limit is {settings.max_history} "
                f"(the model reads the most recent {MAX_HISTORY})",
                len(body.history),
            )
        history = items_of(catalog, "history", body.history)
        form = type(body.history[0])
    banned = frozenset(catalog.resolve_items(body.exclude)[0])  # unknown items cannot be recommended anyway
    if body.exclude_seen:
        banned |= frozenset(history)
    banned |= model.unavailable
    if len(banned) >= len(catalog.item_tokens):
        raise bad("exclude", "every item is excluded; nothing is left to recommend", None)
    job = SequentialJob(user, history, body.k, banned)
    bucket = recommender.input_length("sequential", user, history) // 32  # similar lengths pad little together
    result = await served(request, model, "sequential", job, bucket)
    return ranked_response(request, model, "sequential", result, form, started)


@recommend.post("/recommend/topn", response_model=RecommendResponse)
async def recommend_topn(
    body: TopNRequest, request: Request, model: ReadyModel, settings: Settings
) -> Response | RecommendResponse:
    started = time.perf_counter()
    catalog = model.recommender.catalog
    user, _ = user_of(catalog, body.user_id, has_history=bool(body.history))
    history = catalog.histories.get(user, []) if body.history is None else items_of(catalog, "history", body.history)
    candidates = items_of(catalog, "candidates", body.candidates)
    seen, dupes = set(), []
    for raw, c in zip(body.candidates, candidates):
        if c in seen:
            dupes.append(raw)
        seen.add(c)
    if dupes:
        raise bad("candidates", f"duplicate candidates: {dupes[:20]}", dupes[:20])
    if body.mode == "beam" and body.k > settings.beams:
        raise bad("k", f"k={body.k} exceeds the {settings.beams} beams of mode 'beam'; use mode 'score'", body.k)
    form = type(body.candidates[0])
    candidates = [c for c in candidates if c not in model.unavailable]
    if not candidates:
        raise bad("candidates", "every candidate is marked unavailable", None)
    job = TopNJob(user, candidates, min(body.k, len(candidates)), body.mode, history)
    result = await served(request, model, "topn", job, len(candidates) // 25)
    return ranked_response(request, model, "topn", result, form, started)


@recommend.post("/explain", response_model=ExplainResponse)
async def explain(body: ExplainRequest, request: Request, model: ReadyModel) -> Response | ExplainResponse:
    started = time.perf_counter()
    catalog = model.recommender.catalog
    user, _ = user_of(catalog, body.user_id)
    (item,) = items_of(catalog, "item_id", [body.item_id])
    result = await served(request, model, "explanation", ExplainJob(user, item, body.max_tokens), 0)
    if isinstance(result, Response):
        return result
    metrics = request.app.state.metrics
    metrics.tokens.labels("explanation").inc(result.tokens)
    metrics.answered.labels("explanation", model.label).inc()
    return ExplainResponse(
        explanation=result.text,
        score=result.score,
        model=model.label,
        latency_ms=round(1000 * (time.perf_counter() - started), 2),
    )


@ops.get("/healthz", response_model=None)
async def healthz() -> dict[str, str]:
    return {"status": "alive"}


@ops.get("/readyz", response_model=None, responses={503: {"description": "loading or shutting down"}})
async def readyz(request: Request) -> dict[str, str] | JSONResponse:
    if not request.app.state.ready:
        return JSONResponse(status_code=503, content={"status": "not ready"})
    return {"status": "ready", "model": request.app.state.model.label}


@ops.get("/metrics", response_class=PlainTextResponse)
async def prometheus(request: Request) -> PlainTextResponse:
    return PlainTextResponse(generate_latest(request.app.state.metrics.registry), media_type=CONTENT_TYPE_LATEST)
