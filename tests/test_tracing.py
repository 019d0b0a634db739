"""OpenTelemetry tracing: off by default and free, and when on, spans from the HTTP request down to each decoder
step, recorded by the SDK's in-memory exporter from the real app (lifespan, batchers, model thread) in-process."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

pytest.importorskip("opentelemetry.sdk.trace")
pytest.importorskip("fastapi")

from fastapi.testclient import TestClient  # noqa: E402
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter  # noqa: E402
from opentelemetry.trace import SpanKind  # noqa: E402

from pod import tracing as pod_tracing  # noqa: E402
from service import tracing  # noqa: E402
from service.app import create_app  # noqa: E402
from service.settings import ServeSettings  # noqa: E402

REQUESTS = [
    ("trace-seq", "/recommend/sequential", {"user_id": 5, "k": 5}),
    ("trace-topn", "/recommend/topn", {"user_id": 5, "candidates": list(range(1, 31)), "k": 5}),
    ("trace-explain", "/explain", {"user_id": 5, "item_id": 3, "max_tokens": 8}),
]
TASKS = {"/recommend/sequential": "sequential", "/recommend/topn": "topn", "/explain": "explanation"}
CLIENT_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"


def settings_for(bundle, **kw) -> ServeSettings:
    return ServeSettings(bundle=str(bundle), threads=1, warmup=False, max_wait_ms=1, **kw)


def children(spans, parent) -> list:
    return [s for s in spans if s.parent is not None and s.parent.span_id == parent.context.span_id]


def test_spans_cover_a_request_from_http_to_each_decoder_step(exported_bundle):
    exporter = InMemorySpanExporter()
    with TestClient(create_app(settings_for(exported_bundle, tracing=True), span_exporter=exporter)) as client:
        assert pod_tracing.tracer() is not None
        for rid, path, body in REQUESTS:
            headers = {"X-Request-ID": rid}
            if rid == "trace-seq":  # a caller's W3C trace context: the request joins the caller's trace
                headers["traceparent"] = f"00-{CLIENT_TRACE}-00f067aa0ba902b7-01"
            r = client.post(path, json=body, headers=headers)
            assert r.status_code == 200 and r.headers["x-request-id"] == rid, r.text
    assert pod_tracing.tracer() is None  # the lifespan's end turned tracing off (and flushed)
    spans = exporter.get_finished_spans()
    names = {s.name for s in spans}
    assert {"queue.wait", "batch", "encoder", "search", "decoder.step"} <= names, names

    for rid, path, _ in REQUESTS:
        (request,) = [s for s in spans if s.kind == SpanKind.SERVER and s.attributes.get("request_id") == rid]
        assert request.name == f"POST {path}"
        assert request.attributes["http.route"] == request.attributes["url.path"] == path
        assert request.attributes["http.request.method"] == "POST"
        assert request.attributes["http.response.status_code"] == 200
        if rid == "trace-seq":
            assert format(request.context.trace_id, "032x") == CLIENT_TRACE
        else:
            assert request.parent is None

        (wait,) = children(spans, request)
        assert wait.name == "queue.wait" and wait.attributes["request_id"] == rid
        assert wait.attributes["task"] == TASKS[path] and "dropped" not in wait.attributes
        assert [e.name for e in wait.events] == ["batch.formed"]
        assert wait.start_time <= wait.events[0].timestamp <= wait.end_time

        # the batch runs in the model thread for several requests: its own trace, linked to each request
        (batch,) = [s for s in spans if s.name == "batch" and rid in s.attributes["request_ids"]]
        assert batch.attributes["task"] == TASKS[path] and batch.attributes["batch.size"] == 1
        assert batch.attributes["model"].startswith("pod-onnx-fp32@") and batch.attributes["model.generation"] == 0
        assert [(link.context.span_id, link.attributes["request_id"]) for link in batch.links] == [
            (request.context.span_id, rid)
        ]
        assert [link.context.span_id for link in wait.links] == [batch.context.span_id]
        assert wait.end_time <= batch.start_time + 1_000_000  # the wait ends as the batch starts (ns; 1 ms slack)

        inner = children(spans, batch)
        assert [s.name for s in inner] == ["encoder", "search"], [s.name for s in inner]
        encoder, search = inner
        assert encoder.attributes["task"] == TASKS[path] and encoder.attributes["rows"] == 1
        # top-N candidates of one-token ids are read under the sequential prompt (DecodingConfig.topn_prompt)
        assert encoder.attributes["prompt"] == ("sequential" if path == "/recommend/topn" else TASKS[path])
        assert search.attributes["task"] == TASKS[path] and search.attributes["mode"] in ("beam", "one_step")
        steps = children(spans, search)
        assert steps and {s.name for s in steps} == {"decoder.step"}
        assert [s.attributes["step"] for s in steps] == list(range(len(steps)))
        assert all(s.attributes["rows"] >= 1 for s in steps)
        if path == "/explain":  # a sentence: one decoder call per token
            assert len(steps) > 1 and search.attributes["beams"] == 21


def test_queue_wait_of_a_job_never_served_ends_dropped_once():
    exporter = InMemorySpanExporter()
    provider = tracing.setup_tracing(SimpleNamespace(tracing=True), exporter)
    try:
        request = SimpleNamespace(state=SimpleNamespace(span=None, request_id="gone"))
        job = tracing.queued(request, "sequential")
        job.left()
        job.left()
        job.started(job.wait.get_span_context())  # too late: ended once, as dropped
    finally:
        tracing.shutdown_tracing(provider)
    (wait,) = exporter.get_finished_spans()
    assert wait.name == "queue.wait" and wait.attributes["dropped"] is True and not wait.links
    assert pod_tracing.tracer() is None


def test_tracing_is_off_by_default_and_records_nothing(exported_bundle):
    settings = settings_for(exported_bundle)
    assert settings.tracing is False
    assert pod_tracing.tracer() is None
    noop = pod_tracing.span("encoder", task="sequential", rows=1)
    assert noop is pod_tracing.span("decoder.step") and noop.__enter__() is None  # one shared no-op
    exporter = InMemorySpanExporter()
    assert tracing.setup_tracing(settings, exporter) is None
    with TestClient(create_app(settings, span_exporter=exporter)) as client:
        assert pod_tracing.tracer() is None
        for rid, path, body in REQUESTS:
            assert client.post(path, json=body, headers={"X-Request-ID": rid}).status_code == 200
    assert exporter.get_finished_spans() == ()
