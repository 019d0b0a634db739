"""The paper's efficiency tables on one machine in one run: Table 5 (time per training epoch, task-alternated
vs sample-mixed) and Table 6 (test-set inference time, continuous prompts only vs continuous + discrete).

Why one run: both comparisons are ratios, and ratios measured on different machines, or minutes apart on a
shared machine, mean little. Training throughput comes from `benchmarks/train_throughput.py` (each strategy
at its largest batch, real AdamW steps, epoch time extrapolated from the timed steps); inference times come
from `training.evaluate.evaluate` on the same test users with both `--inference-prompt` settings, extrapolated
from those users to the whole test split. Both extrapolations are labelled as such in the output.

    python benchmarks/efficiency.py --data runs/data/beauty-keep --checkpoint runs/repro/beauty-keep/run \\
        --users 200 --seconds 60 --out runs/repro/efficiency.json
Without `--checkpoint`, a random-init model of `--preset` is timed (speed does not depend on the weights for
the ranking tasks; explanations from random weights run to the token limit, which is the slow case).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH.parent))

from pod.dataset import PreparedData  # noqa: E402

PROMPTS = ("continuous", "continuous+discrete")


def environment(device: str = "auto") -> dict:
    """Hardware, software, date and commit: what every results table must state to be comparable."""
    import torch
    import transformers

    cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if cuda:
        hardware = f"NVIDIA {torch.cuda.get_device_name()}".replace("NVIDIA NVIDIA", "NVIDIA")
    else:
        model = (
            next(
                (
                    line.split(":", 1)[1].strip()
                    for line in Path("/proc/cpuinfo").read_text().splitlines()
                    if line.startswith("model name")
                ),
                platform.processor() or "unknown CPU",
            )
            if Path("/proc/cpuinfo").is_file()
            else platform.processor()
        )
        gpu = "GPU present but unused" if torch.cuda.is_available() else "no GPU"
        hardware = f"{os.cpu_count()}-core {model} CPU, {gpu}"

    def git(*args: str) -> str:
        try:
            return subprocess.run(
                ["git", *args], cwd=BENCH.parent, capture_output=True, text=True, check=True
            ).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            return "unknown"

    return {
        "hardware": hardware,
        "date": datetime.now(timezone.utc).date().isoformat(),
        "commit": git("rev-parse", "--short", "HEAD"),
        "worktree_modified": bool(git("status", "--porcelain", "--untracked-files=no")),
        "software": f"python {platform.python_version()}, torch {torch.__version__}, "
        f"transformers {transformers.__version__}",
    }


def training_efficiency(
    data_dir: str | Path, preset: str, seconds: float, device: str, memory_gib: float, out_dir: Path
) -> dict:
    """Table 5: run the training-throughput benchmark on this data; returns its report plus the epoch times."""
    out_dir.mkdir(parents=True, exist_ok=True)
    out = out_dir / "train_throughput.json"
    cmd = [
        sys.executable,
        str(BENCH / "train_throughput.py"),
        "--data",
        str(data_dir),
        "--preset",
        preset,
        "--seconds",
        str(seconds),
        "--device",
        device,
        "--memory-gib",
        str(memory_gib),
        "--out",
        str(out),
    ]
    subprocess.run(cmd, check=True)
    report = json.loads(out.read_text())
    res = report["results"]
    report["table5"] = {
        "sample-mixed": {"minutes_per_epoch": res["sample-mixed"]["epoch_minutes"]},
        "task-alternated": {"minutes_per_epoch": res["task-alternated"]["epoch_minutes"]},
        "note": "minutes per epoch extrapolated from timed steps (samples per epoch / measured samples per s)",
        "command": " ".join(cmd),
    }
    return report


def random_checkpoint(data_dir: str | Path, preset: str, out: Path) -> Path:
    """A random-init checkpoint with the data's tokenizer, for timing when no trained model is given."""
    import torch

    from pod.model import build_model, save_checkpoint
    from training.train import TrainConfig, tokenizer_for

    data = PreparedData.load(data_dir)
    tok = tokenizer_for(TrainConfig(data=str(data_dir), out=str(out), preset=preset), data, out)
    torch.manual_seed(0)
    save_checkpoint(build_model(tok, preset), tok, out / "best")
    return out / "best"


