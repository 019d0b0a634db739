"""The training stage's subcommands: `pod data synth`, `pod data prepare`, `pod train`, `pod evaluate`.

`register` only declares flags (argparse and the standard library); each command imports its modules, and
with them torch, when it runs.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import TYPE_CHECKING

from pod.recommender import (  # numpy and sentencepiece only: the defaults' one home
    TOPN_PROMPT_HELP,
    TOPN_PROMPTS,
    DecodingConfig,
)

if TYPE_CHECKING:  # torch comes with it: imported when a command runs, not when the parser is built
    from training.train import TrainConfig

TRAIN_DEFAULTS: dict[str, object] = {
    "preset": "tiny",
    "vocab_size": 800,
    "strategy": "alternated",
    "num_prompts": 3,
    "epochs": 10,
    "batch_size": 64,
    "eval_batch_size": 128,
    "lr": 5e-4,
    "weight_decay": 0.01,
    "label_smoothing": 0.0,
    "warmup_steps": 0,
    "schedule": "constant",
    "clip": 1.0,
    "patience": 5,
    "save_every": 0,
    "log_every": 10,
    "seed": 0,
    "device": "auto",
    "precision": "auto",
    "item_clusters": 16,
    "item_leaf_size": 64,
    "item_levels": 3,
    "item_codebook": 32,
    "sequential_samples": "all",
    "topn_samples": "one",
    "select_by": "auto",
    "user_ids": True,
    "explanation_first": 0,
}
"""`training.train.TrainConfig`'s defaults, written out by hand for the help text: `pod train` flags default to
None so that TrainConfig decides, and TrainConfig lives beside torch (tests/test_cli.py keeps the two equal)."""


RECIPES: dict[str, dict[str, object]] = {
    # Measured on Beauty and Sports (RESULTS.md, "Narrower and regularized"): beats our SASRec in 30 minutes on
    # one CPU core, leak-free. On Sports, --lr 1e-3.
    "catalog": {
        "tasks": "sequential",
        "sequential_samples": "causal",
        "preset": "mini",
        "batch_size": 32,
        "lr": 2e-3,
        "label_smoothing": 0.2,
        "weight_decay": 0.1,
        "init_std": 0.05,
        "epochs": 1000,
        "patience": 40,
        "max_minutes": 30.0,
        "val_limit": 5000,
    },
}
"""Named sets of `pod train` flags; a flag given on the command line wins over its recipe's value."""


def _default(name: str) -> str:
    value = TRAIN_DEFAULTS[name]
    return f"(default: {','.join(value) if isinstance(value, list) else value})"


def _data_synth(args: argparse.Namespace) -> None:
    from training.data.synth import write_synthetic

    manifest = write_synthetic(
        args.out, users=args.users, items=args.items, seed=args.seed, item_index=args.item_index, item_ids=args.item_ids
    )
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
        item_ids=args.item_ids,
    )
    print(f"wrote {args.out}: {json.dumps(manifest['counts'])}")


def train_config(args: argparse.Namespace) -> TrainConfig:
    """The TrainConfig a `pod train` command line asks for: its flags, then its --recipe's, then the defaults."""
    from training.train import TrainConfig

    given = {k: v for k, v in vars(args).items() if v is not None}
    values = {**RECIPES.get(args.recipe or "", {}), **given}
    fields = TrainConfig.__dataclass_fields__
    cfg = TrainConfig(**{k: v for k, v in values.items() if k in fields and k != "tasks"})
    if values.get("tasks"):
        cfg.tasks = [t.strip() for t in values["tasks"].split(",") if t.strip()]
    if args.no_progress:
        cfg.progress = False
    return cfg


def _train(args: argparse.Namespace) -> None:
    from training.train import resume_dir, train

    cfg = train_config(args)
    if args.resume and args.epochs is None:
        # `train` takes the epoch count from `cfg` on resume (to allow extending a run); without --epochs that
        # was the default, 10, which also stretched the LR schedule: a resumed 2-epoch run went on to 10
        state = resume_dir(Path(args.out)) / "training_state.json"
        cfg.epochs = json.loads(state.read_text())["progress"]["config"]["epochs"]
    summary = train(cfg, resume=args.resume)
    if summary.get("best_val") is not None:
        metric = summary.get("best_metric", "loss")
        print(f"best validation {metric} {summary['best_val']:.4f}; checkpoint: {Path(args.out) / 'best'}")


