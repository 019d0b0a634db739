"""Faults: a damaged bundle at start-up, kill -9 in the middle of training, a checkpoint write that fails.

    python -m reliability.faults --bundle runs/demo/bundle --data data/synthetic --out reliability/results

- Bundle: a copy with one file missing, truncated or altered (and one without `bundle.json`) is served with
  `pod serve`; it must exit non-zero, soon, saying which file is wrong, before it ever listens.
- kill -9: `pod train --save-every N` is SIGKILLed after a mid-epoch checkpoint, then `pod train --resume`;
  the final `model.safetensors` must equal an uninterrupted run's, tensor for tensor. Training writes `last/`
  every `--save-every` steps and at epoch ends, so a kill loses at most the steps since the last save, and the
  resumed run replays them with the saved RNG state.
- Checkpoint write failure: `save_checkpoint` over an existing `last/` fails part-way (disk full, simulated);
  the previous checkpoint is byte-identical afterwards and no temporary directory is left.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from reliability.server import ROOT, free_port, server_env

FAULTS = (
    "missing:decoder_step.onnx",
    "truncated:encoder_sequential.onnx",
    "tampered:catalog.json",
    "missing:bundle.json",
)


def damage(bundle: Path, fault: str, dest: Path) -> str:
    """A copy of `bundle` at `dest` with one fault (`kind:file`); returns the damaged file's name."""
    kind, name = fault.split(":")
    shutil.copytree(bundle, dest)
    path = dest / name
    if kind == "missing":
        path.unlink()
    elif kind == "truncated":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif kind == "tampered":
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0x01  # one bit
        path.write_bytes(bytes(data))
    else:
        raise ValueError(fault)
    return name


def serve_damaged(bundle: Path, fault: str, workdir: Path, timeout: float = 90.0) -> dict:
    """Start `pod serve` on a damaged copy; it must stop on its own, naming the file."""
    name = damage(bundle, fault, workdir / fault.replace(":", "-"))
    started = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "cli.main", "serve"],
        env=server_env(workdir / fault.replace(":", "-"), free_port()),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    output = proc.stdout + proc.stderr
    message = next((line for line in output.splitlines() if name in line and "Error" in line), "")
    return {
        "fault": fault,
        "exit_code": proc.returncode,
        "seconds": round(time.perf_counter() - started, 2),
        "names_the_file": bool(message),
        "message": message.strip()[:300],
        "ok": proc.returncode != 0 and bool(message),
    }


def train_cmd(
    data: Path, out: Path, epochs: int, save_every: int, resume: bool = False, tasks: str = "sequential,topn"
) -> list[str]:
    """The training command; a resume is bare `--resume`, the saved run's settings must carry it on."""
    cmd = [sys.executable, "-m", "cli.main", "train", "--data", str(data), "--out", str(out), "--no-progress"]
    if resume:
        return [*cmd, "--resume"]
    return [
        *cmd,
        *("--tasks", tasks, "--epochs", str(epochs), "--batch-size", "16", "--val-limit", "16"),
        *("--seed", "7", "--lr", "2e-3", "--warmup-steps", "5", "--schedule", "linear", "--preset", "tiny"),
        *("--save-every", str(save_every), "--device", "cpu"),
    ]


def saved_step(run: Path) -> int:
    try:
        return json.loads((run / "last" / "training_state.json").read_text())["progress"]["global_step"]
    except (OSError, ValueError, KeyError):
        return -1


def tensors_equal(a: Path, b: Path) -> tuple[bool, int]:
    from safetensors.numpy import load_file

    x, y = load_file(str(a)), load_file(str(b))
    return x.keys() == y.keys() and all((x[k] == y[k]).all() for k in x), len(x)


