"""Served latency and throughput: `pod serve` (ONNX and PyTorch runtimes) driven over loopback HTTP at
concurrency 1, 8 and 32, beside HF `generate` (constrained) called directly in-process. Ratios last.

The server ranks with `pod.recommender.Recommender`; the HF row gets the same input (`Recommender.text`: the
user's last 20 purchases) and the same constraint (every item of the user's known history excluded) that the
server builds for a `{"user_id": ..., "k": 10}` request. `pod serve` is the `pod` command installed beside this
Python (`Path(sys.executable).with_name("pod")`).

    python benchmarks/serve_latency.py --checkpoint runs/demo --bundle runs/demo/bundle --seconds 10
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))


def start_server(args, runtime: str, port: int) -> subprocess.Popen:
    cmd = [
        str(Path(sys.executable).with_name("pod")),
        "serve",
        "--port",
        str(port),
        "--runtime",
        runtime,
        "--max-batch-size",
        str(args.max_batch_size),
        "--max-wait-ms",
        str(args.max_wait_ms),
    ]
    cmd += ["--bundle", args.bundle] if runtime == "onnx" else ["--checkpoint", args.checkpoint]
    proc = subprocess.Popen(
        cmd,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT), "POD_LOG_LEVEL": "warning", "POD_NORMALIZER": args.normalizer},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            time.sleep(0.3)
    proc.kill()
    raise RuntimeError(f"{runtime} server did not become ready")


def drive(url: str, users: list[int], concurrency: int, seconds: float) -> dict:
    latencies: list[float] = []
    errors = [0]
    stop = time.perf_counter() + seconds

    def worker(seed: int) -> None:
        rng = random.Random(seed)
        with httpx.Client(timeout=60) as client:
            while time.perf_counter() < stop:
                t0 = time.perf_counter()
                r = client.post(url + "/recommend/sequential", json={"user_id": rng.choice(users), "k": 10})
                if r.status_code == 200:
                    latencies.append(time.perf_counter() - t0)
                else:
                    errors[0] += 1

    t0 = time.perf_counter()
    threads = [threading.Thread(target=worker, args=(i,)) for i in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return summary(latencies, time.perf_counter() - t0, errors[0])


def summary(latencies: list[float], elapsed: float, errors: int = 0) -> dict:
    ms = np.asarray(latencies) * 1000
    return {
        "requests": len(ms),
        "errors": errors,
        "rps": len(ms) / elapsed,
        "p50_ms": float(np.percentile(ms, 50)),
        "p95_ms": float(np.percentile(ms, 95)),
        "p99_ms": float(np.percentile(ms, 99)),
    }


def hf_direct(args, users: list[int]) -> dict:
    """HF constrained `generate`, one request at a time in this process, on the jobs the server would run."""
    from runtime_latency import hf

    from pod.dataset import PreparedData
    from pod.model import load_checkpoint
    from pod.recommender import Catalog, Recommender, SequentialJob
    from pod.torch_runtime import TorchRuntime

    model, tok, meta = load_checkpoint(args.checkpoint)
    data = PreparedData.load(meta["train_config"]["data"])
    runtime = TorchRuntime(model, tok)
    catalog = Catalog.from_prepared(data, tok)  # histories: the whole known sequences, as the bundle's
    run = hf(runtime, Recommender(runtime, catalog), "sequential", 20)
    rng = random.Random(0)
    latencies = []
    stop = time.perf_counter() + args.seconds
    t0 = time.perf_counter()
    while time.perf_counter() < stop:
        u = rng.choice(users)
        job = SequentialJob(u, catalog.histories[u], 10)  # what the server makes of {"user_id": u, "k": 10}
        s = time.perf_counter()
        run(job)
        latencies.append(time.perf_counter() - s)
    return summary(latencies, time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", default="runs/demo")
    ap.add_argument("--bundle", default="runs/demo/bundle")
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--concurrency", default="1,8,32")
    ap.add_argument("--max-batch-size", type=int, default=16)
    ap.add_argument("--max-wait-ms", type=float, default=5.0)
    ap.add_argument("--port", type=int, default=8765)
    ap.add_argument("--runtimes", default="onnx,torch", help="which `pod serve` runtimes to drive")
    ap.add_argument("--normalizer", choices=["exact", "allowed"], default="exact", help="`pod serve --normalizer`")
    ap.add_argument("--out")
    args = ap.parse_args()
    from pod.bundle import Bundle

    users = sorted(Bundle.load(args.bundle, verify=False).histories)[:500]
    results = {"HF generate (direct, concurrency 1)": hf_direct(args, users)}
    for runtime in args.runtimes.split(","):
        proc = start_server(args, runtime, args.port)
        try:
            url = f"http://127.0.0.1:{args.port}"
            drive(url, users, 2, 2.0)  # warm connections
            for c in map(int, args.concurrency.split(",")):
                results[f"pod serve {runtime}, concurrency {c}"] = drive(url, users, c, args.seconds)
        finally:
            proc.terminate()
            proc.wait(timeout=60)
    base = results["HF generate (direct, concurrency 1)"]["rps"]
    print(f"{'case':<40} {'req/s':>8} {'p50 ms':>8} {'p95 ms':>8} {'p99 ms':>8} {'errors':>6} {'req/s vs HF':>12}")
    for name, r in results.items():
        print(
            f"{name:<40} {r['rps']:>8.1f} {r['p50_ms']:>8.1f} {r['p95_ms']:>8.1f} {r['p99_ms']:>8.1f} "
            f"{r['errors']:>6} {r['rps'] / base:>11.2f}x"
        )
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
