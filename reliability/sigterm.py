"""SIGTERM under load: every request the server took in is answered; none is dropped.

    python -m reliability.sigterm --bundle runs/demo/bundle --clients 48 --seconds 5

`tests/test_service.py::test_sigterm_finishes_in_flight_requests` proves it for 10 requests parked in one
batch. Here many clients send back to back, each request with its own `X-Request-ID`, and the server gets
SIGTERM in the middle. Then the server's log (one JSON line per answered request, with its id and status)
is set beside what each client received: a request the server answered must have reached its client with
that status. A client may see a refused or reset connection only for a request the server never logged,
that is, one it never took in (uvicorn closes its socket at SIGTERM).
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
import time
import uuid
from pathlib import Path

import httpx

from reliability.server import known_users, serve


def sigterm_under_load(bundle: Path, clients: int = 48, seconds: float = 5.0, **settings: object) -> dict:
    """Load, SIGTERM after `seconds`, reconcile. Returns counts and the list of lost requests (empty: pass)."""
    users = known_users(bundle)[:200]
    got: dict[str, int | str] = {}  # request id -> status, or the exception's name
    sent_after_term = threading.Event()
    lock = threading.Lock()
    with serve(bundle, **settings) as server:
        stop = threading.Event()

        def client(n: int) -> None:
            with httpx.Client(timeout=60) as http:
                k = 0
                while not stop.is_set():
                    rid = f"c{n}-{k}-{uuid.uuid4().hex[:6]}"
                    k += 1
                    body = {"user_id": users[(n * 7 + k) % len(users)], "k": 10}
                    try:
                        r = http.post(server.url + "/recommend/sequential", json=body, headers={"x-request-id": rid})
                        outcome: int | str = r.status_code
                    except httpx.HTTPError as exc:
                        outcome = type(exc).__name__
                    with lock:
                        got[rid] = outcome
                    if isinstance(outcome, str) and sent_after_term.is_set():
                        return  # the server is gone: this client is done

        threads = [threading.Thread(target=client, args=(n,), daemon=True) for n in range(clients)]
        for t in threads:
            t.start()
        time.sleep(seconds)
        term_at = time.time()
        server.proc.send_signal(signal.SIGTERM)
        sent_after_term.set()
        exit_code = server.proc.wait(timeout=60)
        stop.set()
        for t in threads:
            t.join(60)
        time.sleep(0.5)  # the log reader catches the last lines
        records = [json.loads(line) for line in server.lines if line.startswith("{")]
    requests = [r for r in records if r.get("msg") == "request" and r.get("path") == "/recommend/sequential"]
    logged = {r["request_id"]: r["status"] for r in requests}
    answered_after_term = sum(r["ts"] >= term_at and r["status"] == 200 for r in requests)
    stopped = any(r.get("msg") == "stopped" for r in records)
    lost = {rid: (status, got.get(rid)) for rid, status in logged.items() if got.get(rid) != status}
    outcomes: dict[str, int] = {}
    for v in got.values():
        outcomes[str(v)] = outcomes.get(str(v), 0) + 1
    return {
        "command": f"python -m reliability.sigterm --bundle {bundle} --clients {clients} --seconds {seconds}",
        "clients": clients,
        "requests_sent": len(got),
        "client_outcomes": dict(sorted(outcomes.items())),
        "server_answered": len(logged),
        "answered_200_after_sigterm": answered_after_term,
        "lost": lost,
        "exit_code": exit_code,
        "clean_stop_logged": stopped,
        "ok": not lost
        and stopped
        and exit_code in (0, -signal.SIGTERM)
        and all(isinstance(v, str) or v in (200, 429, 503) for v in got.values()),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bundle", required=True, type=Path)
    parser.add_argument("--clients", type=int, default=48)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    result = sigterm_under_load(args.bundle, args.clients, args.seconds)
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "sigterm.json").write_text(text + "\n")
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
