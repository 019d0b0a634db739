"""Early shedding (`service.middleware.Shed`): a request its task would refuse gets 429 before its body is read.

First the middleware alone, as plain ASGI with a fake app state (no server); then a real `pod serve` whose
queue is held full, answering 429 to bodies it would otherwise refuse with 422, 413 or 401.
"""

from __future__ import annotations

import asyncio
import json
import re
import socket
import threading
import time
from types import SimpleNamespace

import httpx
import pytest

from reliability.server import serve
from service.admission import RETRY_AFTER_S, Admission
from service.metrics import Metrics
from service.middleware import Shed

TOKEN = "a-long-enough-test-token-0123456789"
SEQ = "/recommend/sequential"


class FakeQueue:
    def __init__(self, depth: int = 0, max_queue: int = 4) -> None:
        self.depth, self.running, self.max_queue = depth, 0, max_queue


def state(depth: int = 0, ready: bool = True, max_in_flight: int = 0) -> SimpleNamespace:
    queue = FakeQueue(depth)
    return SimpleNamespace(
        ready=ready,
        admission=Admission(10.0, max_in_flight=max_in_flight),
        batchers={"sequential": queue, "topn": FakeQueue(), "explanation": FakeQueue()},
        metrics=Metrics(),
    )


def call(st: SimpleNamespace, path: str = SEQ, method: str = "POST", headers=(), downstream=None) -> list[dict]:
    """Run `Shed` on one request; returns what it sent. The body may not be read: `receive` fails the test."""
    return asyncio.run(shed(st, path, method, headers, downstream))


async def shed(st: SimpleNamespace, path: str = SEQ, method: str = "POST", headers=(), downstream=None) -> list[dict]:
    sent: list[dict] = []

    async def receive():
        raise AssertionError("the body was read")

    async def send(message):
        sent.append(message)

    async def passed(scope, receive, send):
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})

    scope = {
        "type": "http",
        "method": method,
        "path": path,
        "headers": [(k.encode(), v.encode()) for k, v in headers],
        "app": SimpleNamespace(state=st),
    }
    await Shed(downstream or passed)(scope, receive, send)
    return sent


def sample(metrics: Metrics, name: str, labels: dict[str, str]) -> float:
    return metrics.registry.get_sample_value(name, labels) or 0.0


def test_a_full_queue_is_refused_before_the_body_is_read():
    st = state(depth=4)
    start, body = call(st, headers=[("x-request-id", "req-1"), ("content-length", "999999999")])
    assert start["status"] == 429
    headers = dict(start["headers"])
    assert headers[b"retry-after"] == str(RETRY_AFTER_S).encode() and headers[b"x-request-id"] == b"req-1"
    assert headers[b"content-type"] == b"application/json"
    assert int(headers[b"content-length"]) == len(body["body"])
    assert json.loads(body["body"]) == {
        "detail": [{"loc": [], "msg": "sequential queue is full (4 waiting)", "input": None}]
    }
    # metered once, as the access-log middleware meters the rest
    assert sample(st.metrics, "pod_errors_total", {"code": "429"}) == 1
    labels = {"endpoint": SEQ, "status": "429"}
    assert sample(st.metrics, "pod_request_latency_seconds_count", labels) == 1
    assert st.admission.in_flight == {}  # a refused request is not in flight


def test_an_untame_request_id_is_replaced():
    start, _ = call(state(depth=4), headers=[("x-request-id", "no spaces allowed")])
    rid = dict(start["headers"])[b"x-request-id"].decode()
    assert re.fullmatch(r"[0-9a-f]{32}", rid)


def test_a_request_with_room_goes_through_and_is_in_flight_until_answered():
    st = state(depth=3)
    seen: list[int] = []

    async def downstream(scope, receive, send):
        seen.append(st.admission.in_flight["sequential"])
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})

    start, _ = call(st, downstream=downstream)
    assert start["status"] == 200 and seen == [1] and st.admission.in_flight == {"sequential": 0}
    assert sample(st.metrics, "pod_errors_total", {"code": "429"}) == 0  # the inner middleware meters it


def test_a_failing_request_leaves_the_in_flight_count():
    st = state()

    async def downstream(scope, receive, send):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        call(st, downstream=downstream)
    assert st.admission.in_flight == {"sequential": 0}


