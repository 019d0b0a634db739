"""Ray Serve on a real local cluster: two replicas under Locust, one killed mid-load (issue 16).

    python -m reliability.ray_replica_loss --bundle runs/demo/bundle --out reliability/results/ray

1. A Ray cluster on loopback: a head node and a worker node, each a `ray start --block` process of its own
   (its own ports and `--num-cpus`), started here and always stopped here, by process id.
2. Throughput with 1 and then 2 replicas (`service.ray_deployment`, our batcher in each replica): Locust with
   `loadtests/locustfile.py` through Ray's HTTP proxy, closed loop, `--users` users back to back.
   `--batching-compare` also measures Ray Serve's `@serve.batch` in place of our batcher.
3. `--simulate-ms S`: the same, with a replica whose every batch also sleeps S ms (its model waits instead of
   computing, as on an accelerator), so that replicas are not bound by the 2 shared cores.
4. Replica loss: 2 replicas under the same load; after `--kill-after` s one replica's process is killed
   (SIGKILL, found among the worker node's processes by its `ray::ServeReplica` title). Every request is
   recorded (time, status, the replica that answered: `x-pod-replica`), so the report says how many failed,
   how many of those were in flight when the kill came, and how long until the throughput of a 2 s window is
   back to 90% of its level before the kill (Serve starts a new replica, which loads and warms the bundle).

Writes `ray.json` and `ray.md` under `--out`.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from reliability.server import free_port

ROOT = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).with_name("ray"))
EVENTS_LOCUSTFILE = '''
"""Records every request of the load (loadtests/locustfile.py) as a JSON line: time, name, status, replica."""
import json, os, time
from locust import events

_out = open(os.environ["POD_RAY_EVENTS"], "a", buffering=1)


@events.request.add_listener
def _record(request_type, name, response_time, response_length, response=None, exception=None, **kw):
    status = getattr(response, "status_code", 0) or 0
    headers = getattr(response, "headers", None) or {}
    _out.write(json.dumps({"t": time.time(), "name": name, "status": status, "ms": response_time,
        "replica": headers.get("x-pod-replica"), "error": str(exception)[:160] if exception else None}) + "\\n")
'''


RAY_ENV = {"RAY_AUTH_MODE": "disabled"}
"""For the nodes and every driver of a loopback test cluster: Ray 2.60 turns token authentication on by itself
once `~/.ray/auth_token` exists (a local `ray.init()` writes it), and a driver that does not agree with the nodes
cannot connect. Explicit, so the cluster behaves the same whatever that file holds."""


@dataclass
class Cluster:
    """A head and worker nodes on loopback: `address` for `ray.init`, the `ray start --block` processes."""

    address: str
    temp_dir: str
    nodes: list[subprocess.Popen] = field(default_factory=list)

    def processes(self, node: int | None = None) -> list[psutil.Process]:
        """Every live process of the cluster (or of one node), the `ray start` ones included."""
        out = []
        for proc in self.nodes if node is None else [self.nodes[node]]:
            try:
                parent = psutil.Process(proc.pid)
                out += [parent, *parent.children(recursive=True)]
            except psutil.NoSuchProcess:
                pass
        return out

    def replica_pids(self, node: int | None = None) -> list[int]:
        found = []
        for p in self.processes(node):
            try:
                if any("ServeReplica" in part for part in p.cmdline()[:1]) or "ServeReplica" in p.name():
                    found.append(p.pid)
            except psutil.Error:
                pass
        return found


def _node_ports() -> list[str]:
    """Ports of their own for every node: two raylets on one host would otherwise share the defaults."""
    names = ("node-manager", "object-manager", "metrics-export", "dashboard-agent-listen", "dashboard-agent-grpc")
    ports = [f"--{n}-port={free_port()}" for n in names]
    return [*ports, f"--runtime-env-agent-port={free_port()}"]


@contextmanager
def local_cluster(nodes: int = 2, cpus_per_node: float = 1, log_dir: Path | None = None) -> Iterator[Cluster]:
    """Start a head and `nodes - 1` worker nodes on 127.0.0.1, each with `cpus_per_node` Ray CPUs and 100 MB
    of object store; yield once all are alive; always stop every process they started (SIGTERM to each
    `ray start --block`, then SIGKILL to whatever of theirs is left), by process id."""
    temp_dir = tempfile.mkdtemp(prefix="podray-", dir="/tmp")  # short: Ray's socket paths must stay < 108
    port = free_port()
    address = f"127.0.0.1:{port}"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_USAGE_STATS_ENABLED": "0", "OMP_NUM_THREADS": "1", **RAY_ENV}
    common = [
        "--block",
        "--node-ip-address=127.0.0.1",
        f"--num-cpus={cpus_per_node}",
        "--object-store-memory=100000000",
    ]
    log_dir = Path(log_dir or temp_dir)
    cluster = Cluster(address, temp_dir)
    seen: dict[int, psutil.Process] = {}
    try:
        head = [RAY, "start", "--head", f"--port={port}", "--include-dashboard=false", f"--temp-dir={temp_dir}"]
        head += [f"--ray-client-server-port={free_port()}", "--disable-usage-stats"]
        for i in range(nodes):
            cmd = head if i == 0 else [RAY, "start", f"--address={address}"]
            log = open(log_dir / f"ray-node-{i}.log", "w")  # noqa: SIM115 (closed with the process)
            proc = subprocess.Popen(
                [*cmd, *common, *_node_ports()],
                env=env,
                cwd=ROOT,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
            cluster.nodes.append(proc)
            _wait_for_nodes(cluster, i + 1, log_dir)
        yield cluster
    finally:
        for p in cluster.processes():
            seen[p.pid] = p
        for proc in cluster.nodes:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        _, alive = psutil.wait_procs(list(seen.values()), timeout=15)
        for p in alive:
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(alive, timeout=10)
        for proc in cluster.nodes:
            proc.wait()
        shutil.rmtree(temp_dir, ignore_errors=True)  # Ray's session logs; the nodes' own logs are in log_dir


def _wait_for_nodes(cluster: Cluster, count: int, log_dir: Path, timeout: float = 90.0) -> None:
    """Until `ray status`-like evidence of `count` alive nodes: each node's raylet is running and registered."""
    code = (
        "import ray, sys\n"
        f"ray.init(address={cluster.address!r}, logging_level='ERROR', log_to_driver=False)\n"
        "print(sum(n['Alive'] for n in ray.nodes()))\n"
    )
    deadline = time.time() + timeout
    while time.time() < deadline:
        for i, proc in enumerate(cluster.nodes):
            if proc.poll() is not None:
                raise RuntimeError(f"ray node {i} exited: {(log_dir / f'ray-node-{i}.log').read_text()[-2000:]}")
        env = {**os.environ, **RAY_ENV}
        done = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=ROOT, env=env
        )
        if done.returncode == 0 and done.stdout.strip().splitlines()[-1:] == [str(count)]:
            return
        time.sleep(1.0)
    raise RuntimeError(f"the Ray cluster did not reach {count} nodes in {timeout:.0f} s")