def inference_efficiency(
    checkpoint: str | Path,
    data_dir: str | Path,
    users: int | None,
    tasks: list[str] | None = None,
    batch_size: int = 32,
    beams: int = 20,
    device: str = "auto",
    topn_scoring: bool = False,
) -> dict:
    """Table 6: the same test users decoded with both inference prompts, task by task, back to back.

    Times are decoding only (`evaluate`'s own clock, after the model is loaded); a few users are decoded
    first so that one-off start-up costs fall on neither side."""
    from training.evaluate import evaluate

    data = PreparedData.load(data_dir)
    tasks = tasks or data.tasks
    total = {"sequential": len(data.users), "topn": len(data.users), "explanation": len(data.explanations["test"])}
    out: dict = {"users": users, "batch_size": batch_size, "beams": beams, "tasks": {}}
    evaluate(checkpoint, data_dir, task=tasks[0], limit=4, device=device, progress=False, topn_scoring=False)
    for task in tasks:
        rows = {}
        for prompt in PROMPTS:
            rep = evaluate(
                checkpoint,
                data_dir,
                task=task,
                split="test",
                beams=beams,
                batch_size=batch_size,
                limit=users,
                inference_prompt=prompt,
                device=device,
                progress=False,
                topn_scoring=topn_scoring,
            )
            res = rep["results"][task]
            n = res.get("records", rep["users"])
            rows[prompt] = {
                "metrics": res["POD"],
                "seconds": res["seconds"],
                "evaluated": n,
                "test_split": total[task],
                "extrapolated_test_seconds": res["seconds"] * total[task] / max(1, n),
                "device": rep["device"],
            }
        c, cd = rows["continuous"]["seconds"], rows["continuous+discrete"]["seconds"]
        rows["time saved by dropping the discrete prompt (%)"] = 100 * (cd - c) / cd if cd else None
        out["tasks"][task] = rows
    return out


def hms(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


def markdown(report: dict) -> str:
    """Tables 5 and 6 in the paper's layout, with what was measured and what was extrapolated."""
    lines = [
        f"hardware: {report.get('hardware', '?')}; date {report.get('date', '?')}; commit {report.get('commit', '?')}",
        "",
    ]
    train = report.get("training")
    if train:
        t5 = train["table5"]
        mixed, alt = t5["sample-mixed"]["minutes_per_epoch"], t5["task-alternated"]["minutes_per_epoch"]
        lines += [
            f"### Table 5: training time per epoch ({train['preset']} preset, "
            f"{train['epoch_samples']} samples per epoch, largest batches {json.dumps(train['batch_sizes'])})",
            "",
            "| strategy | samples/s | time per epoch (extrapolated) |",
            "|---|---|---|",
            f"| sample-mixed | {train['results']['sample-mixed']['samples_per_s']:.1f} | {hms(60 * mixed)} |",
            f"| task-alternated | {train['results']['task-alternated']['samples_per_s']:.1f} | {hms(60 * alt)} |",
            f"| improvement | {train['speedup']:.2f}x | {100 * (mixed - alt) / mixed:.1f}% |",
            "",
        ]
    inf = report.get("inference")
    if inf:
        lines += [
            f"### Table 6: test-set inference time, same users, both prompts ({inf['users'] or 'all'} users per task, "
            f"batch {inf['batch_size']}, {inf['beams']} beams)",
            "",
            "| task | prompt | measured | per user/record | whole test split (extrapolated) | metrics |",
            "|---|---|---|---|---|---|",
        ]
        for task, rows in inf["tasks"].items():
            for prompt in PROMPTS:
                r = rows[prompt]
                shown = ", ".join(
                    f"{k} {v:.4f}" if task != "explanation" else f"{k} {v:.2f}" for k, v in r["metrics"].items()
                )
                lines.append(
                    f"| {task} | {prompt} | {r['seconds']:.1f} s for {r['evaluated']} | "
                    f"{1000 * r['seconds'] / max(1, r['evaluated']):.0f} ms | "
                    f"{hms(r['extrapolated_test_seconds'])} for {r['test_split']} | {shown} |"
                )
            saved = rows["time saved by dropping the discrete prompt (%)"]
            lines.append(f"| {task} | improvement | {saved:.1f}% | | | |")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True, help="prepared data directory")
    ap.add_argument("--checkpoint", help="trained run or checkpoint (default: random-init --preset)")
    ap.add_argument("--preset", default="tiny", help="model shape for the training benchmark and a random model")
    ap.add_argument("--users", type=int, default=200, help="test users (and records) per task for Table 6; 0: all")
    ap.add_argument("--seconds", type=float, default=30.0, help="timed seconds per training strategy")
    ap.add_argument("--memory-gib", type=float, default=32.0, help="CUDA memory budget for the largest batch")
    ap.add_argument("--batch-size", type=int, default=32, help="decoding batch")
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--skip-training", action="store_true")
    ap.add_argument("--skip-inference", action="store_true")
    ap.add_argument("--out", help="write JSON here and Markdown next to it")
    args = ap.parse_args(argv)

    tmp = Path(tempfile.mkdtemp(prefix="pod-eff-"))
    report: dict = {**environment(args.device), "command": " ".join(["python", *sys.argv])}
    if not args.skip_training:
        report["training"] = training_efficiency(
            args.data, args.preset, args.seconds, args.device, args.memory_gib, tmp
        )
    if not args.skip_inference:
        ckpt = args.checkpoint or random_checkpoint(args.data, args.preset, tmp / "random")
        t0 = time.perf_counter()
        report["inference"] = inference_efficiency(
            ckpt, args.data, args.users or None, batch_size=args.batch_size, device=args.device
        )
        report["inference"]["wall_seconds"] = time.perf_counter() - t0
        report["inference"]["checkpoint"] = str(ckpt)
    md = markdown(report)
    print(md)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=2))
        Path(args.out).with_suffix(".md").write_text(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