def test_the_in_flight_limit_refuses_at_the_door():
    st = state(max_in_flight=1)
    inner: list[dict] = []

    async def downstream(scope, receive, send):  # while this request is in flight, another one arrives
        inner.extend(await shed(st))
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})

    start, _ = call(st, downstream=downstream)
    assert start["status"] == 200 and inner[0]["status"] == 429
    assert "sequential has 1 requests in flight" in json.loads(inner[1]["body"])["detail"][0]["msg"]


@pytest.mark.parametrize(
    "path,method,ready",
    [
        ("/recommend/topn", "POST", True),  # another task: its own queue has room
        (SEQ, "GET", True),  # not a recommendation (405 comes from the router)
        ("/healthz", "GET", True),
        ("/admin/model", "POST", True),
        (SEQ, "POST", False),  # loading or shutting down: the route answers 503
    ],
)
def test_only_recommendations_of_a_full_task_are_shed(path, method, ready):
    st = state(depth=4, ready=ready)
    start, _ = call(st, path=path, method=method)
    assert start["status"] == 200


# A real server ---------------------------------------------------------------------------------------------------


def metric(url: str, name: str, labels: str) -> float:
    text = httpx.get(url + "/metrics", timeout=10).text
    m = re.search(rf"^{re.escape(name)}\{{{re.escape(labels)}\}} (\S+)$", text, re.M)
    return float(m.group(1)) if m else 0.0


def raw_post(url: str, head: str, timeout: float = 5.0) -> tuple[str, float]:
    """Send only a request's head (its body never follows) and return the status line and the time taken."""
    host, port = url.removeprefix("http://").split(":")
    started = time.perf_counter()
    with socket.create_connection((host, int(port)), timeout=timeout) as s:
        s.sendall(head.encode())
        answer = s.recv(4096).decode("latin-1")
    return answer.split("\r\n", 1)[0], time.perf_counter() - started


def test_with_its_queue_full_the_server_answers_429_without_reading_the_body(exported_bundle):
    """Two requests held in the queue (a batch closes after 3 s) fill it; then bodies that would be a 422, a
    413, a 401 are all 429, at once, and a head announcing 10 MB is answered before any of its body is sent."""
    settings = dict(max_queue=2, max_batch_size=64, max_wait_ms=3000, api_token=TOKEN, log_level="warning")
    auth = {"authorization": f"Bearer {TOKEN}"}
    with serve(exported_bundle, **settings) as server:
        url = server.url
        held: list[httpx.Response] = []
        threads = [
            threading.Thread(
                target=lambda: held.append(httpx.post(url + SEQ, json={"user_id": 5}, headers=auth, timeout=30))
            )
            for _ in range(2)
        ]
        for t in threads:
            t.start()
        deadline = time.time() + 10
        while metric(url, "pod_queue_depth", 'task="sequential"') < 2 and time.time() < deadline:
            time.sleep(0.05)
        assert metric(url, "pod_queue_depth", 'task="sequential"') == 2

        started = time.perf_counter()
        invalid = httpx.post(url + SEQ, content=b"{not json", headers=auth, timeout=10)
        oversize = httpx.post(url + SEQ, content=b"x" * (300 * 1024), headers=auth, timeout=10)
        anonymous = httpx.post(url + SEQ, json={"user_id": 5}, timeout=10)
        quick = time.perf_counter() - started
        status, seconds = raw_post(
            url,
            f"POST {SEQ} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n"
            "Content-Type: application/json\r\nContent-Length: 10000000\r\n\r\n",
        )
        other_task = httpx.post(url + "/recommend/topn", content=b"{not json", headers=auth, timeout=10)

        for r in (invalid, oversize, anonymous):
            assert r.status_code == 429, r.text
            assert r.headers["retry-after"] == "1" and r.headers["x-request-id"]
            assert r.json()["detail"][0]["msg"] == "sequential queue is full (2 waiting)"
        assert status == "HTTP/1.1 429 Too Many Requests" and seconds < 2.0
        assert quick < 2.0  # while the held requests still wait for their batch
        assert other_task.status_code == 422  # the top-N queue is empty: parsed as usual

        for t in threads:
            t.join(30)
        assert [r.status_code for r in held] == [200, 200]
        # the queue has drained: the same bodies get their usual answers
        assert httpx.post(url + SEQ, content=b"{not json", headers=auth, timeout=10).status_code == 422
        assert httpx.post(url + SEQ, json={"user_id": 5}, timeout=10).status_code == 401
        # each 429 counted once, under the endpoint like any other answer
        assert metric(url, "pod_errors_total", 'code="429"') == 4
        assert metric(url, "pod_request_latency_seconds_count", f'endpoint="{SEQ}",status="429"') == 4