def _evaluate(args: argparse.Namespace) -> None:
    from pod.recommender import DecodingConfig
    from training.evaluate import evaluate, markdown, write_report

    report = evaluate(
        args.checkpoint,
        args.data,
        task=args.task,
        split=args.split,
        batch_size=args.batch_size,
        limit=args.limit,
        seed=args.seed,
        inference_prompt=args.inference_prompt,
        device=args.device,
        progress=not args.no_progress,
        config=DecodingConfig.of(args),
    )
    print(markdown(report))
    if args.out:
        write_report(report, args.out)
        print(f"wrote {args.out} and {Path(args.out).with_suffix('.md')}")


def _register_data(sub: argparse._SubParsersAction) -> None:
    data = sub.add_parser(
        "data", help="make a prepared data directory", description="Make a prepared data directory."
    ).add_subparsers(dest="data_command", required=True)

    synth = data.add_parser(
        "synth", help="write the embedded synthetic shop", description="Write the embedded synthetic shop."
    )
    synth.add_argument("--out", required=True, type=Path, help="the prepared data directory to write")
    synth.add_argument("--users", type=int, default=1000, help="number of users")
    synth.add_argument("--items", type=int, default=300, help="number of items")
    synth.add_argument("--seed", type=int, default=0, help="random seed of the shop")
    synth.add_argument(
        "--item-index",
        default="keep",
        choices=["keep", "sequential", "random"],
        help="item numbering: keep (the generator's), sequential, or random (leak-free)",
    )
    _item_ids_argument(synth)
    synth.set_defaults(func=_data_synth)

    prep = data.add_parser(
        "prepare",
        help="prepare real data (POD, P5, CSV/Parquet or raw Amazon reviews)",
        description="Prepare real data: POD, P5, CSV/Parquet or raw Amazon reviews (see docs/DATA.md).",
    )
    prep.add_argument(
        "--format", required=True, choices=["pod", "p5", "csv", "amazon-reviews"], help="the source's format"
    )
    prep.add_argument(
        "inputs",
        nargs="+",
        help="pod/p5: the data directory; csv: interactions file; "
        "amazon-reviews: the reviews JSON lines file (gzip or not)",
    )
    prep.add_argument("--explanations", help="csv: explanations file user,item,explanation[,feature]")
    prep.add_argument("--out", required=True, type=Path, help="the prepared data directory to write")
    prep.add_argument(
        "--item-index",
        default="keep",
        choices=["keep", "sequential", "random"],
        help="keep: the source's numbering (paper protocol); random: leak-free",
    )
    prep.add_argument("--seed", type=int, default=0, help="seed of the item permutation, splits and negatives")
    prep.add_argument("--negatives", type=int, default=99, help="fixed negatives per user for top-N")
    prep.add_argument("--min-length", type=int, default=3, help="drop users with fewer interactions")
    _item_ids_argument(prep)
    prep.set_defaults(func=_data_prepare)


def _item_ids_argument(parser: argparse.ArgumentParser) -> None:
    """`--item-ids` of `data synth` and `data prepare`: recorded in the manifest as `pod train`'s default."""
    parser.add_argument(
        "--item-ids",
        default="token",
        choices=["digits", "token", "collaborative", "semantic"],
        help="how `pod train` writes items unless told otherwise (manifest item_ids; digits is the paper's "
        "form); the split is the same",
    )


def add_explanation_decoding(parser: argparse.ArgumentParser) -> None:
    """How explanations are decoded: `pod evaluate`'s and `benchmarks/reproduce.py`'s flags (the service's
    settings of the same names)."""
    parser.add_argument(
        "--explanation-beams",
        type=int,
        default=DecodingConfig.explanation_beams,
        help="beams for explanations, a multiple of --explanation-groups (1 with 1 group: greedy)",
    )
    parser.add_argument(
        "--explanation-groups", type=int, default=DecodingConfig.explanation_groups, help="group beam search groups"
    )
    parser.add_argument(
        "--no-repeat-ngram",
        type=int,
        default=DecodingConfig.no_repeat_ngram,
        help="explanations: no n-gram of this size twice in a sentence (0: off, the paper's decoding)",
    )


