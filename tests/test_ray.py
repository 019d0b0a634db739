"""`pod serve --ray` on a real Ray cluster on loopback: a head and a worker node started here, 2 replicas behind
Ray's HTTP proxy, then Locust through the proxy while one replica's process is killed (issue 16)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from tests.conftest import ROOT

ray = pytest.importorskip("ray", reason="the `ray` extra is not installed (pip install 'pod-rec[ray]')")

from reliability.ray_replica_loss import (  # noqa: E402 (after the skip)
    RAY_ENV,
    Load,
    free_port,
    kill_a_replica,
    local_cluster,
    replica_loss,
    run_locust,
)
from tests.test_service import post, serve  # noqa: E402

BODY = {"user_id": 5, "k": 5}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """Two Ray nodes (1 CPU each, so one replica fits on each), always stopped afterwards."""
    with local_cluster(nodes=2, cpus_per_node=1, log_dir=tmp_path_factory.mktemp("ray")) as c:
        yield c


@pytest.fixture(scope="module")
def ray_server(cluster, exported_bundle, tmp_path_factory):
    """`pod serve --ray --replicas 2` deployed on the cluster; SIGTERM deletes the application at the end."""
    port = free_port()
    env = {**os.environ, **RAY_ENV, "PYTHONPATH": str(ROOT), "POD_LOG_LEVEL": "warning", "POD_THREADS": "1"}
    env = {k: v for k, v in env.items() if k != "POD_API_TOKEN"}
    log = tmp_path_factory.mktemp("ray-serve") / "serve.log"
    cmd = [sys.executable, "-m", "cli.main", "serve", "--ray", "--ray-address", cluster.address, "--replicas", "2"]
    cmd += ["--bundle", str(exported_bundle), "--port", str(port), "--max-wait-ms", "2"]
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        ready = threading.Event()
        for _ in range(900):  # up to 180 s: replicas load and warm up before the proxy sends them anything
            if proc.poll() is not None:
                raise RuntimeError(f"pod serve --ray exited: {log.read_text()[-3000:]}")
            if "ready on" in log.read_text():
                ready.set()
                break
            ready.wait(0.2)
        assert ready.is_set(), log.read_text()[-3000:]
        yield url, proc, log
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def test_ray_missing_is_one_clear_error(tmp_path):
    """Without the extra, `pod serve --ray` says what to install (exit 2), and the plain server never needs Ray."""
    code = (
        "import sys\n"
        "class NoRay:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] == 'ray':\n"
        "            raise ModuleNotFoundError(f'No module named {name!r}')\n"
        "sys.meta_path.insert(0, NoRay())\n"
        "from cli.main import main\n"
        f"sys.exit(main(['serve', '--ray', '--bundle', {str(tmp_path)!r}]))\n"
    )
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("POD_")}, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2, done.stderr
    assert "pip install 'pod-rec[ray]'" in done.stderr and len(done.stderr.strip().splitlines()) == 1
    done = subprocess.run(
        [sys.executable, "-m", "cli.main", "serve", "--ray", "--replicas", "2", "--max-replicas", "3"],
        env={**env, "POD_BUNDLE": str(tmp_path)},
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2 and "exclude each other" in done.stderr, done.stderr


def test_ray_replicas_answer_what_the_plain_server_answers(ray_server, exported_bundle):
    url, proc, log = ray_server
    r = httpx.get(url + "/readyz", timeout=10)
    assert r.status_code == 200 and r.json()["status"] == "ready", r.text
    with serve(exported_bundle, max_wait_ms=2) as (plain, _):
        expected = post(plain, "/recommend/sequential", BODY).json()
    got = post(url, "/recommend/sequential", BODY)
    assert got.status_code == 200, got.text
    assert got.json()["items"] == expected["items"] and got.json()["model"] == expected["model"]
    assert post(url, "/recommend/sequential", {"user_id": 5, "k": 0}).status_code == 422  # our validation
    with ThreadPoolExecutor(16) as pool:  # concurrent requests spread over both replicas
        answers = list(pool.map(lambda _: post(url, "/recommend/sequential", BODY), range(64)))
    assert all(a.status_code == 200 and a.json()["items"] == expected["items"] for a in answers)
    assert len({a.headers["x-pod-replica"] for a in answers}) == 2


def test_losing_a_replica_under_locust_loses_only_its_own_requests(ray_server, cluster, exported_bundle, tmp_path):
    """Locust through the proxy, one replica SIGKILLed after 6 s: the requests that fail are the ones the dead
    replica held, no request answered by (or sent later to) a live replica fails, and Serve replaces it."""
    url, proc, log = ray_server
    killed: dict = {}

    def kill(locust: subprocess.Popen, started: float) -> None:
        threading.Event().wait(6)
        killed["pid"] = kill_a_replica(cluster, 1)
        import time

        killed["at"] = time.time()

    rows = run_locust(url, Load(Path(exported_bundle), users=8), 20, tmp_path, "loss", during=kill)
    loss = replica_loss(rows, killed["at"])
    assert loss["requests"] > 100 and loss["killed_replica"] and loss["new_replica"], loss
    assert loss["failed_answers_from_survivor"] == 0 and loss["failed_started_after_kill"] == 0, loss
    assert loss["failed"] == loss["in_flight_at_kill_failed"] <= 8, loss  # only what the dead replica held
    assert loss["s_until_new_replica_answers"] is not None and loss["s_until_new_replica_answers"] < 14, loss
    assert httpx.get(url + "/readyz", timeout=10).status_code == 200