# ---------------------------------------------------------------------------------------------------- the load


@dataclass
class Load:
    """What every Locust run offers: `users` closed-loop users (no think time) of loadtests/locustfile.py."""

    bundle: Path
    users: int = 16
    weights: dict[str, int] = field(default_factory=lambda: {"explain": 0})  # POD_LOADTEST_W_*; others default


MIXES = {
    "default": {"explain": 0},  # the locustfile's mix without explanations: sequential, top-N, invalid
    "explain": {"sequential": 0, "sequential_history": 0, "topn": 0, "invalid": 0, "explain": 1},  # model-bound
}


def run_locust(url: str, load: Load, seconds: float, out: Path, tag: str, during=None) -> list[dict]:
    """One headless Locust run through `url`; every request as a dict (`t` its end, `status`, `replica`,
    `ok`). `during(proc, started)`, if given, runs while the load does (the replica kill)."""
    extra = out / "events_locustfile.py"
    extra.write_text(EVENTS_LOCUSTFILE)
    events = out / f"{tag}.events.jsonl"
    events.unlink(missing_ok=True)
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "POD_LOADTEST_BUNDLE": str(load.bundle),
        "POD_LOADTEST_WAIT": "0,0",
        "POD_RAY_EVENTS": str(events),
        **{f"POD_LOADTEST_W_{k.upper()}": str(v) for k, v in load.weights.items()},
    }
    cmd = [
        sys.executable, "-m", "locust", "-f", f"{ROOT / 'loadtests' / 'locustfile.py'},{extra}", "--headless",
        "--host", url, "--users", str(load.users), "--spawn-rate", str(load.users), "--run-time", f"{seconds:g}s",
        "--stop-timeout", "15", "--only-summary", "--exit-code-on-error", "0", "--loglevel", "WARNING",
    ]  # fmt: skip
    with open(out / f"{tag}.locust.log", "w") as log:
        proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
        started = time.time()
        try:
            if during is not None:
                during(proc, started)
            proc.wait(timeout=seconds + 60)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    rows = [json.loads(line) for line in events.read_text().splitlines() if line.strip()] if events.exists() else []
    for r in rows:
        invalid = r["name"].endswith("[invalid]")
        r["ok"] = r["status"] == 200 or (invalid and 400 <= r["status"] < 500 and r["status"] != 429)
    return rows


