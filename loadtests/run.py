"""`pod loadtest` (or `python -m loadtests.run`): a headless Locust run against a running server, its report,
and a pass/fail verdict against stated SLOs.

It writes, under `--out`: Locust's CSV stats (`locust_stats.csv`, `locust_stats_history.csv`,
`locust_failures.csv`, `locust_exceptions.csv`, and `locust_final_stats.csv`, the same columns once the run
has stopped), its HTML report (`report.html`), and `summary.md` (p50/p95/p99
per endpoint, requests/s, failures) computed from the CSV; it exits 1 when the failure rate is over
`--max-failure-rate` or an endpoint's p99 is over `--max-p99-ms`, so CI and `make loadtest` can gate on it.

Distributed: `--workers N` starts a Locust master and N worker processes on this machine; on several
machines, run this with `--expect-workers N` (a master waiting for N workers) and, on each worker machine,
`POD_LOADTEST_BUNDLE=... locust -f loadtests/locustfile.py --worker --master-host MASTER`.
Only argparse and the standard library are imported here, so `pod --help` stays fast.
"""

from __future__ import annotations

import argparse
import csv
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

LOCUSTFILE = Path(__file__).with_name("locustfile.py")
CSV_PREFIX = "locust"
AGGREGATED = "Aggregated"


@dataclass
class Row:
    """One line of Locust's `*_stats.csv`: a request name and its counts and latency percentiles (ms)."""

    method: str
    name: str
    requests: int
    failures: int
    rps: float
    p50: float
    p95: float
    p99: float
    max: float

    @property
    def failure_rate(self) -> float:
        return self.failures / self.requests if self.requests else 0.0


def _number(value: str) -> float:
    return float(value) if value not in ("", "N/A") else 0.0


def read_stats(stats_csv: Path) -> list[Row]:
    """The rows of a Locust stats CSV, the `Aggregated` row last."""
    with open(stats_csv, newline="") as fh:
        return [
            Row(
                method=r["Type"],
                name=r["Name"],
                requests=int(r["Request Count"]),
                failures=int(r["Failure Count"]),
                rps=_number(r["Requests/s"]),
                p50=_number(r["50%"]),
                p95=_number(r["95%"]),
                p99=_number(r["99%"]),
                max=_number(r["Max Response Time"]),
            )
            for r in csv.DictReader(fh)
        ]


def check_slo(rows: list[Row], max_failure_rate: float | None, max_p99_ms: float | None) -> list[str]:
    """Every violated SLO, one sentence each; empty when the run passes.

    The failure rate is judged on the aggregate; the p99 bound on each request name (an endpoint that is
    slow but rare would hide in the aggregate).
    """
    problems = []
    total = next((r for r in rows if r.name == AGGREGATED), None)
    if total is None or total.requests == 0:
        return ["no requests were made (is the server up, and the host right?)"]
    if max_failure_rate is not None and total.failure_rate > max_failure_rate:
        problems.append(
            f"failure rate {total.failure_rate:.4f} ({total.failures}/{total.requests}) "
            f"is over --max-failure-rate {max_failure_rate:g}"
        )
    if max_p99_ms is not None:
        for r in rows:
            if r.name != AGGREGATED and r.requests and r.p99 > max_p99_ms:
                problems.append(f"p99 of {r.method} {r.name} is {r.p99:g} ms, over --max-p99-ms {max_p99_ms:g}")
    return problems


