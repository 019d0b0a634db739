"""`pod loadtest`: short headless Locust runs against a real server on loopback, and the SLO verdict."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from loadtests.run import AGGREGATED, Row, check_slo, main, read_stats
from tests.conftest import ROOT
from tests.test_service import free_port, serve

ENDPOINTS = ("/recommend/sequential", "/recommend/topn", "/explain")


def loadtest(url: str, bundle: Path, out: Path, *flags: str, run_time: str = "15s") -> subprocess.CompletedProcess:
    """`pod loadtest` as a user runs it, with more invalid requests than the default mix so every run has some."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "POD_LOADTEST_W_INVALID": "15"}
    env.pop("POD_LOADTEST_BUNDLE", None)
    cmd = [sys.executable, "-m", "cli.main", "loadtest", "--host", url, "--bundle", str(bundle)]
    cmd += ["--users", "4", "--run-time", run_time, "--out", str(out), *flags]
    return subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def bundle(request) -> Path:
    """The session's `exported_bundle`, or `$POD_TEST_BUNDLE` when set: re-running these tests against an
    existing export skips the minutes of training on a busy machine (any bundle from `pod export` will do)."""
    if os.environ.get("POD_TEST_BUNDLE"):
        return Path(os.environ["POD_TEST_BUNDLE"])
    return request.getfixturevalue("exported_bundle")


@pytest.fixture(scope="module")
def server(bundle):
    with serve(bundle, max_wait_ms=2) as (url, _):
        yield url


@pytest.fixture(scope="module")
def report(server, bundle, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("loadtest")
    done = loadtest(server, bundle, out, "--max-failure-rate", "0", "--max-p99-ms", "30000")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "Verdict: PASS" in done.stdout
    return out


def test_report_has_every_endpoint_and_no_unexpected_failure(report):
    for name in ("summary.md", "report.html", "locust_stats.csv", "locust_final_stats.csv", "locust_failures.csv"):
        assert (report / name).is_file(), name
    rows = {r.name: r for r in read_stats(report / "locust_final_stats.csv")}
    for endpoint in ENDPOINTS:
        assert rows[endpoint].requests > 0 and rows[endpoint].failures == 0, rows[endpoint]
        assert 0 < rows[endpoint].p50 <= rows[endpoint].p95 <= rows[endpoint].p99
    invalid = [r for name, r in rows.items() if name.endswith("[invalid]")]
    assert sum(r.requests for r in invalid) > 0  # sent, answered 4xx, and so counted as successes
    assert sum(r.failures for r in invalid) == 0
    assert rows[AGGREGATED].failures == 0 and rows[AGGREGATED].rps > 0
    summary = (report / "summary.md").read_text()
    assert all(f"POST {e} |" in summary for e in ENDPOINTS) and "p99 ms" in summary
    assert "Verdict: PASS" in summary and "html" in (report / "report.html").read_text()[:200].lower()


def test_a_missed_slo_exits_non_zero(report, capsys):
    assert main(["--summarize-only", "--out", str(report), "--max-p99-ms", "0.001"]) == 1
    err = capsys.readouterr().err
    assert all(f"p99 of POST {e} is" in err for e in ENDPOINTS)
    assert "FAIL: p99" in (report / "summary.md").read_text()
    assert main(["--summarize-only", "--out", str(report), "--max-p99-ms", "30000", "--max-failure-rate", "0"]) == 0


def test_failure_rate_bound():
    def rows(failures: int) -> list[Row]:
        return [
            Row("POST", "/explain", 100, failures, 5.0, 10, 20, 30, 40),
            Row("", AGGREGATED, 100, failures, 5.0, 10, 20, 30, 40),
        ]

    assert check_slo(rows(1), 0.01, None) == []
    assert "failure rate 0.0200 (2/100)" in check_slo(rows(2), 0.01, None)[0]
    assert check_slo([Row("", AGGREGATED, 0, 0, 0, 0, 0, 0, 0)], None, None)  # no requests never passes


def test_distributed_master_and_worker_use_the_same_file(server, bundle, tmp_path):
    done = loadtest(server, bundle, tmp_path, "--workers", "1", "--master-port", str(free_port()), run_time="8s")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    rows = {r.name: r for r in read_stats(tmp_path / "locust_final_stats.csv")}
    assert rows[AGGREGATED].requests > 0 and rows[AGGREGATED].failures == 0


def test_a_missing_bundle_is_a_clear_error(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("POD_LOADTEST_BUNDLE", raising=False)
    assert main(["--out", str(tmp_path), "--bundle", ""]) == 2
    assert "POD_LOADTEST_BUNDLE" in capsys.readouterr().err
    assert main(["--out", str(tmp_path), "--bundle", str(tmp_path)]) == 2
    assert "catalog.json missing" in capsys.readouterr().err