def _register_train(sub: argparse._SubParsersAction) -> None:
    d = _default
    tr = sub.add_parser(
        "train",
        help="train a POD model (task-alternated by default)",
        description="Train a POD model (task-alternated by default). Flags left out take TrainConfig's "
        "defaults, shown below; on --resume, the saved run's settings.",
    )
    tr.add_argument("--data", required=True, help="a prepared data directory (`pod data ...`)")
    tr.add_argument("--out", required=True, help="the run directory (best/, last/, log.jsonl, loss.png)")
    tr.add_argument(
        "--recipe",
        choices=sorted(RECIPES),
        help="a measured set of flags; flags given explicitly win. catalog: a large real catalog's sequential task "
        "in 30 CPU minutes ("
        + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in RECIPES["catalog"].items())
        + ") (default: none)",
    )
    tr.add_argument("--preset", choices=["mini", "tiny", "small", "t5-small"], help=f"model shape {d('preset')}")
    tr.add_argument(
        "--backbone",
        help="local Hugging Face T5 directory (safetensors + spiece.model) (default: none, random weights)",
    )
    tr.add_argument("--tokenizer", help="a SentencePiece model (default: backbone's, else trained on the data)")
    tr.add_argument(
        "--vocab-size",
        type=int,
        dest="vocab_size",
        help=f"vocabulary of the tokenizer trained on the data {d('vocab_size')}",
    )
    tr.add_argument(
        "--strategy",
        choices=["alternated", "mixed"],
        help=f"alternated: one task per batch; mixed: tasks mixed in a batch {d('strategy')}",
    )
    tr.add_argument(
        "--tasks",
        help="comma-separated subset of explanation,sequential,topn (default: sequential,explanation for token "
        "ids, whose top-N candidates are ranked under the sequential prompt; all three otherwise)",
    )
    tr.add_argument(
        "--num-prompts", type=int, dest="num_prompts", help=f"K continuous prompts per task {d('num_prompts')}"
    )
    tr.add_argument("--epochs", type=int, help=f"epochs {d('epochs')}; on --resume: the run's")
    tr.add_argument(
        "--max-minutes", type=float, dest="max_minutes", help="stop after this many minutes (default: no limit)"
    )
    tr.add_argument("--max-steps", type=int, dest="max_steps", help="stop after this many steps (default: no limit)")
    tr.add_argument(
        "--batch-size", type=int, dest="batch_size", help=f"training batch size, as in the paper {d('batch_size')}"
    )
    tr.add_argument(
        "--eval-batch-size", type=int, dest="eval_batch_size", help=f"validation batch size {d('eval_batch_size')}"
    )
    tr.add_argument("--lr", type=float, help=f"AdamW learning rate; paper: 5e-4 Beauty/Toys, 1e-3 Sports {d('lr')}")
    tr.add_argument("--weight-decay", type=float, dest="weight_decay", help=f"AdamW weight decay {d('weight_decay')}")
    tr.add_argument(
        "--warmup-steps", type=int, dest="warmup_steps", help=f"linear LR warm-up steps {d('warmup_steps')}"
    )
    tr.add_argument(
        "--schedule",
        choices=["constant", "linear", "cosine"],
        help="LR schedule after warm-up (linear/cosine decay to 0 by the last epoch or, with --max-minutes, by the "
        f"end of the time box if that comes first) {d('schedule')}",
    )
    tr.add_argument("--clip", type=float, help=f"gradient norm clip, 0 disables {d('clip')}")
    tr.add_argument("--dropout", type=float, help="dropout rate (default: the preset's)")
    tr.add_argument(
        "--label-smoothing",
        type=float,
        dest="label_smoothing",
        help=f"share of each target's mass spread over the other classes in the training loss {d('label_smoothing')}",
    )
    tr.add_argument(
        "--loader-workers",
        type=int,
        dest="loader_workers",
        help="processes that tokenize batches ahead (default: 2 on CUDA, 0 = inline on CPU)",
    )
    tr.add_argument(
        "--init-std",
        type=float,
        dest="init_std",
        help="random models (no --backbone): token and whole-word embeddings from N(0, STD) (default: T5's own, "
        "std 1.0). 0.05 learned Beauty's sequential task ~1.8x better in 30 CPU minutes but the synthetic "
        "three-task demo much worse (RESULTS.md)",
    )
    tr.add_argument("--patience", type=int, help=f"early stop after N epochs without improvement {d('patience')}")
    tr.add_argument(
        "--val-limit",
        type=int,
        dest="val_limit",
        help="validate on at most N users/records per task (default: all)",
    )
    tr.add_argument(
        "--save-every",
        type=int,
        dest="save_every",
        help=f"also write last/ every N steps; 0: at epoch ends and when stopping {d('save_every')}",
    )
    tr.add_argument("--log-every", type=int, dest="log_every", help=f"log the loss every N steps {d('log_every')}")
    tr.add_argument("--seed", type=int, help=f"random seed {d('seed')}")
    tr.add_argument("--device", choices=["auto", "cpu", "cuda"], help=f"auto: CUDA when available {d('device')}")
    tr.add_argument(
        "--precision",
        choices=["auto", "fp32", "bf16"],
        help=f"auto: fp32 on every device (bf16 autocast diverged on CUDA with random-init models) {d('precision')}",
    )
    tr.add_argument(
        "--item-ids",
        dest="item_ids",
        choices=["digits", "token", "collaborative", "semantic"],
        help="items as digit pieces (paper), one token each, collaborative cluster codes, or semantic "
        "(residual k-means) codes (default: the data's manifest item_ids, else digits)",
    )
    tr.add_argument(
        "--item-clusters",
        type=int,
        dest="item_clusters",
        help=f"collaborative: clusters per level {d('item_clusters')}",
    )
    tr.add_argument(
        "--item-leaf-size", type=int, dest="item_leaf_size", help=f"collaborative: largest leaf {d('item_leaf_size')}"
    )
    tr.add_argument(
        "--item-levels",
        type=int,
        dest="item_levels",
        help=f"semantic: residual k-means levels, before the disambiguation token {d('item_levels')}",
    )
    tr.add_argument(
        "--item-codebook", type=int, dest="item_codebook", help=f"semantic: codes per level {d('item_codebook')}"
    )
    tr.add_argument(
        "--sequential-samples",
        dest="sequential_samples",
        choices=["one", "all", "causal"],
        help="one random segment per user per epoch (paper), every prefix, or every prefix in one pass per user "
        f"with the history read causally (token ids; several times the targets per second) {d('sequential_samples')}",
    )
    tr.add_argument(
        "--explanation-first",
        dest="explanation_first",
        type=int,
        help=f"epochs that train explanations alone before every task is trained {d('explanation_first')}",
    )
    tr.add_argument(
        "--topn-samples",
        dest="topn_samples",
        choices=["one", "all"],
        help=f"one positive per user per epoch (paper), or every training item {d('topn_samples')}",
    )
    tr.add_argument(
        "--select-by",
        dest="select_by",
        choices=["auto", "loss", "hr10"],
        help="best/ and early stopping: validation loss, or sequential HR@10 (token ids); auto: HR@10 where it "
        f"can be computed, else loss {d('select_by')}",
    )
    tr.add_argument(
        "--topn-history",
        dest="topn_history",
        action=argparse.BooleanOptionalAction,
        help="top-N inputs start with the user's recent history (default: on, except with --item-ids digits, "
        "the paper's form)",
    )
    tr.add_argument(
        "--user-ids",
        dest="user_ids",
        action=argparse.BooleanOptionalAction,
        help=f"sequential and top-N inputs name the user (the paper); --no-user-ids: the history alone {d('user_ids')}",
    )
    tr.add_argument("--resume", action="store_true", help="continue from OUT/last")
    tr.add_argument("--no-progress", action="store_true", help="no progress bars")
    tr.set_defaults(func=_train)