def throughput(rows: list[dict], skip_s: float = 3.0) -> dict:
    """Answered requests per second after the first `skip_s` seconds (spawn, first batches)."""
    if not rows:
        return {"requests": 0, "failed": 0, "ok_per_s": 0.0}
    t0 = min(r["t"] for r in rows)
    t1 = max(r["t"] for r in rows)
    steady = [r for r in rows if r["t"] >= t0 + skip_s]
    ok = sum(r["ok"] for r in steady)
    lat = sorted(r["ms"] for r in steady if r["ok"])
    return {
        "requests": len(rows),
        "failed": sum(not r["ok"] for r in rows),
        "ok_per_s": round(ok / max(t1 - t0 - skip_s, 1e-9), 1),
        "p50_ms": round(lat[len(lat) // 2], 1) if lat else None,
        "p99_ms": round(lat[int(len(lat) * 0.99)], 1) if lat else None,
        "replicas_seen": len({r["replica"] for r in steady if r["replica"]}),
    }


# ---------------------------------------------------------------------------------------------------- replica loss


def replica_loss(rows: list[dict], killed_at: float, window_s: float = 2.0) -> dict:
    """What the kill did: failures (and when), the replica that stopped answering, and the time until the
    throughput of a `window_s` window is back to 90% of the 8 s before the kill."""
    before = [r for r in rows if killed_at - 8 <= r["t"] < killed_at]
    level = sum(r["ok"] for r in before) / 8
    ids_before = {r["replica"] for r in before if r["replica"]}
    after = [r for r in rows if r["t"] >= killed_at + 1.0]
    killed = sorted(ids_before - {r["replica"] for r in after if r["replica"]})
    new = sorted({r["replica"] for r in after if r["replica"]} - ids_before)
    first_new = min((r["t"] for r in after if r["replica"] in new), default=None)
    end = max(r["t"] for r in rows)
    back = None
    t = killed_at
    while t + window_s <= end:
        if sum(r["ok"] for r in rows if t <= r["t"] < t + window_s) / window_s >= 0.9 * level:
            back = t + window_s - killed_at
            break
        t += 0.25
    failed = [r for r in rows if not r["ok"]]
    survivors = ids_before - set(killed)
    in_flight = [r for r in rows if r["t"] - r["ms"] / 1000 < killed_at <= r["t"]]  # started before, ended after
    return {
        "requests": len(rows),
        "failed": len(failed),
        "failed_after_kill": sum(r["t"] >= killed_at for r in failed),
        "failed_s_after_kill": [round(r["t"] - killed_at, 2) for r in failed if r["t"] >= killed_at][:50],
        "failure_statuses": sorted({r["status"] for r in failed}),
        "failure_examples": sorted({(r["error"] or "")[:160] for r in failed})[:5],
        "in_flight_at_kill": len(in_flight),
        "in_flight_at_kill_failed": sum(not r["ok"] for r in in_flight),
        "in_flight_at_kill_answered_by_survivor": sum(r["ok"] and r["replica"] in survivors for r in in_flight),
        "failed_started_after_kill": sum(r["t"] - r["ms"] / 1000 >= killed_at for r in failed),
        "answered_by_survivor": sum(r["replica"] in survivors for r in rows),
        "failed_answers_from_survivor": sum(r["replica"] in survivors and not r["ok"] for r in rows),
        "killed_replica": killed,
        "new_replica": new,
        "ok_per_s_before_kill": round(level, 1),
        "ok_per_s_first_5s_after_kill": round(sum(r["ok"] for r in rows if killed_at <= r["t"] < killed_at + 5) / 5, 1),
        "s_until_new_replica_answers": round(first_new - killed_at, 2) if first_new else None,
        "s_until_throughput_back_to_90pct": round(back, 2) if back is not None else None,
    }


def kill_a_replica(cluster: Cluster, node: int) -> int:
    """SIGKILL one Serve replica's process (on `node` if it holds one), as a crash would; its pid."""
    pids = cluster.replica_pids(node) or cluster.replica_pids()
    if not pids:
        raise RuntimeError("no ServeReplica process found")
    os.kill(pids[0], signal.SIGKILL)
    return pids[0]


# ---------------------------------------------------------------------------------------------------- the run


def settings_for(bundle: Path, port: int, **extra: object):
    from service.settings import ServeSettings

    return ServeSettings(bundle=str(bundle), port=port, log_level="warning", threads=1, **extra)


def measure(args: argparse.Namespace) -> dict:
    import ray
    from ray import serve

    from service.ray_deployment import APP, RayOptions, deploy

    out = args.out
    load = Load(args.bundle, args.users, MIXES[args.mix])
    extra = {"max_batch_size": args.max_batch_size} if args.max_batch_size else {}
    report: dict = {
        "mix": args.mix,
        "users": args.users,
        "seconds": args.seconds,
        "simulate_ms": args.simulate_ms,
        "runs": {},
    }
    cpus = 0.25 if args.simulate_ms else 1.0  # simulated replicas wait, they need no core of their own
    os.environ.update(RAY_ENV)  # this process is a driver of the cluster too
    with local_cluster(2, args.node_cpus, out) as cluster:
        ray.init(address=cluster.address, logging_level="ERROR", log_to_driver=False)
        port = free_port()
        try:
            configs = [(n, "pod") for n in args.replicas] + [(1, "serve")] * args.batching_compare
            for replicas, batching in configs:
                tag = f"{replicas}x-{batching}"
                opts = RayOptions(replicas=replicas, replica_cpus=cpus, batching=batching, simulate_ms=args.simulate_ms)
                t0 = time.time()
                url = deploy(settings_for(args.bundle, port, **extra), opts)
                deploy_s = round(time.time() - t0, 1)
                rows = run_locust(url, load, args.seconds, out, tag)
                report["runs"][tag] = {"deploy_s": deploy_s, **throughput(rows)}
                print(tag, report["runs"][tag], flush=True)
                serve.delete(APP)
            if args.kill_after:
                opts = RayOptions(replicas=2, replica_cpus=cpus, simulate_ms=args.simulate_ms)
                url = deploy(settings_for(args.bundle, port, **extra), opts)
                killed: dict = {}

                def kill(proc: subprocess.Popen, started: float) -> None:
                    time.sleep(args.kill_after)
                    killed["pid"] = kill_a_replica(cluster, 1)
                    killed["at"] = time.time()

                rows = run_locust(url, load, args.kill_after + args.after_kill, out, "loss", during=kill)
                report["loss"] = {"killed_pid": killed["pid"], **replica_loss(rows, killed["at"])}
                print("loss", report["loss"], flush=True)
                serve.delete(APP)
        finally:
            serve.shutdown()
            ray.shutdown()
    if args.plain:  # the same load on one plain `pod serve` (uvicorn), beside one replica
        from reliability.server import serve as plain

        with plain(args.bundle, log_level="warning", **extra) as server:
            if args.simulate_ms:
                report["plain"] = "not measured: the simulation exists only inside Ray replicas"
            else:
                report["plain"] = throughput(run_locust(server.url, load, args.seconds, out, "plain"))
                print("plain", report["plain"], flush=True)
    return report


def write_report(report: dict, out: Path) -> None:
    (out / "ray.json").write_text(json.dumps(report, indent=2) + "\n")
    lines = [
        f"# Ray Serve on a 2-node loopback cluster ({report['users']} Locust users, {report['seconds']} s a run)",
        "",
    ]
    lines += [
        "| run | answered/s | p50 ms | p99 ms | failed | replicas seen | deploy s |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for tag, r in report["runs"].items():
        lines.append(
            f"| {tag} | {r['ok_per_s']} | {r['p50_ms']} | {r['p99_ms']} | {r['failed']} | {r['replicas_seen']} "
            f"| {r['deploy_s']} |"
        )
    if isinstance(report.get("plain"), dict):
        p = report["plain"]
        lines.append(f"| plain pod serve | {p['ok_per_s']} | {p['p50_ms']} | {p['p99_ms']} | {p['failed']} | | |")
    if "loss" in report:
        lines += ["", "## One replica killed mid-load", ""]
        lines += [f"- {k}: {v}" for k, v in report["loss"].items()]
    (out / "ray.md").write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bundle", type=Path, required=True)
    ap.add_argument("--out", type=Path, default=ROOT / "reliability" / "results" / "ray")
    ap.add_argument("--mix", choices=sorted(MIXES), default="default", help="default: cheap requests; explain: costly")
    ap.add_argument("--users", type=int, default=16, help="closed-loop Locust users")
    ap.add_argument("--seconds", type=float, default=20, help="length of each throughput run")
    ap.add_argument("--replicas", type=lambda s: [int(x) for x in s.split(",")], default=[1, 2])
    ap.add_argument("--node-cpus", type=float, default=1, help="Ray CPUs of each of the 2 nodes")
    ap.add_argument("--max-batch-size", type=int, default=0, help="the batcher's (0: the server's default)")
    ap.add_argument("--simulate-ms", type=float, default=0, help="> 0: every batch also sleeps this long")
    ap.add_argument("--batching-compare", action="store_true", help="also 1 replica with Ray's @serve.batch")
    ap.add_argument("--plain", action="store_true", help="also the same load on one plain `pod serve`")
    ap.add_argument("--kill-after", type=float, default=10, help="s into the loss run (0: no loss run)")
    ap.add_argument("--after-kill", type=float, default=25, help="s of load after the kill")
    args = ap.parse_args(argv)
    args.bundle = args.bundle.resolve()
    args.out.mkdir(parents=True, exist_ok=True)
    report = measure(args)
    write_report(report, args.out)
    print((args.out / "ray.md").read_text())
    loss = report.get("loss")
    return 1 if loss and loss["failed_answers_from_survivor"] else 0


if __name__ == "__main__":
    sys.exit(main())
