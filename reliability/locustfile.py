"""Locust load for the overload check: sequential recommendations for known users, at a set pace per user.

Each request is reported under its outcome (`sequential 200`, `sequential 429`, ...), so Locust's CSV gives
the latency of admitted requests apart from the fast 429s; shedding load with 429 is a success here, any
other status a failure. (`loadtests/locustfile.py` is the traffic-mix scenario for SLOs; it counts 429 as a
failure and mixes their latencies with the admitted ones', which is what this check must keep apart.)

Environment: `POD_RELIABILITY_BUNDLE` (users come from its `histories.txt`), `POD_RELIABILITY_PACE`
(requests per second per simulated user; 0: back to back), `POD_API_TOKEN` (sent as a bearer token if set).
"""

from __future__ import annotations

import os
import random
from pathlib import Path

from locust import FastHttpUser, constant, constant_throughput, task


def _users() -> list[int]:
    lines = (Path(os.environ["POD_RELIABILITY_BUNDLE"]) / "histories.txt").read_text().splitlines()
    return [int(line.split()[0]) for line in lines if len(line.split()) > 1]


USERS = _users()
PACE = float(os.environ.get("POD_RELIABILITY_PACE", "0"))
HEADERS = {"authorization": f"Bearer {os.environ['POD_API_TOKEN']}"} if os.environ.get("POD_API_TOKEN") else {}


class Client(FastHttpUser):
    wait_time = constant_throughput(PACE) if PACE > 0 else constant(0)

    @task
    def sequential(self) -> None:
        body = {"user_id": random.choice(USERS), "k": 10}
        with self.client.post("/recommend/sequential", json=body, headers=HEADERS, catch_response=True) as r:
            r.request_meta["name"] = f"sequential {r.status_code}"
            if r.status_code in (200, 429):
                r.success()
            else:
                r.failure(f"{r.status_code}: {(r.text or '')[:120]}")
