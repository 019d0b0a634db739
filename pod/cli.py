"""The `pod` command. Each subcommand imports its stage lazily, so a slim serving install (no torch)
can still run `pod serve`."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _data_synth(args: argparse.Namespace) -> None:
    from training.data.synth import write_synthetic

    manifest = write_synthetic(args.out, users=args.users, items=args.items, seed=args.seed, item_index=args.item_index)
    print(f"wrote {args.out}: {json.dumps(manifest['counts'])}")


def _data_prepare(args: argparse.Namespace) -> None:
    from training.data.prepare import prepare
    from training.data.readers import read_source

    raw = read_source(
        args.format, [Path(p) for p in args.inputs], Path(args.explanations) if args.explanations else None
    )
    manifest = prepare(
        raw,
        args.out,
        source_format=args.format,
        item_index=args.item_index,
        seed=args.seed,
        num_negatives=args.negatives,
        min_length=args.min_length,
    )
    print(f"wrote {args.out}: {json.dumps(manifest['counts'])}")


def _train(args: argparse.Namespace) -> None:
    from training.train import TrainConfig, resume_dir, train

    fields = TrainConfig.__dataclass_fields__
    cfg = TrainConfig(**{k: v for k, v in vars(args).items() if k in fields and v is not None})
    if args.tasks:
        cfg.tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if args.no_progress:
        cfg.progress = False
    if args.resume and args.epochs is None:
        # `train` takes the epoch count from `cfg` on resume (to allow extending a run); without --epochs that
        # was the default, 10, which also stretched the LR schedule: a resumed 2-epoch run went on to 10
        state = resume_dir(Path(args.out)) / "training_state.json"
        cfg.epochs = json.loads(state.read_text())["progress"]["config"]["epochs"]
    summary = train(cfg, resume=args.resume)
    if summary.get("best_val") is not None:
        print(f"best validation loss {summary['best_val']:.4f}; checkpoint: {Path(args.out) / 'best'}")


def _evaluate(args: argparse.Namespace) -> None:
    from training.evaluate import evaluate, markdown, write_report

    report = evaluate(
        args.checkpoint,
        args.data,
        task=args.task,
        split=args.split,
        beams=args.beams,
        batch_size=args.batch_size,
        limit=args.limit,
        inference_prompt=args.inference_prompt,
        device=args.device,
        progress=not args.no_progress,
        diversity_penalty=args.diversity_penalty,
    )
    print(markdown(report))
    if args.out:
        write_report(report, args.out)
        print(f"wrote {args.out} and {Path(args.out).with_suffix('.md')}")


def _export(args: argparse.Namespace) -> None:
    from export.export import export_bundle

    export_bundle(
        args.checkpoint,
        args.out,
        data=args.data,
        quantize=args.quantize,
        dtype=args.dtype,
        opset=args.opset,
        force=args.force,
        min_overlap=args.min_overlap,
    )


def _serve(args: argparse.Namespace) -> None:
    import uvicorn

    from service.app import create_app, setup_logging
    from service.settings import ServeSettings

    overrides = {k: v for k, v in vars(args).items() if k in ServeSettings.model_fields and v is not None}
    settings = ServeSettings(**overrides)
    setup_logging(settings.log_level)
    print("pod serve settings: " + json.dumps(settings.model_dump(mode="json")), flush=True)  # the token masked
    uvicorn.run(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        log_level="warning",
        timeout_graceful_shutdown=int(settings.request_timeout_s) + 5,
    )


def _loadtest(args: argparse.Namespace) -> None:
    from loadtests.run import run

    status = run(args)
    if status:
        raise SystemExit(status)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pod", description="POD: prompt-distilled LLM recommendation")
    sub = parser.add_subparsers(dest="command", required=True)

    data = sub.add_parser("data", help="make a prepared data directory").add_subparsers(
        dest="data_command", required=True
    )
    synth = data.add_parser("synth", help="write the embedded synthetic shop")
    synth.add_argument("--out", required=True, type=Path)
    synth.add_argument("--users", type=int, default=1000)
    synth.add_argument("--items", type=int, default=300)
    synth.add_argument("--seed", type=int, default=0)
    synth.add_argument("--item-index", default="keep", choices=["keep", "sequential", "random"])
    synth.set_defaults(func=_data_synth)

    prep = data.add_parser("prepare", help="prepare real data (POD, P5, CSV/Parquet or raw Amazon reviews)")
    prep.add_argument("--format", required=True, choices=["pod", "p5", "csv", "amazon-reviews"])
    prep.add_argument(
        "inputs",
        nargs="+",
        help="pod/p5: the data directory; csv: interactions file; "
        "amazon-reviews: the reviews JSON lines file (gzip or not)",
    )
    prep.add_argument("--explanations", help="csv: explanations file user,item,explanation[,feature]")
    prep.add_argument("--out", required=True, type=Path)
    prep.add_argument(
        "--item-index",
        default="keep",
        choices=["keep", "sequential", "random"],
        help="keep: the source's numbering (paper protocol); random: leak-free (default keep)",
    )
    prep.add_argument("--seed", type=int, default=0)
    prep.add_argument("--negatives", type=int, default=99)
    prep.add_argument("--min-length", type=int, default=3, help="drop users with fewer interactions")
    prep.set_defaults(func=_data_prepare)

    tr = sub.add_parser("train", help="train a POD model (task-alternated by default)")
    tr.add_argument("--data", required=True)
    tr.add_argument("--out", required=True)
    tr.add_argument("--preset", choices=["tiny", "small", "t5-small"])
    tr.add_argument("--backbone", help="local Hugging Face T5 directory (safetensors + spiece.model)")
    tr.add_argument("--tokenizer", help="a SentencePiece model (default: backbone's, else trained on the data)")
    tr.add_argument("--vocab-size", type=int, dest="vocab_size")
    tr.add_argument("--strategy", choices=["alternated", "mixed"])
    tr.add_argument("--tasks", help="comma-separated subset of explanation,sequential,topn")
    tr.add_argument("--num-prompts", type=int, dest="num_prompts", help="K continuous prompts per task (3)")
    tr.add_argument("--epochs", type=int)
    tr.add_argument("--max-minutes", type=float, dest="max_minutes")
    tr.add_argument("--max-steps", type=int, dest="max_steps")
    tr.add_argument("--batch-size", type=int, dest="batch_size", help="64 as in the paper")
    tr.add_argument("--eval-batch-size", type=int, dest="eval_batch_size")
    tr.add_argument("--lr", type=float, help="5e-4 (paper: Beauty/Toys; 1e-3 Sports)")
    tr.add_argument("--weight-decay", type=float, dest="weight_decay")
    tr.add_argument("--warmup-steps", type=int, dest="warmup_steps")
    tr.add_argument("--schedule", choices=["constant", "linear", "cosine"])
    tr.add_argument("--clip", type=float, help="gradient norm clip (1.0; 0 disables)")
    tr.add_argument("--dropout", type=float)
    tr.add_argument("--patience", type=int, help="early stop after N epochs without improvement (5)")
    tr.add_argument("--val-limit", type=int, dest="val_limit")
    tr.add_argument("--save-every", type=int, dest="save_every")
    tr.add_argument("--log-every", type=int, dest="log_every")
    tr.add_argument("--seed", type=int)
    tr.add_argument("--device", choices=["auto", "cpu", "cuda"])
    tr.add_argument("--precision", choices=["auto", "fp32", "bf16"])
    tr.add_argument("--resume", action="store_true", help="continue from OUT/last")
    tr.add_argument("--no-progress", action="store_true")
    tr.set_defaults(func=_train)

    ev = sub.add_parser("evaluate", help="HR/NDCG, BLEU/ROUGE with constrained beam search, beside baselines")
    ev.add_argument("--checkpoint", required=True, help="a checkpoint directory or a training run directory")
    ev.add_argument("--data", required=True)
    ev.add_argument("--task", default="all", choices=["sequential", "topn", "explanation", "all"])
    ev.add_argument("--split", default="test", choices=["val", "test"])
    ev.add_argument("--beams", type=int, default=20)
    ev.add_argument("--batch-size", type=int, default=32)
    ev.add_argument("--limit", type=int, help="evaluate the first N users (and N explanation records) only")
    ev.add_argument("--inference-prompt", default="continuous", choices=["continuous", "continuous+discrete"])
    ev.add_argument(
        "--diversity-penalty",
        type=float,
        default=0.0,
        help="group beam search diversity for explanations (reference code: 0)",
    )
    ev.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    ev.add_argument("--out", help="write JSON here and Markdown next to it")
    ev.add_argument("--no-progress", action="store_true")
    ev.set_defaults(func=_evaluate)

    ex = sub.add_parser("export", help="freeze a checkpoint into an ONNX bundle, with parity checks")
    ex.add_argument("--checkpoint", required=True)
    ex.add_argument("--out", required=True)
    ex.add_argument("--data", help="prepared data the model was trained on (default: from the checkpoint)")
    ex.add_argument("--quantize", default="none", choices=["none", "int8"])
    ex.add_argument("--dtype", default="fp32", choices=["fp32", "fp16"])
    ex.add_argument("--opset", type=int, default=17)
    ex.add_argument(
        "--min-overlap",
        type=float,
        default=0.9,
        help="int8/fp16: least top-10 overlap with fp32 before the export refuses (0.9)",
    )
    ex.add_argument("--force", action="store_true", help="write the bundle even under --min-overlap")
    ex.set_defaults(func=_export)

    sv = sub.add_parser("serve", help="serve a bundle (ONNX Runtime) or a checkpoint (PyTorch) over HTTP")
    sv.add_argument("--bundle", help="bundle directory from `pod export` (env POD_BUNDLE)")
    sv.add_argument("--runtime", choices=["onnx", "torch"])
    sv.add_argument("--checkpoint", help="checkpoint for --runtime torch")
    sv.add_argument("--host")
    sv.add_argument("--port", type=int)
    sv.add_argument("--max-batch-size", type=int, dest="max_batch_size")
    sv.add_argument("--max-wait-ms", type=float, dest="max_wait_ms")
    sv.add_argument("--max-queue", type=int, dest="max_queue")
    sv.add_argument("--request-timeout-s", type=float, dest="request_timeout_s")
    sv.add_argument("--threads", type=int, help="ONNX Runtime intra-op threads")
    sv.add_argument(
        "--normalizer",
        choices=["exact", "allowed"],
        help="item scores: exact log-probabilities (default) or renormalized over valid ID tokens (faster)",
    )
    sv.add_argument("--provider", help="ONNX Runtime provider: auto, cpu, cuda")
    sv.add_argument("--device", help="PyTorch device: auto, cpu, cuda")
    sv.add_argument("--log-level", dest="log_level")
    sv.add_argument(
        "--api-token",
        dest="api_token",
        help="bearer token for the recommendation endpoints; prefer env POD_API_TOKEN (flags show in `ps`)",
    )
    sv.set_defaults(func=_serve)

    from loadtests.run import add_arguments as loadtest_arguments  # argparse only; Locust loads on use

    lt = sub.add_parser("loadtest", help="headless Locust run against a server: CSV, HTML, Markdown, SLO verdict")
    loadtest_arguments(lt)
    lt.set_defaults(func=_loadtest)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (ValueError, FileNotFoundError, KeyError) as exc:  # user errors: one clear line, no traceback
        print(f"pod: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
