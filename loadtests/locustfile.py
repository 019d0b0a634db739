"""Locust scenario for `pod serve`: the traffic mix a recommender front-end would send.

Users and items come from the served bundle (`catalog.json`, `histories.txt`), so every valid request names
IDs the server knows and every invalid one is invalid on purpose. Point it at the bundle with
`POD_LOADTEST_BUNDLE` (the runner `loadtests/run.py` sets it from `--bundle`). Only the standard library and
Locust are imported, so the same file runs in the slim load-test image, on a laptop, or as distributed
master and workers (`locust -f loadtests/locustfile.py --master` / `--worker`).

The mix, as relative weights (env vars, integers, 0 turns a kind off):

| env | default | request |
|---|---|---|
| `POD_LOADTEST_W_SEQUENTIAL` | 40 | next items for a known user, history taken from the server's data |
| `POD_LOADTEST_W_SEQUENTIAL_HISTORY` | 20 | next items for an explicit history (raw string IDs half the time) |
| `POD_LOADTEST_W_TOPN` | 25 | top-N over 100 sampled candidates (`POD_LOADTEST_TOPN_MODE`: score, beam or both) |
| `POD_LOADTEST_W_EXPLAIN` | 10 | an explanation for a user and an item of their history |
| `POD_LOADTEST_W_INVALID` | 5 | a malformed request; a success only when the server answers 4xx |

When the server requires a bearer token, give it in `POD_LOADTEST_API_TOKEN` (else `POD_API_TOKEN` is used).
Invalid requests are reported under their own names (`... [invalid]`) so their latency does not blur the
valid ones'.
"""

from __future__ import annotations

import csv
import json
import os
import random
from pathlib import Path

from locust import FastHttpUser, between, events, task
from locust.runners import MasterRunner, WorkerRunner
from locust.stats import PERCENTILES_TO_REPORT, StatsCSV

SEQUENTIAL = "/recommend/sequential"
TOPN = "/recommend/topn"
EXPLAIN = "/explain"
ENDPOINTS = (SEQUENTIAL, TOPN, EXPLAIN)
INVALID_SUFFIX = " [invalid]"


class Catalog:
    """The IDs a load test may use, read once per process from a bundle directory."""

    def __init__(self, root: Path) -> None:
        catalog = json.loads((root / "catalog.json").read_text())
        self.id2user = {int(k): v for k, v in catalog["id2user"].items()}
        self.id2item = {int(k): v for k, v in catalog["id2item"].items()}
        self.histories: dict[int, list[int]] = {}
        for line in (root / "histories.txt").read_text().splitlines():
            nums = [int(x) for x in line.split()]
            if len(nums) > 1:
                self.histories[nums[0]] = nums[1:]
        self.users = sorted(self.histories)
        self.items = sorted(self.id2item)
        if not self.users or len(self.items) < 2:
            raise ValueError(f"{root}: the bundle has no users with a history or fewer than 2 items")

    @classmethod
    def from_env(cls) -> Catalog:
        where = os.environ.get("POD_LOADTEST_BUNDLE")
        if not where:
            raise SystemExit(
                "POD_LOADTEST_BUNDLE is not set: point it at the served bundle directory (the one with "
                "catalog.json and histories.txt), e.g. POD_LOADTEST_BUNDLE=runs/demo/bundle, or pass --bundle "
                "to loadtests/run.py"
            )
        root = Path(where)
        missing = [n for n in ("catalog.json", "histories.txt") if not (root / n).is_file()]
        if missing:
            raise SystemExit(f"POD_LOADTEST_BUNDLE={where}: {', '.join(missing)} missing; is it a `pod export` bundle?")
        return cls(root)


def weight(kind: str, default: int) -> int:
    """A mix weight from `POD_LOADTEST_W_<KIND>`; weights are relative, so only their ratios matter."""
    raw = os.environ.get(f"POD_LOADTEST_W_{kind.upper()}", str(default))
    try:
        value = int(raw)
    except ValueError:
        raise SystemExit(f"POD_LOADTEST_W_{kind.upper()}={raw!r}: not an integer") from None
    if value < 0:
        raise SystemExit(f"POD_LOADTEST_W_{kind.upper()}={raw!r}: must be >= 0")
    return value


_catalog: Catalog | None = None


def catalog() -> Catalog:
    global _catalog
    if _catalog is None:
        _catalog = Catalog.from_env()
    return _catalog


_environment = None


@events.init.add_listener
def _load_catalog(environment, **_kw) -> None:
    """Fail at start-up (not on the first request) when the bundle is missing; the master needs no IDs."""
    global _environment
    _environment = environment
    if not isinstance(environment.runner, MasterRunner):
        catalog()


