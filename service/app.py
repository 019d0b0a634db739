"""The HTTP layer: FastAPI endpoints, validation into jobs, one dynamic batcher per task, metrics and logs.

It knows requests and IDs; the batcher (`service.batcher`) knows queues, and the engine (`service.engine`)
knows the model. Bad input is answered 4xx with the field and the offending values; never 500.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import math
import re
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from typing import Annotated, Any

from fastapi import FastAPI, HTTPException, Request, Security
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from pod.dataset import MAX_HISTORY
from service.batcher import Batcher, QueueFull
from service.engine import Catalog, Engine, ExplainJob, SequentialJob, TopNJob
from service.metrics import Metrics
from service.schemas import (
    ErrorResponse,
    ExplainRequest,
    ExplainResponse,
    RecommendResponse,
    SequentialRequest,
    TopNRequest,
)
from service.settings import ServeSettings

log = logging.getLogger("pod.service")


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        out.update(getattr(record, "fields", {}))
        return json.dumps(out)


def setup_logging(level: str) -> None:
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger("pod")
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    root.propagate = False


def bad(field: str, message: str, value: Any = None, status: int = 422) -> HTTPException:
    return HTTPException(status, detail=[{"loc": ["body", field], "msg": message, "input": value}])


REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")  # echoed in a header and logged: nothing else is taken
MIN_TOKEN_CHARS = 16
BEARER = HTTPBearer(auto_error=False, description="the server's POD_API_TOKEN")
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


class BodyLimit:
    """Bound a request body as it streams in: a chunked upload has no Content-Length to check up front.

    Raising `HTTPException` from `receive` is how FastAPI's body reader lets it through to the handlers, so
    the client gets the usual 413 and the rest of the body is never read.
    """

    def __init__(self, app: Any, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        seen = 0

        async def limited() -> dict:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise HTTPException(413, detail=[too_large(f"at least {seen}", self.limit)])
            return message

        await self.app(scope, limited, send)


def too_large(size: str, limit: int) -> dict[str, Any]:
    return {"loc": ["body"], "msg": f"body of {size} bytes is over the {limit}-byte limit", "input": None}


def json_safe(value: Any, depth: int = 0) -> Any:
    """An error's echoed input, made encodable: Python's JSON reader accepts NaN, Infinity and lone surrogates
    (`"\\ud800"`), which the response encoder refuses (each was a 500 before this), and a deep
    nesting could exhaust the stack; past 16 levels the echo is cut."""
    if isinstance(value, str):
        return value.encode("utf-8", "backslashreplace").decode("utf-8")
    if value is None or isinstance(value, (bool, int)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if depth >= 16:
        return "..."
    if isinstance(value, dict):
        return {str(json_safe(k, depth + 1)): json_safe(v, depth + 1) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v, depth + 1) for v in value]
    return json_safe(str(value))


class Throughput:
    """Jobs served per wall-clock second, per task (a moving average over batches), to foresee a job's wait.

    A bounded queue alone admits more than the model can serve before the deadline when the hardware is slow
    (measured: 256 queued at 25 jobs/s is a 10 s wait, so the admitted ended in 504s); the admission check
    in `run` refuses with 429 while the foreseen wait is over half the deadline. A batch's time runs from
    the previous batch's end when its jobs were already waiting then (the gap is the server's own overhead,
    or other tasks' batches on the shared worker), else from its oldest job's arrival (the server was idle).
    """

    def __init__(self) -> None:
        self.rate: dict[str, float] = {}
        self.last_end: dict[str, float] = {}

    def on_batch(self, task: str, size: int, seconds: float, waits: list[float]) -> None:
        end = time.perf_counter()
        since = max(self.last_end.get(task, 0.0), end - seconds - max(waits, default=0.0))
        self.last_end[task] = end
        now = size / max(end - since, 1e-6)
        self.rate[task] = now if task not in self.rate else 0.8 * self.rate[task] + 0.2 * now

    def wait_s(self, task: str, jobs: int) -> float:
        rate = self.rate.get(task)
        return jobs / rate if rate else 0.0


def load_engine(settings: ServeSettings) -> tuple[Engine, str]:
    """The runtime the settings ask for, behind one Engine; returns it and a model label."""
    if settings.runtime == "torch":
        if not settings.checkpoint:
            raise ValueError("--runtime torch needs --checkpoint")
        import torch

        from pod.dataset import PreparedData
        from pod.model import load_checkpoint
        from pod.torch_runtime import TorchRuntime

        device = (
            "cuda"
            if settings.device == "auto" and torch.cuda.is_available()
            else ("cpu" if settings.device == "auto" else settings.device)
        )
        model, tokenizer, meta = load_checkpoint(settings.checkpoint, device)
        data = PreparedData.load(meta["train_config"]["data"])
        runtime = TorchRuntime(model, tokenizer, device, bf16=device == "cuda")
        catalog = Catalog.from_prepared(data, tokenizer)
        label = f"pod-torch-{device}"
    else:
        if not settings.bundle:
            raise ValueError("the ONNX runtime needs --bundle (a directory written by `pod export`)")
        from pod.bundle import Bundle
        from pod.onnx_runtime import OnnxRuntime

        bundle = Bundle.load(settings.bundle)
        runtime = OnnxRuntime(bundle, settings.provider, settings.threads)
        catalog = Catalog.from_bundle(bundle)
        m = bundle.manifest
        label = f"pod-onnx-{m['quantization'] if m['quantization'] != 'none' else m['dtype']}"
        label += f"@{m['source_checkpoint']['sha256'][:12]}"
    engine = Engine(
        runtime,
        catalog,
        settings.beams,
        settings.explanation_beams,
        settings.explanation_groups,
        settings.diversity_penalty,
        settings.normalizer,
    )
    return engine, label


def create_app(settings: ServeSettings) -> FastAPI:
    metrics = Metrics()
    throughput = Throughput()
    state: dict[str, Any] = {"ready": False}

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        loop = asyncio.get_running_loop()
        executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pod-model")
        engine, label = await loop.run_in_executor(executor, load_engine, settings)
        state.update(engine=engine, label=label, executor=executor)
        batchers = {}
        for task, fn in (("sequential", engine.sequential), ("topn", engine.topn), ("explanation", engine.explain)):
            b = Batcher(
                task,
                fn,
                executor,
                settings.max_batch_size,
                settings.max_wait_ms,
                settings.max_queue,
                lambda *batch: (metrics.on_batch(*batch), throughput.on_batch(*batch)),
                metrics.on_depth,
            )
            b.start()
            batchers[task] = b
        state["batchers"] = batchers
        if settings.warmup:
            t0 = time.perf_counter()
            await loop.run_in_executor(executor, engine.warmup)
            log.info("warm-up done", extra={"fields": {"seconds": round(time.perf_counter() - t0, 3)}})
        state["ready"] = True
        log.info("ready", extra={"fields": {"model": label, "runtime": settings.runtime}})
        yield
        state["ready"] = False
        await asyncio.gather(*(b.close() for b in batchers.values()))  # finish what was admitted
        executor.shutdown(wait=True)
        log.info("stopped")

    app = FastAPI(
        title="POD recommendation service",
        version="0.1.0",
        lifespan=lifespan,
        description="Sequential and top-N recommendation and explanations from a prompt-distilled T5.",
    )
    app.add_middleware(BodyLimit, limit=settings.max_body_bytes)

    token = settings.api_token.get_secret_value().encode() if settings.api_token else None
    if token is not None and len(token) < MIN_TOKEN_CHARS:
        raise ValueError(f"POD_API_TOKEN is shorter than {MIN_TOKEN_CHARS} characters; use a long random one")

    def authorized(credentials: Annotated[HTTPAuthorizationCredentials | None, Security(BEARER)]) -> None:
        """Constant-time comparison, so response timing does not reveal how much of a guess was right."""
        given = credentials.credentials.encode() if credentials is not None else b""
        if not hmac.compare_digest(given, token):
            raise HTTPException(
                401,
                detail=[
                    {
                        "loc": ["header", "authorization"],
                        "msg": "missing or wrong bearer token (Authorization: Bearer <token>)",
                        "input": None,
                    }
                ],
                headers={"WWW-Authenticate": "Bearer"},
            )

    # Only when a token is set do the endpoints require (and OpenAPI declare) it; health, metrics, docs stay open.
    guarded: dict[str, Any] = {"responses": ERRORS}
    if token is not None:
        guarded = {
            "dependencies": [Security(authorized)],
            "responses": {**ERRORS, 401: {"model": ErrorResponse, "description": "missing or wrong bearer token"}},
        }

    @app.middleware("http")
    async def request_context(request: Request, call_next):
        rid = request.headers.get("x-request-id", "")
        if not REQUEST_ID.fullmatch(rid):
            rid = uuid.uuid4().hex
        request.state.request_id = rid
        started = request.state.arrived = time.perf_counter()
        length = request.headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > settings.max_body_bytes):
            response: Response = JSONResponse(
                status_code=413, content={"detail": [too_large(length, settings.max_body_bytes)]}
            )
        else:
            response = await call_next(request)
        elapsed = time.perf_counter() - started
        response.headers["X-Request-ID"] = rid
        endpoint = request.url.path
        if endpoint not in ("/metrics", "/healthz", "/readyz"):
            metrics.latency.labels(endpoint, str(response.status_code)).observe(elapsed)
        if response.status_code >= 400:
            metrics.errors.labels(str(response.status_code)).inc()
        log.info(
            "request",
            extra={
                "fields": {
                    "request_id": rid,
                    "method": request.method,
                    "path": endpoint,
                    "status": response.status_code,
                    "ms": round(1000 * elapsed, 2),
                }
            },
        )
        return response

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        """Starlette's own errors (404, 405, 400 on an unreadable body) in the project's one error shape."""
        detail = exc.detail
        if not isinstance(detail, list):
            why = f" ({str(exc.__cause__)[:200]})" if exc.status_code == 400 and exc.__cause__ is not None else ""
            detail = [{"loc": [], "msg": f"{detail}{why}", "input": None}]
        return JSONResponse(status_code=exc.status_code, content={"detail": json_safe(detail)}, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError):
        """FastAPI's 422, with the echoed input made encodable (see `json_safe`)."""
        return JSONResponse(status_code=422, content={"detail": json_safe(exc.errors())})

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception):
        log.error("internal error", exc_info=exc, extra={"fields": {"request_id": request.state.request_id}})
        return JSONResponse(status_code=500, content={"detail": [{"loc": [], "msg": "internal error", "input": None}]})

    def engine() -> Engine:
        if not state["ready"]:
            raise HTTPException(
                503,
                detail=[{"loc": [], "msg": "not ready (loading or shutting down)", "input": None}],
                headers={"Retry-After": "1"},
            )
        return state["engine"]

    def user_of(value: int | str) -> tuple[int, type]:
        cat = state["engine"].catalog
        if isinstance(value, int):
            if value not in cat.id2user:
                raise bad("user_id", f"unknown user {value}", value)
            return value, int
        if value not in cat.user_index:
            raise bad("user_id", f"unknown user {value!r}", value)
        return cat.user_index[value], str

    def items_of(field: str, values: list[int | str]) -> list[int]:
        cat = state["engine"].catalog
        out, unknown = [], []
        for v in values:
            if isinstance(v, int):
                idx = v if v in cat.id2item else None
            else:
                idx = cat.item_index.get(v)
            if idx is None:
                unknown.append(v)
            else:
                out.append(idx)
        if unknown:
            raise bad(field, f"unknown item IDs: {unknown[:20]}" + (" ..." if len(unknown) > 20 else ""), unknown[:20])
        return out

    def show(item: int, form: type) -> int | str:
        return item if form is int else state["engine"].catalog.id2item[item]

    async def run(task: str, job: Any, bucket: int, request: Request) -> Any:
        # The deadline runs from the request's arrival: under load, parsing and validation wait for the event loop.
        elapsed = time.perf_counter() - request.state.arrived
        batcher = state["batchers"][task]
        foreseen = elapsed + throughput.wait_s(task, batcher.depth + batcher.running)
        try:
            if foreseen > settings.request_timeout_s / 2:
                raise QueueFull(
                    f"{task} would be served in about {foreseen:.1f} s, over half the "
                    f"{settings.request_timeout_s:g} s deadline"
                )
            future = batcher.submit(job, bucket)
        except QueueFull as exc:
            raise HTTPException(
                429, detail=[{"loc": [], "msg": str(exc), "input": None}], headers={"Retry-After": "1"}
            ) from None

        async def disconnected() -> None:
            while True:
                message = await request.receive()
                if message["type"] == "http.disconnect":
                    return

        watcher = asyncio.ensure_future(disconnected())
        try:
            done, _ = await asyncio.wait(
                {future, watcher}, timeout=settings.request_timeout_s - elapsed, return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            watcher.cancel()
        if future in done:
            return future.result()
        future.cancel()  # frees its slot if its batch has not started
        if watcher in done:
            return Response(status_code=499)
        raise HTTPException(
            504,
            detail=[
                {"loc": [], "msg": f"not served within the {settings.request_timeout_s} s deadline", "input": None}
            ],
        )

    def ranked_response(task: str, result: Any, form: type, started: float) -> Response | RecommendResponse:
        """A ranked list in the ID form the request used (or the disconnect response, passed through)."""
        if isinstance(result, Response):
            return result
        metrics.tokens.labels(task).inc(result.tokens)
        return RecommendResponse(
            items=[{"item_id": show(i, form), "score": s} for i, s in result.items],
            model=state["label"],
            latency_ms=round(1000 * (time.perf_counter() - started), 2),
        )

    @app.post("/recommend/sequential", response_model=RecommendResponse, **guarded)
    async def recommend_sequential(body: SequentialRequest, request: Request):
        eng = engine()
        started = time.perf_counter()
        user, form = user_of(body.user_id)
        if body.history is None:
            history = eng.catalog.histories.get(user)
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
            history = items_of("history", body.history)
            form = type(body.history[0])
        banned = frozenset(items_of("exclude", body.exclude))
        if body.exclude_seen:
            banned |= frozenset(history)
        if len(banned) >= len(eng.catalog.item_tokens):
            raise bad("exclude", "every item is excluded; nothing is left to recommend", None)
        job = SequentialJob(user, history, body.k, banned)
        result = await run("sequential", job, eng.input_length("sequential", user, history) // 32, request)
        return ranked_response("sequential", result, form, started)

    @app.post("/recommend/topn", response_model=RecommendResponse, **guarded)
    async def recommend_topn(body: TopNRequest, request: Request):
        engine()
        started = time.perf_counter()
        user, _ = user_of(body.user_id)
        candidates = items_of("candidates", body.candidates)
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
        job = TopNJob(user, candidates, min(body.k, len(candidates)), body.mode)
        result = await run("topn", job, len(candidates) // 25, request)
        return ranked_response("topn", result, form, started)

    @app.post("/explain", response_model=ExplainResponse, **guarded)
    async def explain(body: ExplainRequest, request: Request):
        engine()
        started = time.perf_counter()
        user, _ = user_of(body.user_id)
        (item,) = items_of("item_id", [body.item_id])
        result = await run("explanation", ExplainJob(user, item, body.max_tokens), 0, request)
        if isinstance(result, Response):
            return result
        text, score, tokens = result
        metrics.tokens.labels("explanation").inc(tokens)
        return ExplainResponse(
            explanation=text,
            score=score,
            model=state["label"],
            latency_ms=round(1000 * (time.perf_counter() - started), 2),
        )

    @app.get("/healthz")
    async def healthz():
        return {"status": "alive"}

    @app.get("/readyz", responses={503: {"description": "loading or shutting down"}})
    async def readyz():
        if not state["ready"]:
            return JSONResponse(status_code=503, content={"status": "not ready"})
        return {"status": "ready", "model": state["label"]}

    @app.get("/metrics", response_class=PlainTextResponse)
    async def prometheus():
        return PlainTextResponse(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app