def kill_and_resume(
    data: Path,
    workdir: Path,
    kill_after: list[int],
    epochs: int = 2,
    save_every: int = 3,
    tasks: str = "sequential,topn",
) -> dict:
    """One uninterrupted run, then for each step in `kill_after` a run SIGKILLed once `last/` holds that step
    (or later), resumed to the end; each must end with the uninterrupted run's weights."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    full = workdir / "full"
    started = time.perf_counter()
    subprocess.run(
        train_cmd(data, full, epochs, save_every, tasks=tasks), env=env, cwd=ROOT, check=True, capture_output=True
    )
    full_seconds = time.perf_counter() - started
    total = saved_step(full)
    runs = []
    for target in kill_after:
        run = workdir / f"killed-at-{target}"
        proc = subprocess.Popen(
            train_cmd(data, run, epochs, save_every, tasks=tasks),
            env=env,
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        while proc.poll() is None and saved_step(run) < target:
            time.sleep(0.01)
        if proc.poll() is not None:
            raise RuntimeError(f"training ended before step {target} was saved: {proc.stderr.read()[-2000:]}")
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        at_kill = saved_step(run)
        logged = (
            [json.loads(x) for x in (run / "log.jsonl").read_text().splitlines()]
            if (run / "log.jsonl").exists()
            else []
        )
        done_steps = max((r["step"] for r in logged if r.get("event") == "step"), default=0)
        leftovers = sorted(p.name for p in run.glob(".last.tmp-*"))
        resumed = subprocess.run(
            train_cmd(data, run, epochs, save_every, resume=True), env=env, cwd=ROOT, capture_output=True, text=True
        )
        same, n = tensors_equal(full / "last" / "model.safetensors", run / "last" / "model.safetensors")
        runs.append(
            {
                "kill_after_saved_step": target,
                "last_saved_step_at_kill": at_kill,
                "steps_done_at_kill": done_steps,
                "temporary_dirs_left_by_kill": leftovers,
                "resume_exit_code": resumed.returncode,
                "final_step": saved_step(run),
                "identical_to_uninterrupted": same,
                "tensors_compared": n,
                "ok": resumed.returncode == 0 and same and saved_step(run) == total,
            }
        )
    return {
        "command": "python -m reliability.faults --data ... (kill -9 then --resume)",
        "steps": total,
        "uninterrupted_seconds": round(full_seconds, 1),
        "runs": runs,
        "ok": all(r["ok"] for r in runs),
    }


def digest(directory: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir()) if p.is_file()}


def failed_checkpoint_write(checkpoint: Path, workdir: Path) -> dict:
    """Write a checkpoint, then fail a second write of it half-way; the first must be untouched."""
    from pod.model import load_checkpoint, save_checkpoint

    model, tokenizer, _ = load_checkpoint(checkpoint)
    last = workdir / "ckpt" / "last"
    save_checkpoint(model, tokenizer, last, {"note": "the good one"})
    before = digest(last)

    def disk_full(tmp: Path) -> None:
        (tmp / "training_state.safetensors").write_bytes(b"\0" * 1024)  # a partial file, then the failure
        raise OSError(28, "No space left on device (simulated)")

    try:
        save_checkpoint(model, tokenizer, last, {"note": "the broken one"}, write_more=disk_full)
        raised = None
    except OSError as exc:
        raised = str(exc)
    after = digest(last)
    leftovers = sorted(p.name for p in last.parent.iterdir() if p.name != "last")
    reloaded = load_checkpoint(last)[2].get("note")
    return {
        "error_raised": raised,
        "previous_checkpoint_identical": before == after,
        "files": len(after),
        "leftovers": leftovers,
        "reloads_as": reloaded,
        "ok": raised is not None and before == after and not leftovers and reloaded == "the good one",
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bundle", required=True, type=Path)
    parser.add_argument("--data", required=True, type=Path, help="a prepared data directory to train on")
    parser.add_argument("--work", type=Path, default=Path("/tmp/pod-reliability-faults"))
    parser.add_argument("--kill-after", default="3,12,21", help="saved steps after which to SIGKILL")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--out", type=Path, default=ROOT / "reliability" / "results")
    args = parser.parse_args()
    shutil.rmtree(args.work, ignore_errors=True)
    args.work.mkdir(parents=True)
    result = {
        "bundle_faults": [serve_damaged(args.bundle, f, args.work) for f in FAULTS],
        "kill_and_resume": kill_and_resume(
            args.data, args.work / "train", [int(x) for x in args.kill_after.split(",")], args.epochs
        ),
    }
    result["failed_checkpoint_write"] = failed_checkpoint_write(args.work / "train" / "full", args.work)
    result["ok"] = all(r["ok"] for r in result["bundle_faults"]) and all(
        result[k]["ok"] for k in ("kill_and_resume", "failed_checkpoint_write")
    )
    text = json.dumps(result, indent=2)
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "faults.json").write_text(text + "\n")
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