@events.quit.add_listener
def _write_final_stats(**_kw) -> None:
    """`<csv prefix>_final_stats.csv`: the stats once every user has stopped.

    Locust rewrites `_stats.csv` once a second, so it can miss the last second of a run (its requests and
    failures); this copy, in the same columns, is written after the runner has quit, and is what
    `loadtests/run.py` judges.
    """
    env = _environment
    prefix = getattr(env.parsed_options, "csv_prefix", None) if env is not None and env.parsed_options else None
    if not prefix or isinstance(env.runner, WorkerRunner):
        return
    with open(f"{prefix}_final_stats.csv", "w", newline="") as fh:
        StatsCSV(env, PERCENTILES_TO_REPORT).requests_csv(csv.writer(fh))


def invalid_requests(cat: Catalog) -> list[tuple[str, dict]]:
    """Bodies the server must refuse with a 4xx: unknown IDs, out-of-range k, wrong types, duplicates."""
    user = random.choice(cat.users)
    unknown_user = max(cat.id2user) + 1000
    unknown_item = max(cat.id2item) + 1000
    a, b = random.sample(cat.items, 2)
    return [
        (SEQUENTIAL, {"user_id": unknown_user}),
        (SEQUENTIAL, {"user_id": user, "k": 0}),
        (SEQUENTIAL, {"user_id": user, "history": []}),
        (SEQUENTIAL, {"user_id": user, "history": [a, unknown_item]}),
        (SEQUENTIAL, {"user_id": user, "surprise": True}),
        (TOPN, {"user_id": user, "candidates": [a, b, a]}),
        (TOPN, {"user_id": user, "candidates": [a]}),
        (TOPN, {"user_id": user, "candidates": [a, b], "mode": "fast"}),
        (EXPLAIN, {"user_id": user, "item_id": unknown_item}),
        (EXPLAIN, {"item_id": a}),
    ]


class RecommenderUser(FastHttpUser):
    """One client of the service; think time between requests is `POD_LOADTEST_WAIT` seconds (min,max)."""

    _wait = [float(x) for x in os.environ.get("POD_LOADTEST_WAIT", "0.05,0.5").split(",")]
    wait_time = between(_wait[0], _wait[-1])
    _token = os.environ.get("POD_LOADTEST_API_TOKEN") or os.environ.get("POD_API_TOKEN")
    headers = {"Authorization": f"Bearer {_token}"} if _token else {}

    def post(self, path: str, body: dict, name: str | None = None) -> None:
        """A valid request: anything but 200 is a failure, with the server's detail as the reason."""
        with self.client.post(path, json=body, name=name or path, headers=self.headers, catch_response=True) as resp:
            if resp.status_code != 200:
                resp.failure(f"{resp.status_code}: {(resp.text or '')[:200]}")
            else:
                resp.success()

    @task(weight("sequential", 40))
    def sequential_known_history(self) -> None:
        cat = catalog()
        self.post(SEQUENTIAL, {"user_id": random.choice(cat.users), "k": random.choice((5, 10, 20))})

    @task(weight("sequential_history", 20))
    def sequential_explicit_history(self) -> None:
        cat = catalog()
        user = random.choice(cat.users)
        known = cat.histories[user]
        history = known[-random.randint(1, len(known)) :]
        if random.random() < 0.5:  # raw IDs in, raw IDs out
            self.post(
                SEQUENTIAL,
                {"user_id": cat.id2user[user], "history": [cat.id2item[i] for i in history], "k": 10},
            )
        else:
            self.post(SEQUENTIAL, {"user_id": user, "history": history, "k": 10})

    @task(weight("topn", 25))
    def topn_100_candidates(self) -> None:
        cat = catalog()
        modes = os.environ.get("POD_LOADTEST_TOPN_MODE", "score").split(",")
        candidates = random.sample(cat.items, min(100, len(cat.items)))
        body = {"user_id": random.choice(cat.users), "candidates": candidates, "k": 10, "mode": random.choice(modes)}
        self.post(TOPN, body)

    @task(weight("explain", 10))
    def explanation(self) -> None:
        cat = catalog()
        user = random.choice(cat.users)
        self.post(EXPLAIN, {"user_id": user, "item_id": random.choice(cat.histories[user]), "max_tokens": 24})

    @task(weight("invalid", 5))
    def invalid(self) -> None:
        path, body = random.choice(invalid_requests(catalog()))
        with self.client.post(
            path, json=body, name=path + INVALID_SUFFIX, headers=self.headers, catch_response=True
        ) as resp:
            if 400 <= resp.status_code < 500:
                resp.success()
            else:
                resp.failure(f"expected a 4xx for {json.dumps(body)[:120]}, got {resp.status_code}")
