"""The service against a real uvicorn server on loopback, serving a bundle exported from a trained model."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from tests.conftest import ROOT


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def serve(bundle: Path, **settings):
    port = free_port()
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "POD_BUNDLE": str(bundle),
        "POD_PORT": str(port),
        "POD_THREADS": "1",
        **{f"POD_{k.upper()}": str(v) for k, v in settings.items()},
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "cli.main", "serve"],
        env=env,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 90
        while time.time() < deadline:
            try:
                if httpx.get(f"{url}/readyz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if proc.poll() is not None:
                raise RuntimeError(f"server exited: {proc.stdout.read()}")
            time.sleep(0.2)
        else:
            raise RuntimeError("server did not become ready")
        yield url, proc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def server(exported_bundle):
    with serve(exported_bundle, max_wait_ms=2, max_history=50) as (url, proc):
        yield url


def post(url: str, path: str, body, **kw) -> httpx.Response:
    kw.setdefault("timeout", 30)
    return httpx.post(url + path, json=body, **kw)


def metric(url: str, name: str, labels: str) -> float:
    text = httpx.get(url + "/metrics").text
    m = re.search(rf"^{re.escape(name)}\{{{re.escape(labels)}\}} (\S+)$", text, re.M)
    return float(m.group(1)) if m else 0.0


def test_happy_paths(server, exported_bundle):
    r = post(server, "/recommend/sequential", {"user_id": 5, "k": 5}, headers={"X-Request-ID": "abc"})
    assert r.status_code == 200 and r.headers["x-request-id"] == "abc"
    body = r.json()
    ids = [x["item_id"] for x in body["items"]]
    history = next(
        line for line in (exported_bundle / "histories.txt").read_text().splitlines() if line.split()[0] == "5"
    ).split()[1:]
    assert len(ids) == len(set(ids)) == 5 and all(isinstance(i, int) for i in ids)
    assert not {str(i) for i in ids} & set(history)  # exclude_seen
    assert body["model"].startswith("pod-onnx-fp32@") and body["latency_ms"] > 0
    scores = [x["score"] for x in body["items"]]
    assert scores == sorted(scores, reverse=True)
    # raw IDs in, raw IDs out
    r = post(
        server,
        "/recommend/sequential",
        {"user_id": "U00005", "history": ["P00011", "P00012"], "k": 3, "exclude": ["P00013"]},
    )
    assert r.status_code == 200
    raw = [x["item_id"] for x in r.json()["items"]]
    assert all(isinstance(i, str) and i.startswith("P") for i in raw) and not {"P00011", "P00012", "P00013"} & set(raw)
    # a user unknown at training time is served from the history alone; unknown items in `exclude` are ignored
    r = post(server, "/recommend/sequential", {"user_id": "U-new", "history": ["P00011"], "exclude": ["P-gone"]})
    assert r.status_code == 200 and len(r.json()["items"]) == 10
    r = post(server, "/recommend/sequential", {"user_id": "U-new"})
    assert r.status_code == 422 and "unknown user" in r.text
    cands = list(range(1, 101))
    for mode in ("beam", "score"):
        r = post(server, "/recommend/topn", {"user_id": 5, "candidates": cands, "k": 10, "mode": mode})
        assert r.status_code == 200
        got = [x["item_id"] for x in r.json()["items"]]
        assert len(got) == len(set(got)) == 10 and set(got) <= set(cands)
    r = post(server, "/explain", {"user_id": 5, "item_id": 3, "max_tokens": 12})
    assert r.status_code == 200 and isinstance(r.json()["explanation"], str) and r.json()["score"] <= 0
    assert httpx.get(server + "/healthz").json() == {"status": "alive"}
    assert httpx.get(server + "/readyz").json()["status"] == "ready"
    assert httpx.get(server + "/docs").status_code == 200


BAD = [
    ({"user_id": 99999}, "/recommend/sequential", "user_id", "99999"),
    ({"user_id": "nobody"}, "/recommend/sequential", "user_id", "nobody"),
    ({"user_id": 5, "history": [1, 77777, "zz"]}, "/recommend/sequential", "history", "77777"),
    ({"user_id": 5, "history": []}, "/recommend/sequential", "history", "empty"),
    ({"user_id": 5, "history": list(range(1, 61))}, "/recommend/sequential", "history", "limit is 50"),
    ({"user_id": 5, "k": 0}, "/recommend/sequential", "k", "greater than or equal to 1"),
    ({"user_id": 5, "k": 21}, "/recommend/sequential", "k", "less than or equal to 20"),
    ({"user_id": [5]}, "/recommend/sequential", "user_id", ""),
    ({"user_id": 5, "k": "ten"}, "/recommend/sequential", "k", "integer"),
    ({"user_id": 5, "surprise": 1}, "/recommend/sequential", "surprise", "Extra inputs"),
    ({"user_id": 5, "candidates": [1, 2, 2, 3]}, "/recommend/topn", "candidates", "duplicate candidates: [2]"),
    ({"user_id": 5, "candidates": [1]}, "/recommend/topn", "candidates", "at least 2"),
    ({"user_id": 5, "candidates": list(range(1, 1002))}, "/recommend/topn", "candidates", "at most 1000"),
    ({"user_id": 5, "candidates": [1, 2, 3], "k": 30}, "/recommend/topn", "k", "use mode 'score'"),
    ({"user_id": 5, "candidates": [1, 2], "mode": "fast"}, "/recommend/topn", "mode", "beam"),
    ({"user_id": 5, "item_id": "nope"}, "/explain", "item_id", "nope"),
    ({"user_id": 5, "item_id": 3, "max_tokens": 0}, "/explain", "max_tokens", "greater than or equal"),
    ({"item_id": 3}, "/explain", "user_id", "Field required"),
]


@pytest.mark.parametrize("body,path,field,text", BAD)
def test_bad_input_gets_a_4xx_naming_the_field(server, body, path, field, text):
    r = post(server, path, body)
    assert 400 <= r.status_code < 500, r.text
    detail = r.json()["detail"]
    assert any(field in map(str, d["loc"]) for d in detail), detail
    assert text in json.dumps(detail), detail


STRICT = [
    ({"user_id": 5, "k": "5"}, "/recommend/sequential", "k"),
    ({"user_id": 5, "k": 5.0}, "/recommend/sequential", "k"),
    ({"user_id": 5, "k": True}, "/recommend/sequential", "k"),
    ({"user_id": 5, "exclude_seen": 1}, "/recommend/sequential", "exclude_seen"),
    ({"user_id": True}, "/recommend/sequential", "user_id"),
    ({"user_id": 5, "history": [1.0, 2]}, "/recommend/sequential", "history"),
    ({"user_id": 5, "candidates": [1, 2], "k": "2"}, "/recommend/topn", "k"),
    ({"user_id": 5, "item_id": 3, "max_tokens": 8.0}, "/explain", "max_tokens"),
]


@pytest.mark.parametrize("body,path,field", STRICT)
def test_wrong_json_types_are_refused_not_coerced(server, body, path, field):
    """`"k": "5"` or `"k": 5.0` is a client's mistake: a 422 naming the field, not an answer for k=5."""
    r = post(server, path, body)
    assert r.status_code == 422, r.text
    detail = r.json()["detail"]
    assert detail and all(d["loc"][:2] == ["body", field] for d in detail), detail
    assert all(d["msg"].startswith("Input should be a valid") for d in detail), detail


