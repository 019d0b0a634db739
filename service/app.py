"""The HTTP layer: FastAPI endpoints, validation into jobs, one dynamic batcher per task, metrics and logs.

It knows requests and IDs; the batcher (`service.batcher`) knows queues, and the engine (`service.engine`)
knows the model. Bad input is answered 4xx with the field and the offending values; never 500.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from pod.dataset import MAX_HISTORY
from service.batcher import Batcher, QueueFull
from service.engine import Catalog, Engine, ExplainJob, SequentialJob, TopNJob
from service.metrics import Metrics
from service.schemas import ExplainRequest, ExplainResponse, RecommendResponse, SequentialRequest, TopNRequest
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
    )
    return engine, label


def create_app(settings: ServeSettings) -> FastAPI:
    metrics = Metrics()
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
                metrics.on_batch,
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

    @app.middleware("http")
    async def request_context(request: Request, call_next):
        rid = request.headers.get("x-request-id") or uuid.uuid4().hex
        request.state.request_id = rid
        started = time.perf_counter()
        length = request.headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > settings.max_body_bytes):
            response: Response = JSONResponse(
                status_code=413,
                content={
                    "detail": [
                        {
                            "loc": ["body"],
                            "msg": f"body of {length} bytes is over the {settings.max_body_bytes}-byte limit",
                            "input": None,
                        }
                    ]
                },
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
        try:
            future = state["batchers"][task].submit(job, bucket)
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
                {future, watcher}, timeout=settings.request_timeout_s, return_when=asyncio.FIRST_COMPLETED
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

    @app.post("/recommend/sequential", response_model=RecommendResponse)
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

    @app.post("/recommend/topn", response_model=RecommendResponse)
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

    @app.post("/explain", response_model=ExplainResponse)
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

    @app.get("/readyz")
    async def readyz():
        if not state["ready"]:
            return JSONResponse(status_code=503, content={"status": "not ready"})
        return {"status": "ready", "model": state["label"]}

    @app.get("/metrics")
    async def prometheus():
        return PlainTextResponse(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app