def summary_markdown(rows: list[Row], title: str, problems: list[str], slo: str) -> str:
    """The Markdown summary: one table row per request name, the aggregate last, and the verdict."""
    lines = [
        f"# {title}",
        "",
        "| request | requests | failures | req/s | p50 ms | p95 ms | p99 ms | max ms |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        name = f"**{AGGREGATED}**" if r.name == AGGREGATED else f"{r.method} {r.name}"
        lines.append(
            f"| {name} | {r.requests} | {r.failures} | {r.rps:.2f} | {r.p50:g} | {r.p95:g} | {r.p99:g} | {r.max:g} |"
        )
    lines += ["", f"SLO: {slo or 'none stated'}", ""]
    lines += [f"- FAIL: {p}" for p in problems] if problems else ["Verdict: PASS"]
    return "\n".join(lines) + "\n"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The runner's flags; shared by `python -m loadtests.run` and `pod loadtest`."""
    env = os.environ.get
    parser.add_argument("--host", default=env("POD_LOADTEST_HOST", "http://127.0.0.1:8000"), help="server URL")
    parser.add_argument(
        "--bundle",
        default=env("POD_LOADTEST_BUNDLE"),
        help="the served bundle directory, for user and item IDs (env POD_LOADTEST_BUNDLE)",
    )
    parser.add_argument("--users", type=int, default=int(env("POD_LOADTEST_USERS", "10")), help="concurrent users")
    parser.add_argument("--spawn-rate", type=float, default=None, help="users started per second (default: all in 1 s)")
    parser.add_argument(
        "--run-time", default=env("POD_LOADTEST_RUN_TIME", "60s"), help="duration, Locust syntax: 30s, 5m, 1h"
    )
    parser.add_argument("--out", type=Path, default=Path(env("POD_LOADTEST_OUT", "runs/loadtest")), help="report dir")
    parser.add_argument("--max-failure-rate", type=float, default=None, help="SLO: highest failures/requests (0.01)")
    parser.add_argument("--max-p99-ms", type=float, default=None, help="SLO: highest p99 per request name, ms")
    parser.add_argument("--workers", type=int, default=0, help="distributed: a master and N local worker processes")
    parser.add_argument("--expect-workers", type=int, default=0, help="distributed: a master waiting for N workers")
    parser.add_argument("--master-port", type=int, default=5557, help="distributed: the master's port")
    parser.add_argument(
        "--summarize-only", action="store_true", help="no run: summarize and judge the CSVs already in --out"
    )


def locust_command(args: argparse.Namespace, prefix: Path) -> list[str]:
    """The headless Locust command line (the master's, in distributed mode)."""
    cmd = [
        sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless",
        "--host", args.host,
        "--users", str(args.users),
        "--spawn-rate", str(args.spawn_rate or args.users),
        "--run-time", args.run_time,
        "--csv", str(prefix), "--csv-full-history",
        "--html", str(args.out / "report.html"),
        "--stop-timeout", "10",
        "--only-summary",
        "--exit-code-on-error", "0",  # the SLO check below decides the exit code
    ]  # fmt: skip
    workers = args.workers or args.expect_workers
    if workers:
        cmd += ["--master", "--expect-workers", str(workers), "--master-bind-port", str(args.master_port)]
    return cmd


def run_locust(args: argparse.Namespace) -> int:
    """Run Locust (and local workers if asked); its exit status."""
    env = {**os.environ, "POD_LOADTEST_BUNDLE": str(args.bundle)}
    args.out.mkdir(parents=True, exist_ok=True)
    print("pod loadtest: " + " ".join(locust_command(args, args.out / CSV_PREFIX)), flush=True)
    master = subprocess.Popen(locust_command(args, args.out / CSV_PREFIX), env=env)
    workers = []
    try:
        for _ in range(args.workers):
            worker = [sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--worker"]
            worker += ["--master-host", "127.0.0.1", "--master-port", str(args.master_port)]
            workers.append(subprocess.Popen(worker, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT))
            time.sleep(0.2)
        return master.wait()
    finally:
        if master.poll() is None:
            master.terminate()
            master.wait()
        for w in workers:  # they quit when the master says so; this is for a master that died
            try:
                w.wait(timeout=15)
            except subprocess.TimeoutExpired:
                w.kill()
                w.wait()


def run(args: argparse.Namespace) -> int:
    """Run (unless `--summarize-only`), write `summary.md`, print it, and return 0 if every SLO holds, else 1."""
    if not args.summarize_only:
        if not args.bundle:
            print(
                "pod: error: loadtest: no bundle; pass --bundle DIR or set POD_LOADTEST_BUNDLE to the served bundle "
                "(its catalog.json and histories.txt give the user and item IDs)",
                file=sys.stderr,
            )
            return 2
        if not (Path(args.bundle) / "catalog.json").is_file():
            print(
                f"pod: error: loadtest: {args.bundle}/catalog.json missing; is it a `pod export` bundle?",
                file=sys.stderr,
            )
            return 2
        status = run_locust(args)
        if status not in (0, 1):
            print(f"pod: error: loadtest: locust exited with status {status}", file=sys.stderr)
            return 2
    stats = args.out / f"{CSV_PREFIX}_final_stats.csv"  # written by the locustfile once the run has stopped
    if not stats.is_file():
        stats = args.out / f"{CSV_PREFIX}_stats.csv"  # Locust's own, up to a second behind
    if not stats.is_file():
        print(f"pod: error: loadtest: {stats} missing (did Locust run?)", file=sys.stderr)
        return 2
    rows = read_stats(stats)
    problems = check_slo(rows, args.max_failure_rate, args.max_p99_ms)
    slo = ", ".join(
        s
        for s in (
            f"failure rate <= {args.max_failure_rate:g}" if args.max_failure_rate is not None else "",
            f"p99 <= {args.max_p99_ms:g} ms per request" if args.max_p99_ms is not None else "",
        )
        if s
    )
    title = f"Load test: {args.users} users, {args.run_time}, {args.host}"
    text = summary_markdown(rows, title, problems, slo)
    (args.out / "summary.md").write_text(text)
    print(text, end="")
    print(f"wrote {args.out}/summary.md, report.html and {CSV_PREFIX}_*.csv")
    for p in problems:
        print(f"pod loadtest: SLO missed: {p}", file=sys.stderr)
    return 1 if problems else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pod loadtest", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
