"""Day-two operations on a real server: model swaps under load, item availability (issue 16)."""

from __future__ import annotations

import json
import shutil
import threading
import time

import httpx
import pytest

from tests.test_service import metric, post, serve

TOKEN = "an-admin-token-of-32-characters!"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def unlabeled(url: str, name: str) -> float:
    line = next(x for x in httpx.get(url + "/metrics").text.splitlines() if x.startswith(name + " "))
    return float(line.split()[1])


@pytest.fixture(scope="module")
def int8_bundle(trained_sequential, default_synth, tmp_path_factory):
    """A second, different model (int8 weights, so another label) to swap to."""
    from export.export import export_bundle

    out = tmp_path_factory.mktemp("bundles") / "int8"
    export_bundle(trained_sequential, out, data=default_synth, quantize="int8", force=True, log=lambda *_: None)
    return out


def test_admin_is_off_without_a_token_and_closed_without_the_right_one(exported_bundle):
    with serve(exported_bundle) as (url, _):
        r = httpx.get(url + "/admin/availability")
        assert r.status_code == 403 and "POD_API_TOKEN" in r.json()["detail"][0]["msg"]
        r = httpx.post(url + "/admin/model", json={"bundle": str(exported_bundle)})
        assert r.status_code == 403
    with serve(exported_bundle, api_token=TOKEN) as (url, _):
        assert httpx.get(url + "/admin/availability").status_code == 401
        bad = {"Authorization": "Bearer " + "x" * 32}
        assert httpx.get(url + "/admin/availability", headers=bad).status_code == 401


def test_unavailable_items_are_never_recommended_and_the_list_survives_a_restart(exported_bundle, tmp_path):
    file = tmp_path / "unavailable.json"
    with serve(exported_bundle, api_token=TOKEN, availability_file=file) as (url, _):
        first = post(url, "/recommend/sequential", {"user_id": 5, "k": 10}, headers=AUTH).json()["items"]
        gone = [x["item_id"] for x in first[:3]]  # the model's favourites
        r = post(url, "/admin/availability", {"unavailable": gone + ["P00001"]}, headers=AUTH)
        assert r.status_code == 200, r.text
        assert len(r.json()["unavailable"]) == 4 and unlabeled(url, "pod_unavailable_items") == 4
        assert json.loads(file.read_text()) == r.json()["unavailable"]
        for user in (5, 6, 7):
            items = [
                x["item_id"]
                for x in post(url, "/recommend/sequential", {"user_id": user}, headers=AUTH).json()["items"]
            ]
            assert not set(items) & set(gone + [1]) and len(items) == 10
        cands = gone + list(range(40, 60))
        for mode in ("beam", "score"):
            r = post(url, "/recommend/topn", {"user_id": 5, "candidates": cands, "k": 20, "mode": mode}, headers=AUTH)
            assert r.status_code == 200 and not {x["item_id"] for x in r.json()["items"]} & set(gone)
        r = post(url, "/recommend/topn", {"user_id": 5, "candidates": gone[:2]}, headers=AUTH)
        assert r.status_code == 422 and "unavailable" in r.text
        r = post(url, "/admin/availability", {"unavailable": [99999]}, headers=AUTH)
        assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "unavailable"]
        r = post(url, "/admin/availability", {"unavailable": [gone[0]], "available": [gone[0]]}, headers=AUTH)
        assert r.status_code == 422
    with serve(exported_bundle, api_token=TOKEN, availability_file=file) as (url, _):  # a restart keeps the list
        assert len(httpx.get(url + "/admin/availability", headers=AUTH).json()["unavailable"]) == 4
        post(url, "/admin/availability", {"available": gone}, headers=AUTH)
        again = post(url, "/recommend/sequential", {"user_id": 5, "k": 10}, headers=AUTH).json()["items"]
        assert [x["item_id"] for x in again] == [x["item_id"] for x in first]  # re-enabled: the same answer


def test_model_swaps_under_load_lose_no_request_and_refuse_a_damaged_bundle(exported_bundle, int8_bundle, tmp_path):
    damaged = tmp_path / "damaged"
    shutil.copytree(int8_bundle, damaged)
    onnx = next(damaged.rglob("*.onnx"))
    onnx.write_bytes(onnx.read_bytes()[:-64] + b"\0" * 64)  # same size, wrong bytes: only the hash can tell
    # warnings only: nobody reads the server's stdout pipe during the load, and a full pipe would block it
    with serve(exported_bundle, api_token=TOKEN, max_wait_ms=2, log_level="warning") as (url, _):
        before = httpx.get(url + "/readyz").json()["model"]
        seen: list[list[tuple[int, str]]] = [[], [], []]  # per client, in order
        stop = threading.Event()

        def load(mine: list[tuple[int, str]]) -> None:
            with httpx.Client(timeout=30, headers=AUTH) as client:
                n = 0
                while not stop.is_set():
                    r = client.post(url + "/recommend/sequential", json={"user_id": 1 + n % 50, "k": 5})
                    mine.append((r.status_code, r.json().get("model", r.text)))
                    n += 1

        workers = [threading.Thread(target=load, args=(mine,)) for mine in seen]
        for w in workers:
            w.start()
        time.sleep(1.0)
        r = post(url, "/admin/model", {"bundle": str(int8_bundle)}, headers=AUTH, timeout=120)
        assert r.status_code == 200, r.text
        after = r.json()["model"]
        assert r.json()["previous"] == before and after != before and after.startswith("pod-onnx-int8@")
        time.sleep(1.0)
        r = post(url, "/admin/model", {"bundle": str(damaged)}, headers=AUTH, timeout=120)
        assert r.status_code == 422 and "SHA-256" in r.text and r.json()["detail"][0]["loc"] == ["body", "bundle"]
        r = post(url, "/admin/model", {"checkpoint": "/nowhere"}, headers=AUTH)
        assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "bundle"]
        time.sleep(1.0)
        stop.set()
        for w in workers:
            w.join()
        assert httpx.get(url + "/readyz").json()["model"] == after
        answers = [a for mine in seen for a in mine]
        assert len(answers) > 30 and all(code == 200 for code, _ in answers), [a for a in answers if a[0] != 200][:3]
        for mine in seen:  # each client sees the version change exactly once, from the old to the new
            labels = [label for _, label in mine]
            assert labels[0] == before and labels[-1] == after
            assert sum(a != b for a, b in zip(labels, labels[1:])) == 1
        assert metric(url, "pod_model_info", f'model="{after}"') == 1
        assert metric(url, "pod_model_info", f'model="{before}"') == 0
        assert metric(url, "pod_answers_total", f'model="{after}",task="sequential"') > 0
