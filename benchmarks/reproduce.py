"""Reproduce the paper's tables on the real Amazon data: prepare, train (time-boxed), evaluate, compare.

    python benchmarks/reproduce.py beauty --preset t5-small --train-minutes 6 --out runs/repro/beauty-keep
    python benchmarks/reproduce.py beauty --item-index random ...      # leak-free numbering, beyond the paper
    python benchmarks/reproduce.py music ...                           # explanations from raw reviews

Why a script and not a notebook: a number in RESULTS.md is only worth something with the command, the
hardware, the date and the commit that produced it, so this writes all of them beside the numbers.
Each stage is the library's own code (`training.data.prepare`, `training.train`, `training.evaluate`,
`benchmarks/baselines/sasrec.py`, `benchmarks/efficiency.py`); this file only wires them together and lays
the results beside the paper's (Tables 2-4, `../shared/REFERENCE.md`) and beside baselines that give them
meaning: popularity, the next-ids rule (which exposes the id leak of kept numbering), SASRec trained on the
same split, and retrieval for explanations.

Output under `--out`: `data/` (prepared, unless `--data`), `run/` (training), `eval-<task>.json`,
`results.json` and `results.md`, rewritten after every stage, so a run killed by a time limit still leaves
what it finished.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shlex
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(BENCH))
sys.path.insert(0, str(BENCH / "baselines"))

from efficiency import environment  # noqa: E402

from training.cli import add_explanation_decoding  # noqa: E402  (argparse and the decoding defaults only)

DATASETS: dict[str, dict] = {
    "beauty": {"format": "pod", "source": "data/beauty", "lr": 5e-4},
    "sports": {"format": "pod", "source": "data/sports", "lr": 1e-3},
    "toys": {"format": "pod", "source": "data/toys", "lr": 5e-4},
    "music": {
        "format": "amazon-reviews",
        "source": "data/amazon_musical_instruments/reviews_Musical_Instruments_5.json.gz",
        "lr": 5e-4,
    },
    # the embedded synthetic shop (no shared data needed): for tests and for trying the script out
    "synthetic": {"format": "synth", "source": None, "lr": 1e-3},
}

RECIPE_FLAGS = (
    "item_ids",
    "sequential_samples",
    "topn_samples",
    "select_by",
    "topn_history",
    "user_ids",
    "dropout",
    "label_smoothing",
    "weight_decay",
    "init_std",
    "vocab_size",
    "explanation_first",
)
RANK_METRICS = ("HR@1", "HR@5", "NDCG@5", "HR@10", "NDCG@10")
TEXT_METRICS = ("BLEU-4", "ROUGE-1", "ROUGE-2", "ROUGE-L")


def _row(names: tuple[str, ...], values: tuple[float, ...]) -> dict[str, float]:
    return dict(zip(names, values))


_SEQ = ("HR@5", "NDCG@5", "HR@10", "NDCG@10")
# The paper's Tables 2-4 (pretrained t5-small, kept ids); SASRec as the paper reports it.
PAPER: dict[str, dict[str, dict[str, dict[str, float]]]] = {
    "beauty": {
        "sequential": {
            "POD": _row(_SEQ, (0.0537, 0.0395, 0.0688, 0.0443)),
            "SASRec": _row(_SEQ, (0.0387, 0.0249, 0.0605, 0.0318)),
        },
        "topn": {"POD": _row(RANK_METRICS, (0.0829, 0.1926, 0.1391, 0.2670, 0.1629))},
        "explanation": {"POD": _row(TEXT_METRICS, (1.0630, 15.2517, 1.5737, 11.3283))},
    },
    "sports": {
        "sequential": {
            "POD": _row(_SEQ, (0.0496, 0.0396, 0.0576, 0.0419)),
            "SASRec": _row(_SEQ, (0.0233, 0.0154, 0.0350, 0.0192)),
        },
        "topn": {"POD": _row(RANK_METRICS, (0.0895, 0.2086, 0.1506, 0.2873, 0.1756))},
        "explanation": {"POD": _row(TEXT_METRICS, (1.0013, 14.0168, 2.0436, 11.1236))},
    },
    "toys": {
        "sequential": {
            "POD": _row(_SEQ, (0.0691, 0.0599, 0.0742, 0.0610)),
            "SASRec": _row(_SEQ, (0.0463, 0.0306, 0.0675, 0.0374)),
        },
        "topn": {"POD": _row(RANK_METRICS, (0.0567, 0.1433, 0.1009, 0.2082, 0.1215))},
        "explanation": {"POD": _row(TEXT_METRICS, (2.3053, 12.2889, 3.8512, 10.3923))},
    },
    "music": {},  # the paper has no Musical Instruments results
    "synthetic": {},
}


def find_shared() -> Path:
    """`$POD_SHARED_DIR`, else the nearest `shared/` beside the checkout or above it (as tests/conftest.py)."""
    if os.environ.get("POD_SHARED_DIR"):
        return Path(os.environ["POD_SHARED_DIR"])
    for parent in ROOT.parents:
        if (parent / "shared" / "REFERENCE.md").is_file():
            return parent / "shared"
    return ROOT.parent / "shared"


def prepare_data(dataset: str, shared: Path, out: Path, item_index: str, seed: int) -> dict:
    """Prepare the dataset unless `out` already holds it with the same indexing (re-runs reuse it)."""
    from training.data.prepare import prepare
    from training.data.readers import read_source

    manifest = out / "manifest.json"
    if manifest.is_file():
        existing = json.loads(manifest.read_text())
        if existing.get("item_index") == item_index and existing.get("seed") == seed:
            return existing
        raise ValueError(f"{out} holds data prepared with other settings; pass another --out")
    spec = DATASETS[dataset]
    if spec["format"] == "synth":
        from training.data.synth import write_synthetic

        return write_synthetic(out, users=300, items=150, seed=seed, item_index=item_index)
    source = shared / spec["source"]
    if not source.exists():
        raise FileNotFoundError(f"{source}: shared data not found (set --shared or $POD_SHARED_DIR)")
    raw = read_source(spec["format"], [source], None)
    return prepare(raw, out, source_format=spec["format"], item_index=item_index, seed=seed)


def training_summary(run: Path, summary: dict) -> dict:
    """What the time box bought: steps, epochs, minutes, losses, why it stopped."""
    epochs = []
    log = run / "log.jsonl"
    if log.is_file():
        epochs = [r for r in map(json.loads, log.read_text().splitlines()) if r.get("event") == "epoch"]
    best_cfg = run / "best" / "config.json"
    best = json.loads(best_cfg.read_text()) if best_cfg.is_file() else {}
    return {
        "minutes": summary.get("elapsed_s", 0.0) / 60,
        "steps": summary.get("global_step"),
        "epochs_completed": summary.get("epoch"),
        "stop_reason": summary.get("stop_reason"),
        "best_val_loss": summary.get("best_val"),  # the selection metric's best value (see best_metric)
        "best_metric": summary.get("best_metric", "loss"),  # "loss", or "hr10" (validation HR@10, higher is better)
        "best_checkpoint_epoch": best.get("epoch"),
        "best_val_loss_per_task": best.get("val_loss"),
        "last_epoch_train_loss": epochs[-1]["train_loss"] if epochs else None,
    }


def comparison(dataset: str, item_index: str, pod_eval: dict, sasrec: dict | None) -> dict:
    """Per task: rows (method -> metrics, with where each number comes from) and the targets check."""
    paper = PAPER.get(dataset, {})
    out: dict = {}
    for task, res in pod_eval.items():
        rows: dict[str, dict] = {}
        n = res.get("records", res.get("users"))
        ours = "this run" + (f", {n} test users" if task != "explanation" else f", {n} test records")
        rows["POD (ours)"] = {"metrics": res["POD"], "source": ours}
        if "POD (exact scoring)" in res:
            rows["POD (ours, exact candidate scoring)"] = {"metrics": res["POD (exact scoring)"], "source": ours}
        if "POD" in paper.get(task, {}):
            rows["POD (paper, pretrained t5-small)"] = {"metrics": paper[task]["POD"], "source": "paper Tables 2-4"}
        if "popularity" in res:
            rows["popularity"] = {"metrics": res["popularity"], "source": ours}
        if "next-ids rule" in res and item_index == "keep":
            rows["next-ids rule (id leak, no learning)"] = {"metrics": res["next-ids rule"], "source": ours}
        if task == "sequential" and sasrec is not None:
            rows["SASRec (ours, same split)"] = {
                "metrics": sasrec["test"],
                "source": f"benchmarks/baselines/sasrec.py, {sasrec['users']} test users, "
                f"{sasrec['train_seconds'] / 60:.1f} min, best epoch {sasrec['best_epoch']}",
            }
        if "SASRec" in paper.get(task, {}):
            rows["SASRec (paper)"] = {"metrics": paper[task]["SASRec"], "source": "paper Table 2"}
        if "retrieval" in res:
            rows["retrieval (item's most frequent training sentence)"] = {"metrics": res["retrieval"], "source": ours}
        if "one typical sentence" in res:
            rows["one typical sentence for every record"] = {
                "metrics": res["one typical sentence"],
                "source": f'{ours}: "{res["typical_sentence"]}"',
            }
        targets = {}
        if item_index == "keep" and "POD" in paper.get(task, {}):
            for metric, goal in paper[task]["POD"].items():
                got = res["POD"].get(metric)
                targets[metric] = {"target": goal, "ours": got, "met": got is not None and got >= goal}
        out[task] = {"rows": rows, "targets": targets, "seconds": res.get("seconds")}
    return out


def markdown(report: dict) -> str:
    """results.md: the tables with everything needed to read them."""
    tr = report.get("training") or {}
    ev = report.get("evaluation") or {}
    lines = [
        f"# POD reproduction: {report['dataset']}, item index {report['item_index']}",
        "",
        f"- command: `{report['command']}`",
        f"- hardware: {report['hardware']}; {report['software']}",
        f"- date: {report['date']}; commit: {report['commit']}"
        + (" (with uncommitted changes in the tree)" if report.get("worktree_modified") else ""),
        f"- model: preset {report['settings']['preset']}, random init, batch {report['settings']['batch_size']}, "
        f"lr {report['settings']['lr']}, precision {report['settings']['precision']}",
    ]
    if tr:
        lines.append(
            f"- training: {tr['minutes']:.1f} min, {tr['steps']} steps, {tr['epochs_completed']} full epochs, "
            f"stopped: {tr['stop_reason'] or 'epochs done'}; "
            f"best validation {tr.get('best_metric', 'loss')} {tr['best_val_loss']}"
        )
    if ev:
        scope = (
            "the full test split"
            if not ev.get("limit")
            else f"a SUBSET: a seeded random sample of {ev['limit']} test users (seed {ev.get('seed', 0)})"
        )
        lines.append(f"- evaluation: {scope}, {ev['beams']} beams, prompt {ev['inference_prompt']}")
    if report.get("note"):
        lines.append(f"- note: {report['note']}")
    lines.append("")
    for task, comp in (report.get("comparison") or {}).items():
        metrics = TEXT_METRICS if task == "explanation" else RANK_METRICS
        fmt = "{:.2f}" if task == "explanation" else "{:.4f}"
        lines += [
            f"## {task}",
            "",
            "| method | " + " | ".join(metrics) + " | source |",
            "|---" * (len(metrics) + 2) + "|",
        ]
        for name, row in comp["rows"].items():
            vals = [fmt.format(row["metrics"][m]) if m in row["metrics"] else "-" for m in metrics]
            lines.append(f"| {name} | " + " | ".join(vals) + f" | {row['source']} |")
        if comp["targets"]:
            met = [m for m, t in comp["targets"].items() if t["met"]]
            lines.append(
                f"\ntargets (paper POD): {len(met)} of {len(comp['targets'])} met"
                + (f" ({', '.join(met)})" if met else "")
            )
        if comp.get("seconds"):
            lines.append(f"\ndecoding time: {comp['seconds']:.0f} s")
        lines.append("")
    if report.get("efficiency"):
        from efficiency import markdown as efficiency_markdown

        lines += ["## efficiency (paper Tables 5 and 6)", "", efficiency_markdown(report["efficiency"])]
    return "\n".join(lines)


def write(report: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    if report.get("pod_eval"):
        report["comparison"] = comparison(
            report["dataset"], report["item_index"], report["pod_eval"], report.get("sasrec")
        )
    (out / "results.json").write_text(json.dumps(report, indent=2))
    (out / "results.md").write_text(markdown(report))


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("dataset", choices=sorted(DATASETS), help="music = amazon_musical_instruments (explanations)")
    ap.add_argument("--shared", type=Path, help="the shared folder (default: $POD_SHARED_DIR or ../shared)")
    ap.add_argument("--item-index", choices=["keep", "sequential", "random"], help="default: keep (music: random)")
    ap.add_argument("--data", type=Path, help="an already prepared directory (skips preparation)")
    ap.add_argument("--preset", default="t5-small", choices=["mini", "tiny", "small", "t5-small"])
    ap.add_argument(
        "--tasks",
        help="comma-separated subset of explanation,sequential,topn to train and evaluate (default: pod train's "
        "tasks; every task the data has is evaluated)",
    )
    ap.add_argument("--train-minutes", type=float, default=6.0, help="training time box")
    ap.add_argument("--epochs", type=int, default=100, help="upper bound; the time box or early stopping ends first")
    ap.add_argument("--patience", type=int, default=5, help="epochs without a better validation value before stopping")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--lr", type=float, help="default: the paper's for the dataset (5e-4; Sports 1e-3)")
    ap.add_argument("--warmup-steps", type=int, default=0)
    ap.add_argument("--schedule", default="constant", choices=["constant", "linear", "cosine"])
    ap.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"])
    ap.add_argument(
        "--item-ids", choices=["digits", "token", "collaborative", "semantic"], help="default: the data's (token)"
    )
    ap.add_argument("--sequential-samples", choices=["one", "all", "causal"], help="default: pod train's (all)")
    ap.add_argument("--topn-samples", choices=["one", "all"], help="default: pod train's (one)")
    ap.add_argument("--select-by", choices=["auto", "loss", "hr10"], help="default: pod train's (auto)")
    ap.add_argument("--topn-history", action=argparse.BooleanOptionalAction, help="default: on unless digits")
    ap.add_argument("--user-ids", action=argparse.BooleanOptionalAction, help="inputs name the user (default: on)")
    ap.add_argument("--dropout", type=float, help="default: the preset's")
    ap.add_argument("--label-smoothing", type=float, help="default: pod train's (0)")
    ap.add_argument("--weight-decay", type=float, help="AdamW weight decay (default: pod train's)")
    ap.add_argument("--init-std", type=float, help="random models' embedding init std (default: pod train's)")
    ap.add_argument(
        "--vocab-size", type=int, help="pieces of the SentencePiece model trained on the data (default: pod train's)"
    )
    ap.add_argument(
        "--explanation-first", type=int, help="epochs of explanations alone before both tasks (default: pod train's, 0)"
    )
    ap.add_argument("--val-limit", type=int, help="validate on at most N users/records per task during training")
    ap.add_argument("--checkpoint", type=Path, help="evaluate this run/checkpoint instead of training")
    ap.add_argument(
        "--eval-limit", type=int, help="evaluate a seeded random sample of N test users (--seed; default: all)"
    )
    ap.add_argument("--eval-batch-size", type=int, default=32)
    ap.add_argument("--beams", type=int, default=20)
    ap.add_argument("--no-topn-scoring", action="store_true", help="skip exact top-N candidate scoring (time)")
    add_explanation_decoding(ap)
    ap.add_argument("--sasrec-minutes", type=float, default=0.0, help="also train SASRec for up to M minutes")
    ap.add_argument("--sasrec-report", type=Path, help="include a SASRec JSON from benchmarks/baselines/sasrec.py")
    ap.add_argument("--efficiency", action="store_true", help="also measure Tables 5 and 6 on this machine")
    ap.add_argument("--efficiency-users", type=int, default=200, help="users per task and prompt for Table 6")
    ap.add_argument("--efficiency-seconds", type=float, default=30.0, help="timed seconds per training strategy")
    ap.add_argument("--note", help="a remark printed with the results (e.g. 'reduced CPU run')")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--out", type=Path, help="default: runs/repro/DATASET-INDEX")
    return ap


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    item_index = args.item_index or ("random" if DATASETS[args.dataset]["format"] == "amazon-reviews" else "keep")
    out = args.out or ROOT / "runs" / "repro" / f"{args.dataset}-{item_index}"
    shared = args.shared or find_shared()
    lr = args.lr or DATASETS[args.dataset]["lr"]
    shown = argv if argv is not None else sys.argv[1:]
    report: dict = {
        "dataset": args.dataset,
        "item_index": item_index,
        "command": "python benchmarks/reproduce.py " + shlex.join(shown),
        **environment(args.device),
        "settings": {
            "preset": args.preset,
            "batch_size": args.batch_size,
            "lr": lr,
            "precision": args.precision,
            "train_minutes": args.train_minutes,
            "warmup_steps": args.warmup_steps,
            "schedule": args.schedule,
            "seed": args.seed,
            **{k: getattr(args, k) for k in RECIPE_FLAGS},
        },
        "note": args.note,
    }
    t_start = time.monotonic()

    data_dir = args.data or out / "data"
    if not args.data:
        report["data_manifest_counts"] = prepare_data(args.dataset, shared, data_dir, item_index, args.seed)["counts"]
    from pod.dataset import PreparedData

    data = PreparedData.load(data_dir)
    if args.data:
        report["item_index"] = item_index = data.manifest.get("item_index", item_index)
    train_tasks = [t.strip() for t in args.tasks.split(",")] if args.tasks else None  # None: pod train's default
    tasks = train_tasks or data.tasks  # evaluated: every task the data has (top-N too, under the sequential prompt)
    write(report, out)

    checkpoint = args.checkpoint
    if checkpoint is None:
        from training.train import TrainConfig, train

        cfg = TrainConfig(
            data=str(data_dir),
            out=str(out / "run"),
            preset=args.preset,
            tasks=train_tasks,
            epochs=args.epochs,
            patience=args.patience,
            max_minutes=args.train_minutes,
            batch_size=args.batch_size,
            lr=lr,
            warmup_steps=args.warmup_steps,
            schedule=args.schedule,
            val_limit=args.val_limit,
            seed=args.seed,
            device=args.device,
            precision=args.precision,
            progress=sys.stderr.isatty(),
            **{k: v for k in RECIPE_FLAGS if (v := getattr(args, k)) is not None},
        )
        summary = train(cfg)
        report["training"] = training_summary(out / "run", summary)
        checkpoint = out / "run"
        write(report, out)

    from pod.recommender import DecodingConfig
    from training.evaluate import evaluate

    config = DecodingConfig.of(args)
    report["evaluation"] = {
        "limit": args.eval_limit,
        "seed": args.seed,
        "beams": args.beams,
        "decoding": dataclasses.asdict(config),
        "inference_prompt": "continuous",
        "checkpoint": str(checkpoint),
    }
    report["pod_eval"] = {}
    for task in tasks:  # one task at a time, written as it finishes
        rep = evaluate(
            checkpoint,
            data_dir,
            task=task,
            split="test",
            beams=args.beams,
            batch_size=args.eval_batch_size,
            limit=args.eval_limit,
            seed=args.seed,
            device=args.device,
            progress=sys.stderr.isatty(),
            topn_scoring=not args.no_topn_scoring,
            config=config,
        )
        report["pod_eval"][task] = {**rep["results"][task], "users": rep["users"]}
        report["evaluation"]["device"] = rep["device"]
        (out / f"eval-{task}.json").write_text(json.dumps(rep, indent=2))
        write(report, out)
        print(f"evaluated {task} ({time.monotonic() - t_start:.0f} s since start)", flush=True)

    if args.sasrec_report:
        report["sasrec"] = json.loads(args.sasrec_report.read_text())
    elif args.sasrec_minutes > 0 and "sequential" in tasks:
        from sasrec import SASRecConfig, train_sasrec

        dev = "cuda" if args.device in ("auto", "cuda") and report["hardware"].startswith("NVIDIA") else "cpu"
        report["sasrec"] = train_sasrec(data, SASRecConfig(minutes=args.sasrec_minutes, device=dev), log=print)
    if report.get("sasrec"):
        report["sasrec"].pop("history", None)
        write(report, out)

    if args.efficiency:
        from efficiency import inference_efficiency, training_efficiency

        eff: dict = {k: report[k] for k in ("hardware", "date", "commit")}
        eff["training"] = training_efficiency(
            data_dir, args.preset, args.efficiency_seconds, args.device, 32.0, out / "efficiency"
        )
        write({**report, "efficiency": eff}, out)
        eff["inference"] = inference_efficiency(
            checkpoint, data_dir, args.efficiency_users, tasks, args.eval_batch_size, args.beams, args.device
        )
        report["efficiency"] = eff
        write(report, out)

    report["total_minutes"] = (time.monotonic() - t_start) / 60
    write(report, out)
    print((out / "results.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
