"""What every request goes through, whatever its endpoint: JSON logs, the body-size limit, the request id,
the access log and metrics, and the one error shape (`{"detail": [{"loc", "msg", "input"}]}`).

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


async def request_context(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
    """Give the request an id (the client's when tame), refuse a declared oversize body before reading it,
    then log and meter the answer. `request.state.arrived` is where the request deadline starts: under load,
    parsing and validation wait for the event loop, and that wait is part of what the client sees. With tracing
    on, the request is a server span (`request.state.span`; None when off) carrying its id."""
    settings, metrics = request.app.state.settings, request.app.state.metrics
    rid = request.headers.get("x-request-id", "")
    if not REQUEST_ID.fullmatch(rid):
        rid = uuid.uuid4().hex
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
    elapsed = time.perf_counter() - started
    response.headers["X-Request-ID"] = rid
    endpoint = request.url.path
    if endpoint not in UNMETERED:
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