def test_malformed_and_oversized_bodies(server):
    r = httpx.post(server + "/recommend/sequential", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 422 and "JSON" in r.text
    big = json.dumps({"user_id": 5, "history": list(range(1, 200000))}).encode()
    r = httpx.post(server + "/recommend/sequential", content=big, headers={"content-type": "application/json"})
    assert r.status_code == 413 and "limit" in r.text


def test_concurrent_requests_are_batched_and_equal_their_unbatched_answers(exported_bundle):
    users = list(range(1, 9))
    with serve(exported_bundle, max_wait_ms=300, max_batch_size=8) as (url, _):
        results: dict[int, dict] = {}

        def call(u):
            results[u] = post(url, "/recommend/sequential", {"user_id": u, "k": 10}).json()

        threads = [threading.Thread(target=call, args=(u,)) for u in users]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        batches = metric(url, "pod_batch_size_count", 'task="sequential"')  # warm-up bypasses the batcher
        jobs = metric(url, "pod_batch_size_sum", 'task="sequential"')
        assert jobs == 8 and batches < 8  # some batch held more than one request
        for u in users:  # now one at a time: each alone in its batch
            alone = post(url, "/recommend/sequential", {"user_id": u, "k": 10}).json()
            assert [x["item_id"] for x in alone["items"]] == [x["item_id"] for x in results[u]["items"]]
            for a, b in zip(alone["items"], results[u]["items"]):
                assert a["score"] == pytest.approx(b["score"], abs=1e-4)
        text = httpx.get(url + "/metrics").text
        for name in (
            "pod_request_latency_seconds_bucket",
            "pod_queue_wait_seconds_bucket",
            "pod_model_seconds_bucket",
            "pod_tokens_generated_total",
            "pod_queue_depth",
            "pod_batch_size_bucket",
        ):
            assert name in text


def test_a_full_queue_answers_429_with_retry_after(exported_bundle):
    with serve(exported_bundle, max_queue=1, max_batch_size=1, max_wait_ms=0) as (url, _):
        codes, headers = [], []

        def call():
            r = post(
                url, "/recommend/topn", {"user_id": 5, "candidates": list(range(1, 101)), "k": 10, "mode": "score"}
            )
            codes.append(r.status_code)
            headers.append(r.headers.get("retry-after"))

        threads = [threading.Thread(target=call) for _ in range(24)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert 429 in codes and 200 in codes and set(codes) <= {200, 429}
        assert all(h == "1" for c, h in zip(codes, headers) if c == 429)
        assert metric(url, "pod_errors_total", 'code="429"') == codes.count(429)


def test_deadline_gives_504_and_a_client_that_leaves_frees_its_slot(exported_bundle):
    with serve(exported_bundle, max_wait_ms=600, max_batch_size=8, request_timeout_s=0.2) as (url, _):
        r = post(url, "/recommend/sequential", {"user_id": 3})
        assert r.status_code == 504 and "deadline" in r.text
    with serve(exported_bundle, max_wait_ms=600, max_batch_size=8) as (url, _):
        before = metric(url, "pod_batch_size_sum", 'task="sequential"')

        def leaver():
            with pytest.raises(httpx.TimeoutException):
                post(url, "/recommend/sequential", {"user_id": 3}, timeout=0.1)

        t = threading.Thread(target=leaver)
        t.start()
        time.sleep(0.25)
        assert post(url, "/recommend/sequential", {"user_id": 4}).status_code == 200
        t.join()
        assert metric(url, "pod_batch_size_sum", 'task="sequential"') - before == 1  # only the one that stayed


def test_sigterm_finishes_in_flight_requests(exported_bundle):
    with serve(exported_bundle, max_wait_ms=3000, max_batch_size=16) as (url, proc):
        codes = []

        def call(u):
            codes.append(post(url, "/recommend/sequential", {"user_id": u}).status_code)

        threads = [threading.Thread(target=call, args=(u,)) for u in range(1, 11)]
        for t in threads:
            t.start()
        deadline = time.time() + 20
        while metric(url, "pod_queue_depth", 'task="sequential"') < 10 and time.time() < deadline:
            time.sleep(0.05)  # all 10 admitted and waiting for their batch
        proc.send_signal(signal.SIGTERM)
        for t in threads:
            t.join()
        # uvicorn finishes the admitted requests, runs the shutdown, then re-raises SIGTERM to exit
        assert proc.wait(timeout=30) in (0, -signal.SIGTERM)
        assert codes == [200] * 10
        assert '"msg": "stopped"' in proc.stdout.read()


def test_allowed_normalizer_serves_valid_distinct_items(exported_bundle, default_synth):
    """`--normalizer allowed` (the fast scoring): k distinct known items, none from the history, best first."""
    from pod.dataset import PreparedData

    data = PreparedData.load(default_synth)
    user = data.users[3]
    history = data.sequences[user][-5:]
    with serve(exported_bundle, normalizer="allowed") as (url, _):
        r = post(url, "/recommend/sequential", {"user_id": user, "history": history, "k": 10})
        assert r.status_code == 200, r.text
        items = [x["item_id"] for x in r.json()["items"]]
        scores = [x["score"] for x in r.json()["items"]]
    assert len(items) == len(set(items)) == 10 and not set(items) & set(history)
    assert set(items) <= set(data.items) and scores == sorted(scores, reverse=True) and max(scores) <= 0.0
