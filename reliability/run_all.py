"""`make reliability`: the long checks, one after another, results under `--out` (JSON each, summary.md).

    python -m reliability.run_all [--bundle runs/demo/bundle] [--out reliability/results]

Without `--bundle`, a small one is made first (the synthetic shop, the tiny model trained for 700 steps on
the sequential task, exported), about what the test fixtures build. The training faults use a separate,
smaller synthetic shop so each of the runs takes seconds, not minutes.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

from reliability.faults import FAULTS, failed_checkpoint_write, kill_and_resume, serve_damaged
from reliability.fuzz import fuzz
from reliability.overload import overload
from reliability.server import ROOT
from reliability.sigterm import sigterm_under_load


def make_bundle(work: Path) -> Path:
    from export.export import export_bundle
    from training.data.synth import write_synthetic
    from training.train import quick_sequential_config, train

    data, run, bundle = work / "synthetic", work / "seq", work / "bundle"
    write_synthetic(data)
    train(quick_sequential_config(data, run))
    export_bundle(run, bundle, data=data, log=lambda *_: None)
    return bundle


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bundle", type=Path)
    parser.add_argument("--out", type=Path, default=ROOT / "reliability" / "results")
    parser.add_argument("--work", type=Path, default=Path("/tmp/pod-reliability"))
    parser.add_argument("--fuzz-examples", type=int, default=300)
    parser.add_argument("--overload-seconds", type=int, default=60)
    args = parser.parse_args()
    shutil.rmtree(args.work, ignore_errors=True)
    args.work.mkdir(parents=True)
    args.out.mkdir(parents=True, exist_ok=True)
    bundle = args.bundle or make_bundle(args.work)
    results: dict[str, dict] = {}

    def step(name: str, fn) -> None:
        started = time.perf_counter()
        results[name] = fn()
        results[name]["wall_s"] = round(time.perf_counter() - started, 1)
        (args.out / f"{name}.json").write_text(json.dumps(results[name], indent=2) + "\n")
        print(
            f"{name}: {'ok' if results[name].get('ok', True) else 'FAILED'} ({results[name]['wall_s']} s)", flush=True
        )

    def fuzzed() -> dict:
        r = fuzz(bundle, args.fuzz_examples, args.out)
        r["ok"] = r["schemathesis_exit_code"] == 0 and r["server_5xx"] == 0 and r["server_requests"] >= 1000
        return r

    def trained() -> dict:
        from training.data.synth import write_synthetic

        data = args.work / "small"
        write_synthetic(data, users=200, items=120, seed=3)
        return kill_and_resume(data, args.work / "train", kill_after=[4, 13, 30], epochs=2, save_every=3)

    step("fuzz", fuzzed)
    step("overload", lambda: overload(bundle, args.out, seconds=args.overload_seconds))
    step("sigterm", lambda: sigterm_under_load(bundle, clients=64, seconds=10))
    step(
        "bundle_faults",
        lambda: {"runs": (r := [serve_damaged(bundle, f, args.work) for f in FAULTS]), "ok": all(x["ok"] for x in r)},
    )
    step("kill_and_resume", trained)
    step("checkpoint_write", lambda: failed_checkpoint_write(args.work / "train" / "full", args.work))
    lines = ["# Reliability run", "", "| check | result | seconds |", "|---|---|---|"]
    lines += [f"| {k} | {'ok' if v.get('ok', True) else 'FAILED'} | {v['wall_s']} |" for k, v in results.items()]
    (args.out / "summary.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0 if all(v.get("ok", True) for v in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