def _register_evaluate(sub: argparse._SubParsersAction) -> None:
    ev = sub.add_parser(
        "evaluate",
        help="HR/NDCG, BLEU/ROUGE with constrained beam search, beside baselines",
        description="HR/NDCG and BLEU/ROUGE with constrained beam search, beside the popularity, next-ids "
        "and retrieval baselines.",
    )
    ev.add_argument("--checkpoint", required=True, help="a checkpoint directory or a training run directory")
    ev.add_argument("--data", required=True, help="the prepared data directory the model was trained on")
    ev.add_argument("--task", default="all", choices=["sequential", "topn", "explanation", "all"], help="task(s)")
    ev.add_argument("--split", default="test", choices=["val", "test"], help="split to evaluate")
    ev.add_argument("--beams", type=int, default=DecodingConfig.beams, help="beams for sequential and top-N")
    ev.add_argument("--batch-size", type=int, default=32, help="users per batch")
    ev.add_argument(
        "--limit",
        type=int,
        help="evaluate a seeded random sample of N users (and N explanation records) (default: every user)",
    )
    ev.add_argument("--seed", type=int, default=0, help="seed of the --limit sample")
    ev.add_argument(
        "--inference-prompt",
        default="continuous",
        choices=["continuous", "continuous+discrete"],
        help="prompts at inference; continuous+discrete is the paper's Table 6 ablation",
    )
    ev.add_argument(
        "--diversity-penalty",
        type=float,
        default=DecodingConfig.diversity_penalty,
        help="group beam search diversity for explanations (reference code: 0)",
    )
    add_explanation_decoding(ev)
    ev.add_argument(
        "--topn-prompt",
        default=DecodingConfig.topn_prompt,
        choices=list(TOPN_PROMPTS),
        help=f"{TOPN_PROMPT_HELP} (default: {DecodingConfig.topn_prompt})",
    )
    ev.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="auto: CUDA when available")
    ev.add_argument("--out", help="write JSON here and Markdown next to it")
    ev.add_argument("--no-progress", action="store_true", help="no progress bars")
    ev.set_defaults(func=_evaluate)


def register(sub: argparse._SubParsersAction) -> None:
    """Add `data synth`, `data prepare`, `train` and `evaluate` to the `pod` command's subparsers."""
    _register_data(sub)
    _register_train(sub)
    _register_evaluate(sub)
