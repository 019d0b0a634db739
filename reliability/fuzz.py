"""Fuzz `pod serve` with Schemathesis, generated from the server's own OpenAPI schema.

    python -m reliability.fuzz --bundle runs/demo/bundle --max-examples 300 --out reliability/results

A real server on loopback (with a bearer token, so the `ignored_auth` check can try requests without it),
Schemathesis' CLI against `/openapi.json`, every phase but the stateful one. The checks: no 5xx, status codes,
content types, headers and bodies as the schema documents them, invalid data rejected, authentication
enforced, and `error_has_message` (`reliability/st_checks.py`): every 4xx says what was wrong. Requests are
counted on the server (Prometheus), not taken from Schemathesis' own tally.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import httpx

from reliability.server import ROOT, serve

CHECKS = ",".join(
    (
        "not_a_server_error",
        "status_code_conformance",
        "content_type_conformance",
        "response_headers_conformance",
        "response_schema_conformance",
        "negative_data_rejection",
        "ignored_auth",
        "error_has_message",
    )
)
TOKEN = "fuzz-token-0123456789abcdef"  # a test server's token, not a secret


def served_by_status(url: str) -> dict[str, int]:
    """Requests the server answered, by status code, from its own latency histogram (health, readiness and
    metrics are not timed there, so these are the recommendation endpoints, /docs and /openapi.json)."""
    text = httpx.get(url + "/metrics", timeout=10).text
    counts: dict[str, int] = {}
    for status, value in re.findall(r'^pod_request_latency_seconds_count\{[^}]*status="(\d+)"\} (\S+)$', text, re.M):
        counts[status] = counts.get(status, 0) + int(float(value))
    return dict(sorted(counts.items()))


def fuzz(bundle: Path, max_examples: int, out: Path, seed: int = 0, max_time: int | None = None) -> dict:
    """Run Schemathesis against a fresh server; returns the summary (also written to `out/fuzz.json`)."""
    out.mkdir(parents=True, exist_ok=True)
    report = out / "schemathesis.json"
    with serve(bundle, api_token=TOKEN, max_history=50) as server:
        cmd = [
            sys.executable,
            "-m",
            "schemathesis.cli",
            "run",
            f"{server.url}/openapi.json",
            "--checks",
            CHECKS,
            "--phases",
            "examples,coverage,fuzzing",
            "--max-examples",
            str(max_examples),
            "--seed",
            str(seed),
            "--workers",
            "1",
            "--request-timeout",
            "30",
            "--header",
            f"Authorization: Bearer {TOKEN}",
            "--suppress-health-check",
            "too_slow,filter_too_much",
            "--report",
            "json",
            "--report-json-path",
            str(report),
        ]
        if max_time:
            cmd += ["--max-time", str(max_time)]
        started = time.perf_counter()
        proc = subprocess.run(
            cmd,
            cwd=ROOT,
            env={**os.environ, "SCHEMATHESIS_HOOKS": "reliability.st_checks", "PYTHONPATH": str(ROOT)},
            capture_output=True,
            text=True,
        )
        seconds = time.perf_counter() - started
        by_status = served_by_status(server.url)
        alive = server.proc.poll() is None
    (out / "schemathesis.txt").write_text(proc.stdout + proc.stderr)
    st = json.loads(report.read_text()) if report.is_file() else {}
    summary = {
        "command": f"python -m reliability.fuzz --bundle {bundle} --max-examples {max_examples} --seed {seed}",
        "schemathesis_exit_code": proc.returncode,
        "seconds": round(seconds, 1),
        "server_requests": sum(by_status.values()),
        "server_5xx": sum(n for code, n in by_status.items() if code.startswith("5")),
        "server_by_status": by_status,
        "server_alive_after": alive,
        "operations_tested": (st.get("operations") or {}).get("tested"),
        "test_cases": st.get("test_cases"),
        "checks": CHECKS.split(","),
        "output_tail": (proc.stdout + proc.stderr)[-4000:],
    }
    (out / "fuzz.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bundle", required=True, type=Path)
    parser.add_argument("--max-examples", type=int, default=300, help="per operation and phase")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=ROOT / "reliability" / "results")
    args = parser.parse_args()
    s = fuzz(args.bundle, args.max_examples, args.out, args.seed)
    print(s["output_tail"])
    print(json.dumps({k: v for k, v in s.items() if k != "output_tail"}, indent=2))
    ok = s["schemathesis_exit_code"] == 0 and s["server_5xx"] == 0 and s["server_alive_after"]
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
