"""What every request goes through, whatever its endpoint: early shedding (429 before the body is read), JSON
logs, the body-size limit, the request id, the access log and metrics, and the one error shape
(`{"detail": [{"loc", "msg", "input"}]}`).

Kept apart from the routes so that a handler only sees a request that is small enough, has an id, and
whose failures, of any kind, reach the client in that shape and never as a 500 with a stack trace.
"""

from __future__ import annotations

import json
import logging
import math
import re
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from service import tracing

log = logging.getLogger("pod.service")

REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")  # echoed in a header and logged: nothing else is taken
UNMETERED = ("/metrics", "/healthz", "/readyz")  # probes and scrapes would drown the latency histogram
TASKS = {"/recommend/sequential": "sequential", "/recommend/topn": "topn", "/explain": "explanation"}


class JsonFormatter(logging.Formatter):
    """One JSON object per line, so log shippers need no parsing rules; `extra={"fields": {...}}` adds keys."""

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
    """JSON lines for the `pod` loggers only, so libraries' own logging is left as they set it."""
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger("pod")
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    root.propagate = False


def too_large(size: str, limit: int) -> dict[str, Any]:
    return {"loc": ["body"], "msg": f"body of {size} bytes is over the {limit}-byte limit", "input": None}


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


def request_id(given: str) -> str:
    """The client's `X-Request-ID` when tame, else a new one."""
    return given if REQUEST_ID.fullmatch(given) else uuid.uuid4().hex


def record(metrics: Any, method: str, path: str, status: int, elapsed: float, rid: str) -> None:
    """Meter and log one answered request (the access log): every request is recorded here exactly once,
    by `Shed` when it refused the request at the door, else by `request_context`."""
    if path not in UNMETERED:
        metrics.latency.labels(path, str(status)).observe(elapsed)
    if status >= 400:
        metrics.errors.labels(str(status)).inc()
    if log.isEnabledFor(logging.INFO):
        log.info(
            "request",
            extra={
                "fields": {
                    "request_id": rid,
                    "method": method,
                    "path": path,
                    "status": status,
                    "ms": round(1000 * elapsed, 2),
                }
            },
        )


class Shed:
    """Early shedding, the outermost middleware (plain ASGI: no request object, no task, no body read): a
    recommendation request whose task would be refused anyway (`Admission.enter`: a full queue, a foreseen
    wait over half the deadline, `max_in_flight` requests of the task already in) is answered 429 with
    `Retry-After` at once, before its body is read or parsed and before the token is checked. Under a flood,
    refusing then costs tens of microseconds of the event loop instead of a parse and a validation, so the
    model thread keeps the interpreter for the requests it can serve. A 429 says only that the server is
    busy, so answering it before authentication reveals nothing. A request let through counts as in flight
    for its task until its answer is sent.

    Refused requests are metered and logged here (`record`), with an id (the client's when tame) in
    `X-Request-ID`; they make no trace span. Before the service is ready, everything goes through (the 503
    comes from the route's dependency)."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        task = TASKS.get(scope.get("path", "")) if scope["type"] == "http" and scope["method"] == "POST" else None
        state = scope["app"].state if task is not None else None
        if state is None or not state.ready:
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        admission = state.admission
        refused = admission.enter(task, state.batchers[task])
        if refused is None:
            try:
                await self.app(scope, receive, send)
            finally:
                admission.leave(task)
            return
        given = next((v for k, v in scope["headers"] if k == b"x-request-id"), b"").decode("latin-1")
        rid = request_id(given)
        body = json.dumps({"detail": [{"loc": [], "msg": str(refused), "input": None}]}).encode()
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
            (b"retry-after", str(refused.retry_after_s).encode()),
            (b"x-request-id", rid.encode()),
        ]
        await send({"type": "http.response.start", "status": 429, "headers": headers})
        await send({"type": "http.response.body", "body": body})
        record(state.metrics, scope["method"], scope["path"], 429, time.perf_counter() - started, rid)


async def request_context(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
    """Give the request an id (the client's when tame), refuse a declared oversize body before reading it,
    then log and meter the answer. `request.state.arrived` is where the request deadline starts: under load,
    parsing and validation wait for the event loop, and that wait is part of what the client sees. With tracing
    on, the request is a server span (`request.state.span`; None when off) carrying its id."""
    settings, metrics = request.app.state.settings, request.app.state.metrics
    rid = request_id(request.headers.get("x-request-id", ""))
    request.state.request_id = rid
    started = request.state.arrived = time.perf_counter()
    with tracing.request_span(request, rid) as span:
        request.state.span = span
        length = request.headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > settings.max_body_bytes):
            response: Response = JSONResponse(
                status_code=413, content={"detail": [too_large(length, settings.max_body_bytes)]}
            )
        else:
            response = await call_next(request)
        if span is not None:
            tracing.finish_request(span, request, response.status_code)
    response.headers["X-Request-ID"] = rid
    record(metrics, request.method, request.url.path, response.status_code, time.perf_counter() - started, rid)
    return response


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


async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    """Starlette's own errors (404, 405, 400 on an unreadable body) in the project's one error shape."""
    detail = exc.detail
    if not isinstance(detail, list):
        why = f" ({str(exc.__cause__)[:200]})" if exc.status_code == 400 and exc.__cause__ is not None else ""
        detail = [{"loc": [], "msg": f"{detail}{why}", "input": None}]
    return JSONResponse(status_code=exc.status_code, content={"detail": json_safe(detail)}, headers=exc.headers)


async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
    """FastAPI's 422, with the echoed input made encodable (see `json_safe`)."""
    return JSONResponse(status_code=422, content={"detail": json_safe(exc.errors())})


async def unexpected(request: Request, exc: Exception) -> JSONResponse:
    """A bug is logged with its stack and the request id; the client learns only that it was ours."""
    log.error("internal error", exc_info=exc, extra={"fields": {"request_id": request.state.request_id}})
    return JSONResponse(status_code=500, content={"detail": [{"loc": [], "msg": "internal error", "input": None}]})
