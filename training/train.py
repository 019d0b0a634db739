"""Task-alternated training of a POD model, top to bottom.

One run directory holds everything: `best/` (the checkpoint with the lowest mean validation loss, or with
`select_by="hr10"` the highest validation HR@10 of the sequential task: the loss of a one-token item
target is not the ranking metric, and the two can disagree by several epochs),
`last/` (the latest state, with optimizer/scheduler/RNG and the position in the epoch, for `--resume`),
`log.jsonl` (one JSON object per logged step and per epoch), `loss.png` and `spiece.model` when the
vocabulary was trained here. Resuming replays the interrupted epoch's batches from its seed and skips the
ones already done, so a resumed run ends with the same weights as an uninterrupted one.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.data import DataLoader
from tqdm import tqdm
from transformers.modeling_outputs import BaseModelOutput

from pod import TASKS, templates
from pod.dataset import PreparedData
from pod.ids import item_token, user_token
from pod.items import DEFAULT_CLUSTERS, DEFAULT_CODEBOOK, DEFAULT_LEAF_SIZE, DEFAULT_LEVELS, ITEM_MODES, ItemIndex
from pod.model import PODModel, build_model, config_from, load_checkpoint, save_checkpoint
from pod.tokenization import Tokenizer, train_sentencepiece
from training.samples import (
    SAMPLINGS,
    SEQUENTIAL_SAMPLINGS,
    Sample,
    collate,
    epoch_samples,
    make_batches,
    validation_samples,
)
from training.state import read_state, write_state

SELECT_BY = ("auto", "loss", "hr10")
TOP = 10


@dataclass
class TrainConfig:
    data: str
    out: str
    preset: str = "tiny"
    backbone: str | None = None
    tokenizer: str | None = None  # a spiece.model; default: the backbone's, else one trained on the data
    vocab_size: int = 800
    # digits | token | collaborative | semantic; None: the prepared data's `item_ids`, else digits
    item_ids: str | None = None
    item_clusters: int = DEFAULT_CLUSTERS  # collaborative: clusters per level
    item_leaf_size: int = DEFAULT_LEAF_SIZE  # collaborative: largest leaf cluster
    item_levels: int = DEFAULT_LEVELS  # semantic: residual k-means levels (then one disambiguation token)
    item_codebook: int = DEFAULT_CODEBOOK  # semantic: codes per level
    # one: a random segment per user per epoch (paper); all: every prefix; causal: every prefix in one pass per
    # user, with the history read causally (token ids)
    sequential_samples: str = "all"
    topn_samples: str = "one"  # one: one positive per user per epoch (paper); all: every training item
    select_by: str = "auto"  # loss: lowest mean validation loss; hr10: highest sequential HR@10 (token ids); auto:
    # hr10 where it can be computed (token ids and the sequential task), else loss
    topn_history: bool | None = None  # top-N inputs start with the recent history; None: unless item_ids is digits
    user_ids: bool = True  # sequential/top-N inputs name the user; False: the history alone (no memorising users)
    strategy: str = "alternated"
    # None: sequential + explanation for token ids (top-N candidates are then ranked under the sequential prompt,
    # which beat the top-N task's own prompt on Beauty and the synthetic shop, and the time the long top-N inputs
    # took buys more epochs of the others: RESULTS.md), all three tasks otherwise (the paper)
    tasks: list[str] | None = None
    num_prompts: int = 3
    epochs: int = 10
    max_minutes: float | None = None
    max_steps: int | None = None
    batch_size: int = 64
    eval_batch_size: int = 128
    lr: float = 5e-4
    weight_decay: float = 0.01
    warmup_steps: int = 0
    schedule: str = "constant"  # constant | linear | cosine (after warmup)
    clip: float = 1.0
    dropout: float | None = None  # default: the preset's
    label_smoothing: float = 0.0  # share of each target's mass spread over the other classes (training loss only)
    explanation_first: int = 0  # epochs that train explanations alone before every task is trained
    init_std: float | None = None  # random models: token/whole-word embeddings from N(0, init_std); None: T5's 1.0
    patience: int = 5
    val_limit: int | None = None  # validate on a seeded random sample of this many users/records per task
    save_every: int = 0  # also write last/ every N steps (0: at epoch ends and when stopping)
    log_every: int = 10
    seed: int = 0
    device: str = "auto"
    precision: str = "auto"  # auto: fp32 everywhere (bf16 autocast diverged on CUDA, see autocast()); bf16 opt-in
    loader_workers: int | None = None  # processes tokenizing batches ahead; None: 2 on CUDA, 0 (inline) on CPU
    progress: bool = True


def log(cfg_out: Path, record: dict) -> None:
    with open(cfg_out / "log.jsonl", "a") as fh:
        fh.write(json.dumps(record) + "\n")


def check_config(cfg: TrainConfig, data: PreparedData) -> TrainConfig:
    """Resolve the item-id mode from the data when not given, and reject combinations that cannot work."""
    cfg.item_ids = cfg.item_ids or data.item_ids
    if cfg.item_ids not in ITEM_MODES:
        raise ValueError(f"--item-ids must be one of {', '.join(ITEM_MODES)}, not {cfg.item_ids!r}")
    for name, allowed in (("sequential_samples", SEQUENTIAL_SAMPLINGS), ("topn_samples", SAMPLINGS)):
        if getattr(cfg, name) not in allowed:
            raise ValueError(f"--{name.replace('_', '-')} must be one of {', '.join(allowed)}")
    if cfg.sequential_samples == "causal" and cfg.item_ids != "token":
        raise ValueError(
            f"--sequential-samples causal needs --item-ids token (one decoder step per item), not {cfg.item_ids}"
        )
    if cfg.tasks is None:
        cfg.tasks = [t for t in TASKS if t != "topn"] if cfg.item_ids == "token" else list(TASKS)
    if cfg.topn_history is None:
        cfg.topn_history = cfg.item_ids != "digits"  # the paper's form keeps the paper's top-N prompt
    if cfg.select_by == "auto":
        cfg.select_by = "hr10" if cfg.item_ids == "token" and "sequential" in cfg.tasks else "loss"
    if cfg.select_by not in SELECT_BY:
        raise ValueError(f"--select-by must be one of {', '.join(SELECT_BY)}, not {cfg.select_by!r}")
    if cfg.select_by == "hr10" and (cfg.item_ids != "token" or "sequential" not in cfg.tasks):
        raise ValueError("--select-by hr10 needs --item-ids token and the sequential task")
    if not 0.0 <= cfg.label_smoothing < 1.0:
        raise ValueError(f"--label-smoothing must be in [0, 1), not {cfg.label_smoothing}")
    if cfg.explanation_first < 0 or (cfg.explanation_first and "explanation" not in cfg.tasks):
        raise ValueError(f"--explanation-first {cfg.explanation_first} needs a count >= 0 and the explanation task")
    return cfg


def item_index_for(cfg: TrainConfig, data: PreparedData) -> ItemIndex:
    """The item index of the run; collaborative and semantic codes come from the training split only (no leak)."""
    if cfg.item_ids == "token":
        return ItemIndex.token(data.items)
    if cfg.item_ids == "collaborative":
        return ItemIndex.collaborative(
            (data.train_items(u) for u in data.users),
            data.items,
            clusters=cfg.item_clusters,
            leaf_size=cfg.item_leaf_size,
            seed=cfg.seed,
        )
    if cfg.item_ids == "semantic":
        return ItemIndex.semantic(
            (data.train_items(u) for u in data.users),
            data.items,
            levels=cfg.item_levels,
            codebook=cfg.item_codebook,
            seed=cfg.seed,
        )
    return ItemIndex.digits()


def tokenizer_for(cfg: TrainConfig, data: PreparedData, out: Path) -> Tokenizer:
    """The backbone's or the given SentencePiece model, else a small one trained on this data, with the run's
    item index (the same SentencePiece model serves every mode, so `digits` stays what it always was)."""
    index = item_index_for(cfg, data)
    if cfg.tokenizer:
        return Tokenizer(cfg.tokenizer, items=index)
    if cfg.backbone:
        return Tokenizer(Path(cfg.backbone) / "spiece.model", items=index)
    path = out / "spiece.model"
    if not path.exists():
        corpus = [r["explanation"] for r in data.explanations["train"]]
        users, items = data.users[:200], data.items[:200]
        for task, options in templates.TEMPLATES.items():
            for t in range(len(options)):
                corpus += [templates.fill(task, t, u, items[k % len(items) :][:3]) for k, u in enumerate(users[:50])]
        corpus += [f"{user_token(u)} {item_token(i)} {i}" for u, i in zip(users * 10, data.items)]
        train_sentencepiece(corpus, path, cfg.vocab_size)
    return Tokenizer(path, items=index)


def lr_lambda(cfg: TrainConfig, total_steps: int, elapsed_s: Callable[[], float] | None = None):
    """LR factor per step: linear warm-up, then constant or a linear/cosine decay to 0 at the horizon. The
    horizon is `total_steps` or, with `--max-minutes`, the time box when that comes first (`elapsed_s`): a
    time-boxed run then ends its decay when the box closes instead of stopping while the LR is still high."""

    def factor(step: int) -> float:
        if cfg.warmup_steps and step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        if cfg.schedule == "constant":
            return 1.0
        progress = min(1.0, (step - cfg.warmup_steps) / max(1, total_steps - cfg.warmup_steps))
        if cfg.max_minutes and elapsed_s is not None:
            progress = max(progress, min(1.0, elapsed_s() / (60 * cfg.max_minutes)))
        return 1.0 - progress if cfg.schedule == "linear" else 0.5 * (1 + math.cos(math.pi * progress))

    return factor


@torch.no_grad()
def validate(
    model: PODModel,
    samples: dict[str, list[Sample]],
    tokenizer: Tokenizer,
    cfg: TrainConfig,
    device: torch.device,
    rank: int,
    world: int,
) -> tuple[dict[str, float], dict[str, float]]:
    """Token-weighted mean NLL per task on the validation samples, plus `total` = mean over tasks; and, with
    token item ids, the sequential task's HR@10 and NDCG@10 (`sequential_hr10`, `sequential_ndcg10`).

    The ranking is exact and nearly free: the first decoder step of the loss pass already holds every item
    token's logit, so the history items are masked and the target's rank among the rest is counted, which
    is what a one-step top-10 over all items would return (ties counted in the target's favour).

    `explanation_input_gain` is how much worse (nats per token) the explanation targets score when each is read
    through another record's encoder states: near 0, the decoder writes the same sentences whoever the user and
    whatever the item, and beam search will return one sentence for every request.
    """
    model.eval()
    task_index = {t: model.config.task_index(t) for t in model.config.tasks}
    rank_items = tokenizer.item_mode == "token"
    if rank_items:
        items, columns = tokenizer.item_columns()
        columns_t = torch.tensor(columns, device=device)
        col_of = {item: k for k, item in enumerate(items)}
    out: dict[str, float] = {}
    ranking: dict[str, float] = {}
    for task, pool in samples.items():
        pool = pool[rank::world]
        sums = torch.zeros(2, dtype=torch.float64, device=device)
        swapped = torch.zeros(2, dtype=torch.float64, device=device)
        hits = torch.zeros(3, dtype=torch.float64, device=device)  # hits@10, ndcg@10, users
        for i in range(0, len(pool), cfg.eval_batch_size):
            chunk = pool[i : i + cfg.eval_batch_size]
            batch = {k: v.to(device) for k, v in collate(chunk, tokenizer, task_index).items()}
            with autocast(cfg, device):
                hidden, mask = model.encode(
                    batch["task_index"], batch["input_ids"], batch["whole_word_ids"], batch["attention_mask"]
                )
                result = model.t5(encoder_outputs=BaseModelOutput(hidden), attention_mask=mask, labels=batch["labels"])
            loss = result.loss
            n = (batch["labels"] != -100).sum()
            if task == "sequential" and model.causal():
                # what a causal model learns: the next item among items (it is never taught the `</s>` after it)
                first = model.config.causal_items_from
                loss = F.cross_entropy(result.logits[:, 0, first:].float(), batch["labels"][:, 0] - first)
                n = torch.tensor(len(chunk), device=device)
            sums += torch.stack([loss.double() * n, n.double()])
            if task == "explanation" and len(chunk) > 1:
                # the same targets read through the next record's encoder states: a model that ignores its user
                # and item (a fluent but unconditional decoder) loses nothing here
                with autocast(cfg, device):
                    other = model.t5(
                        encoder_outputs=BaseModelOutput(hidden.roll(1, 0)),
                        attention_mask=mask.roll(1, 0),
                        labels=batch["labels"],
                    ).loss
                swapped += torch.stack([other.double() * n, n.double()])
            if rank_items and task == "sequential":
                scores = result.logits[:, 0, :].float().index_select(1, columns_t)
                for row, s in enumerate(chunk):
                    seen = [col_of[h] for h in s.exclude if h in col_of and h != s.item]
                    if seen:
                        scores[row, seen] = -torch.inf
                target = torch.tensor([col_of[s.item] for s in chunk], device=device)
                position = (scores > scores.gather(1, target[:, None])).sum(1)
                top = position < TOP
                gain = torch.where(top, 1.0 / torch.log2(position.double() + 2), torch.zeros_like(position).double())
                hits += torch.stack([top.double().sum(), gain.sum(), torch.tensor(len(chunk), device=device).double()])
        if world > 1:
            dist.all_reduce(sums)
            dist.all_reduce(hits)
            dist.all_reduce(swapped)
        out[task] = (sums[0] / sums[1]).item()
        if swapped[1] > 0:
            ranking[f"{task}_input_gain"] = (swapped[0] / swapped[1]).item() - out[task]
        if hits[2] > 0:
            ranking[f"{task}_hr10"] = (hits[0] / hits[2]).item()
            ranking[f"{task}_ndcg10"] = (hits[1] / hits[2]).item()
    out["total"] = sum(out.values()) / len(out)
    model.train()
    return out, ranking


UNCONDITIONAL_NATS = 0.01  # explanation_input_gain below this: the sentences do not depend on user and item


def unconditional_warning(ranking: dict[str, float]) -> str | None:
    """The warning a run ends with when its explanations ignore their input: the loss can look healthy (a good
    language model of the reviews) while beam search returns one sentence for every request."""
    gain = ranking.get("explanation_input_gain")
    if gain is None or gain >= UNCONDITIONAL_NATS:
        return None
    return (
        f"warning: the explanations do not depend on the user and item (validation loss {gain:+.4f} nats per token "
        "with another record's input), so beam search will write one sentence for every request; with other tasks, "
        'train explanations alone first (--explanation-first 25; README, Training, "Explanations from real reviews")'
    )


def selection_value(cfg: TrainConfig, losses: dict[str, float], ranking: dict[str, float]) -> float:
    """What `best/` and early stopping compare, oriented so that higher is better."""
    return ranking["sequential_hr10"] if cfg.select_by == "hr10" else -losses["total"]


def shown(losses: dict[str, float], ranking: dict[str, float]) -> str:
    text = "loss " + " ".join(f"{t}={v:.4f}" for t, v in losses.items())
    return text + "".join(f" {k}={v:.4f}" for k, v in ranking.items())


def autocast(cfg: TrainConfig, device: torch.device) -> torch.autocast:
    """bf16 autocast only when asked for: `auto` is fp32 on every device.

    Measured on an H200 (RESULTS.md, "bf16 autocast diverges"): random-init models with one token per item, batch
    256, lr 2e-3, trained in bf16 autocast blew up after ~1,700 steps (gradient norm 0.5 -> 10^5, validation
    HR@10 0.028 -> 0.004), step for step reproducibly, while the same run in fp32 stayed at norms 0.2-5 and was
    faster too (7,171 vs 6,170 samples/s: models this small are host-bound, and the casts cost more than they
    save)."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.precision == "bf16")


def plot_losses(out: Path) -> None:
    """loss.png next to the checkpoints: training loss per task (smoothed) and validation loss per epoch."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps: dict[str, list[tuple[int, float]]] = {}
    epochs: dict[str, list[tuple[int, float]]] = {}
    for line in (out / "log.jsonl").read_text().splitlines():
        r = json.loads(line)
        if r.get("event") == "step":
            steps.setdefault(r["task"], []).append((r["step"], r["loss"]))
        elif r.get("event") == "epoch":
            for task, v in r["val_loss"].items():
                epochs.setdefault(task, []).append((r["epoch"], v))
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    for task, pts in steps.items():
        a.plot([p[0] for p in pts], [p[1] for p in pts], label=task)
    a.set(title="training loss", xlabel="step", ylabel="token NLL")
    for task, pts in epochs.items():
        b.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=task)
    b.set(title="validation loss", xlabel="epoch")
    for ax in (a, b):
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / ".loss.png.tmp.png")
    plt.close(fig)
    os.replace(out / ".loss.png.tmp.png", out / "loss.png")


def setup_distributed(cfg: TrainConfig) -> tuple[torch.device, int, int]:
    """Device, rank and world size; under torchrun, joins the process group (NCCL on GPU, gloo on CPU)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    want_cuda = cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
    if want_cuda:
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    else:
        device = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return device, rank, world


def quick_sequential_config(data: str | Path, out: str | Path) -> TrainConfig:
    """The small run that the tests and `make reliability` export and serve (~1 min on 2 cores): the demo's
    recipe (one token per item, every prefix a sample, sequential + explanation with top-N ranked under the
    sequential prompt, the best epoch by validation HR@10), so every endpoint answers from a taught task."""
    return TrainConfig(
        data=str(data),
        out=str(out),
        tasks=["sequential", "explanation"],
        item_ids="token",
        sequential_samples="all",
        select_by="hr10",
        batch_size=64,
        lr=1e-3,
        epochs=100,
        max_steps=1000,
        val_limit=200,
        progress=False,
        seed=0,
    )


def _tensors(batch: list[Sample], tokenizer: Tokenizer, task_index: dict[str, int]) -> tuple[str, int, dict]:
    """(task, targets, tensors): a causal sample holds a target per history item, so rates count targets."""
    targets = sum(len(s.next_items) for s in batch) if batch[0].next_items else len(batch)
    return batch[0].task, targets, collate(batch, tokenizer, task_index)


def batch_loader(
    batches: list[list[Sample]], tokenizer: Tokenizer, task_index: dict[str, int], workers: int, pin: bool
) -> Iterable[tuple[str, int, dict[str, torch.Tensor]]]:
    """(task, size, tensors) per batch, in order. With `workers`, tokenizing and padding run ahead in worker
    processes: on a GPU the host-side collate was a large share of each step (benchmarks/NOTES.md, issue 15);
    on a 2-core CPU a worker would only take a core from the model, so there it runs inline."""
    if workers <= 0:
        return (_tensors(b, tokenizer, task_index) for b in batches)
    return DataLoader(
        batches,
        batch_size=None,  # each item is already a batch
        num_workers=workers,
        collate_fn=partial(_tensors, tokenizer=tokenizer, task_index=task_index),
        pin_memory=pin,
        prefetch_factor=4,
    )


def resume_dir(out: Path) -> Path:
    """`OUT/last`; after a kill between the checkpoint swap's two renames, the previous one is restored from
    `.last.old` first (the swap finished by hand), so every later path points at `last/` as usual."""
    last, old = out / "last", out / ".last.old"
    if not (last / "training_state.json").is_file() and (old / "training_state.json").is_file():
        if last.exists():
            shutil.rmtree(last)
        old.rename(last)
    if not ((last / "training_state.json").is_file() and (last / "config.json").is_file()):
        raise FileNotFoundError(f"{last}: no checkpoint to resume from (run without --resume to start)")
    return last


def train(cfg: TrainConfig, resume: bool = False) -> dict:
    """Run (or resume) training; returns a summary with the best validation loss and where it is."""
    out = Path(cfg.out)
    device, rank, world = setup_distributed(cfg)
    last = resume_dir(out) if resume else out / "last"
    if resume:
        saved = json.loads((last / "training_state.json").read_text())["progress"]["config"]
        saved.update(
            {k: v for k, v in asdict(cfg).items() if k in ("epochs", "max_minutes", "max_steps", "progress", "device")}
        )
        cfg = config_from(TrainConfig, saved, last / "training_state.json")
    data = PreparedData.load(cfg.data)
    cfg = check_config(cfg, data)
    tasks = [t for t in TASKS if t in cfg.tasks and t in data.tasks]
    if not tasks:
        raise ValueError(f"none of the tasks {cfg.tasks} has data in {cfg.data} (it has {data.tasks})")
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
    if world > 1:
        dist.barrier()
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)

    if resume:
        model, tokenizer, _ = load_checkpoint(last, device)
    else:
        tokenizer = tokenizer_for(cfg, data, out) if rank == 0 else None
        if world > 1:
            dist.barrier()
        tokenizer = tokenizer or tokenizer_for(cfg, data, out)
        model = build_model(
            tokenizer,
            cfg.preset,
            cfg.backbone,
            cfg.num_prompts,
            list(TASKS),
            cfg.dropout,
            cfg.topn_history,
            cfg.user_ids,
            cfg.init_std,
            trained=tasks,
            causal_items_from=tokenizer.item_offset if cfg.sequential_samples == "causal" else None,
        )
    model.to(device).train()
    task_index = {t: model.config.task_index(t) for t in model.config.tasks}
    ddp = torch.nn.parallel.DistributedDataParallel(model) if world > 1 else model

    val = validation_samples(data, tasks, topn_history=model.config.topn_history, user_ids=model.config.user_ids)
    if cfg.val_limit:  # a seeded random sample: the first users of a file were numbered first, not a fair sample
        val = {
            t: [v[i] for i in sorted(random.Random(cfg.seed).sample(range(len(v)), min(cfg.val_limit, len(v))))]
            for t, v in val.items()
        }

    # the first epochs may train explanations alone: with both tasks from the start, the explanation decoder
    # learns to ignore its input (RESULTS.md, "One sentence for everyone")
    solo_epochs = cfg.explanation_first if "explanation" in tasks else 0

    def samples_of(rng: random.Random, epoch: int | None = None) -> dict[str, list[Sample]]:
        return epoch_samples(
            data,
            ["explanation"] if epoch is not None and epoch < solo_epochs else tasks,
            rng,
            cfg.sequential_samples,
            cfg.topn_samples,
            model.config.topn_history,
            model.config.user_ids,
        )

    n_batches = len(
        make_batches(
            samples_of(random.Random(cfg.seed)),
            cfg.batch_size,
            cfg.strategy,
            random.Random(0),
            rank,
            world,
        )
    )
    total_steps = n_batches * cfg.epochs  # the schedule horizon; --max-steps/--max-minutes only stop early
    fused = device.type == "cuda"
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, fused=fused)
    progress = {
        "epoch": 0,
        "step_in_epoch": 0,
        "global_step": 0,
        "best_val": None,
        "bad_epochs": 0,
        "elapsed_s": 0.0,
        "done": False,
    }
    # the time-boxed horizon reads `progress` (rebound on --resume: the closure sees the current one); it must
    # exist before the scheduler, whose constructor already asks for the first step's factor
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg, total_steps, lambda: progress["elapsed_s"]))
    if resume:
        progress = read_state(last, optimizer, scheduler)
        if progress.get("done"):
            if rank == 0:
                print(f"{out}: training already finished (best validation loss {progress['best_val']:.4f})")
            return progress
    extra = {"data_manifest": data.manifest, "train_config": asdict(cfg)}

    def save_last(stop: bool = False) -> None:
        if rank != 0:
            return
        state = {**progress, "config": asdict(cfg), "done": stop}
        save_checkpoint(
            model, tokenizer, out / "last", extra, write_more=lambda d: write_state(d, optimizer, scheduler, state)
        )

    def is_better(value: float) -> bool:
        best = progress["best_val"]
        return best is None or value > (best if cfg.select_by == "hr10" else -best)

    def best_of(losses: dict[str, float], ranking: dict[str, float]) -> float:
        """`best_val` keeps its meaning per criterion: the loss (lower is better) or HR@10 (higher)."""
        return ranking["sequential_hr10"] if cfg.select_by == "hr10" else losses["total"]

    start = time.monotonic() - progress["elapsed_s"]
    stop_reason = None
    last_ranking: dict[str, float] = {}  # the last validation's, for the closing warning
    workers = cfg.loader_workers if cfg.loader_workers is not None else (2 if device.type == "cuda" else 0)
    while progress["epoch"] < cfg.epochs and stop_reason is None:
        epoch = progress["epoch"]
        epoch_rng = random.Random(cfg.seed * 1_000_003 + epoch)  # the epoch's samples and order
        batches = make_batches(samples_of(epoch_rng, epoch), cfg.batch_size, cfg.strategy, epoch_rng, rank, world)
        sums: dict[str, list[float]] = {}
        bar = tqdm(
            total=len(batches),
            initial=progress["step_in_epoch"],
            desc=f"epoch {epoch + 1}/{cfg.epochs}",
            disable=not cfg.progress or rank != 0,
            dynamic_ncols=True,
        )
        t_window, n_window = time.monotonic(), 0
        todo = batches[progress["step_in_epoch"] :]
        loader = batch_loader(todo, tokenizer, task_index, workers, pin=device.type == "cuda")
        for task, size, tensors in loader:
            batch = {k: v.to(device, non_blocking=True) for k, v in tensors.items()}
            with autocast(cfg, device):
                loss = ddp(**batch, label_smoothing=cfg.label_smoothing)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            # the norm before clipping is logged: far above --clip means the clip, not --lr, sets the step size
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip or float("inf"))
            optimizer.step()
            scheduler.step()
            progress["step_in_epoch"] += 1
            progress["global_step"] += 1
            task = task if cfg.strategy == "alternated" else "mixed"
            value = loss.item()
            if not math.isfinite(value):
                raise FloatingPointError(
                    f"loss became {value} at step {progress['global_step']} ({task}); "
                    "lower --lr, keep --clip, or use --precision fp32"
                )
            sums.setdefault(task, [0.0, 0])
            sums[task][0] += value
            sums[task][1] += 1
            n_window += size * world
            bar.update(1)
            if progress["global_step"] % cfg.log_every == 0:
                rate = n_window / max(1e-9, time.monotonic() - t_window)
                bar.set_postfix(task=task, loss=f"{value:.3f}", samples_s=f"{rate:.0f}")
                if rank == 0:
                    log(
                        out,
                        {
                            "event": "step",
                            "epoch": epoch,
                            "step": progress["global_step"],
                            "task": task,
                            "loss": value,
                            "lr": scheduler.get_last_lr()[0],
                            "grad_norm": float(grad_norm),
                            "samples_per_s": rate,
                            "world": world,  # processes in the run (torchrun); samples_per_s counts them all
                        },
                    )
                t_window, n_window = time.monotonic(), 0
            progress["elapsed_s"] = time.monotonic() - start
            if cfg.max_minutes is not None and progress["elapsed_s"] > 60 * cfg.max_minutes:
                stop_reason = f"time box of {cfg.max_minutes} min reached"
            elif cfg.max_steps is not None and progress["global_step"] >= cfg.max_steps:
                stop_reason = f"--max-steps {cfg.max_steps} reached"
            if stop_reason:
                break
            if cfg.save_every and progress["global_step"] % cfg.save_every == 0:
                save_last()
        bar.close()
        epoch_done = progress["step_in_epoch"] >= len(batches)
        if not epoch_done:
            if stop_reason.startswith("time box"):  # keep what the time bought as a usable best/
                losses, ranking = validate(model, val, tokenizer, cfg, device, rank, world)
                last_ranking = ranking
                if is_better(selection_value(cfg, losses, ranking)):
                    progress["best_val"] = best_of(losses, ranking)
                    if rank == 0:
                        save_checkpoint(
                            model,
                            tokenizer,
                            out / "best",
                            {**extra, "epoch": epoch + 0.5, "val_loss": losses, "val_ranking": ranking},
                        )
                if rank == 0:
                    log(
                        out,
                        {
                            "event": "stop",
                            "epoch": epoch + 0.5,
                            "val_loss": losses,
                            "val_ranking": ranking,
                            "elapsed_s": time.monotonic() - start,
                        },
                    )
                    print("validation at stop " + shown(losses, ranking), flush=True)
            save_last()  # stopped inside an epoch: resume replays it from here
            break
        losses, ranking = validate(model, val, tokenizer, cfg, device, rank, world)
        last_ranking = ranking
        solo = epoch < solo_epochs  # not yet the model asked for: neither best/ nor patience counts
        improved = not solo and is_better(selection_value(cfg, losses, ranking))
        progress.update(epoch=epoch + 1, step_in_epoch=0, elapsed_s=time.monotonic() - start)
        if improved:
            progress["best_val"], progress["bad_epochs"] = best_of(losses, ranking), 0
            if rank == 0:
                save_checkpoint(
                    model,
                    tokenizer,
                    out / "best",
                    {**extra, "epoch": epoch + 1, "val_loss": losses, "val_ranking": ranking},
                )
        elif not solo:
            progress["bad_epochs"] += 1
        train_loss = {t: s / n for t, (s, n) in sums.items()}
        if rank == 0:
            log(
                out,
                {
                    "event": "epoch",
                    "epoch": epoch + 1,
                    "train_loss": train_loss,
                    "val_loss": losses,
                    "val_ranking": ranking,
                    "best": improved,
                    "elapsed_s": progress["elapsed_s"],
                },
            )
            print(f"epoch {epoch + 1}: validation {shown(losses, ranking)}{'  (best)' if improved else ''}", flush=True)
            plot_losses(out)
        if progress["bad_epochs"] >= cfg.patience:
            stop_reason = f"early stop: no improvement for {cfg.patience} epochs"
        finished = progress["epoch"] >= cfg.epochs or (stop_reason and stop_reason.startswith("early"))
        save_last(stop=bool(finished))
    if rank == 0 and stop_reason:
        print(stop_reason, flush=True)
    if rank == 0 and (warning := unconditional_warning(last_ranking)):
        print(warning, flush=True)
    if world > 1:
        dist.barrier()
    metric = "sequential HR@10" if cfg.select_by == "hr10" else "loss"
    return {**progress, "stop_reason": stop_reason, "best": str(out / "best"), "tasks": tasks, "best_metric": metric}
