"""Training and validation samples per task, and the batches that feed the model.

A sample is a task, an input text with IDs as words (`user_3 item_17 ...`) and a target: an item for
sequential and top-N (written by `Tokenizer.item_target`, so the item-id mode is decided in one place),
a sentence for explanations. What an epoch holds:
- explanation: every training record once;
- sequential, `one` (Algorithm 1 of the paper): one random contiguous segment per user from the training
  part of the sequence (input = segment minus its last item, at most the last 20; target = the last item);
  `all`: every prefix of every training part (target = item t, history = the up to 20 items before it).
  `one` sees each target about once every `len - 1` epochs, which starves a model trained from scratch;
  `causal` (token ids, a causal-history model): the targets of `all` from one sample per user (per 21 items):
  the training part as input and every next item as a target, all read in one pass (`PODModel.next_item_loss`);
- top-N, `one`: one positive from the user's training items plus 99 random items the user never touched;
  `all`: every training item of every user as a positive, each with 99 fresh negatives (inputs are about
  100 items long, so this costs ~`len - 2` times the `one` epoch).
Each sample draws a discrete template; validation uses the bare template only.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np
import torch

from pod import templates
from pod.dataset import MAX_HISTORY, PreparedData
from pod.ids import ANONYMOUS_USER
from pod.tokenization import PAD_ID, Tokenizer

SAMPLINGS = ("one", "all")
SEQUENTIAL_SAMPLINGS = (*SAMPLINGS, "causal")
BUCKET = 32  # batches per length bucket: similar lengths share a batch, so little of a batch is padding


@dataclass(frozen=True)
class Sample:
    """`item` is the target of sequential/top-N samples, `target` the sentence of explanations; `exclude` (set
    on sequential validation samples only) is everything the user bought before the target, which a ranking
    metric masks as evaluation does; `next_items` (causal sequential samples) the item after each input item."""

    task: str
    source: str
    target: str = ""
    item: int | None = None
    exclude: tuple[int, ...] = ()
    next_items: tuple[int, ...] = ()


def sequential_sample(
    data: PreparedData, user: int, rng: random.Random, template: int, anonymous: bool = False
) -> Sample:
    items = data.train_items(user)
    if len(items) < 2:
        history, target = items[:0], items[-1]
    else:
        end = rng.randint(1, len(items) - 1)  # index of the target
        start = rng.randint(0, end - 1)
        history, target = items[start:end][-MAX_HISTORY:], items[end]
    shown = ANONYMOUS_USER if anonymous else user
    return Sample("sequential", templates.fill("sequential", template, shown, history), item=target)


def sequential_prefixes(data: PreparedData, user: int, rng: random.Random, anonymous: bool = False) -> list[Sample]:
    """Every prefix of the user's training part: targets items[1:], each with the up to 20 items before it."""
    items = data.train_items(user)
    shown = ANONYMOUS_USER if anonymous else user
    return [
        Sample(
            "sequential",
            templates.fill("sequential", templates.draw("sequential", rng), shown, items[max(0, t - MAX_HISTORY) : t]),
            item=items[t],
        )
        for t in range(1, len(items))
    ]


def sequential_windows(data: PreparedData, user: int, rng: random.Random, anonymous: bool = False) -> list[Sample]:
    """The targets of `sequential_prefixes` for a causal-history model: windows of up to MAX_HISTORY + 1
    items ending at the training part's end, then every MAX_HISTORY items before it, so every target is
    predicted once (a window's first target sees one item of history, as SASRec's windows do)."""
    items = data.train_items(user)
    shown = ANONYMOUS_USER if anonymous else user
    out = []
    for end in range(len(items), 1, -MAX_HISTORY):
        window = items[max(0, end - MAX_HISTORY - 1) : end]
        text = templates.fill("sequential", templates.draw("sequential", rng), shown, window[:-1])
        out.append(Sample("sequential", text, next_items=tuple(window[1:])))
    return out


def topn_sample(
    data: PreparedData,
    user: int,
    rng: random.Random,
    template: int,
    all_items: list[int],
    negatives: int,
    history: bool = False,
    anonymous: bool = False,
) -> Sample:
    touched = set(data.sequences[user])
    items = data.train_items(user)
    at = rng.randrange(len(items))
    positive = items[at]
    chosen: set[int] = set()
    while len(chosen) < negatives:
        item = all_items[rng.randrange(len(all_items))]
        if item not in touched:
            chosen.add(item)
    candidates = [positive, *sorted(chosen)]
    rng.shuffle(candidates)
    before = items[max(0, at - MAX_HISTORY) : at] if history else ()
    shown = ANONYMOUS_USER if anonymous else user
    return Sample("topn", templates.fill("topn", template, shown, candidates, before), item=positive)


def topn_all(
    data: PreparedData,
    user: int,
    rng: random.Random,
    all_items: np.ndarray,
    negatives: int,
    history: bool = False,
    anonymous: bool = False,
) -> list[Sample]:
    """Every training item of the user as a positive, each with its own `negatives` fresh random items the
    user never touched (vectorized draws with rejection: cheap even for 100k samples)."""
    touched = np.fromiter(set(data.sequences[user]), dtype=np.int64)
    gen = np.random.default_rng(rng.getrandbits(64))
    out = []
    items = data.train_items(user)
    for at, positive in enumerate(items):
        chosen: dict[int, None] = {}  # insertion-ordered set
        while len(chosen) < negatives:
            draw = all_items[gen.integers(0, len(all_items), size=2 * negatives + 8)]
            for item in draw[~np.isin(draw, touched)].tolist():
                chosen.setdefault(item)
                if len(chosen) == negatives:
                    break
        candidates = [positive, *chosen]
        rng.shuffle(candidates)
        before = items[max(0, at - MAX_HISTORY) : at] if history else ()
        shown = ANONYMOUS_USER if anonymous else user
        text = templates.fill("topn", templates.draw("topn", rng), shown, candidates, before)
        out.append(Sample("topn", text, item=positive))
    return out


def explanation_sample(record: dict, template: int) -> Sample:
    return Sample(
        "explanation", templates.fill("explanation", template, record["user"], [record["item"]]), record["explanation"]
    )


def epoch_samples(
    data: PreparedData,
    tasks: list[str],
    rng: random.Random,
    sequential: str = "one",
    topn: str = "one",
    topn_history: bool = False,
    user_ids: bool = True,
) -> dict[str, list[Sample]]:
    """One epoch's training samples per task, drawn from `rng` (so an epoch is reproducible from its seed);
    `sequential` and `topn` choose `one` sample per user or `all` (see the module docstring)."""
    for name, value, allowed in (("sequential", sequential, SEQUENTIAL_SAMPLINGS), ("topn", topn, SAMPLINGS)):
        if value not in allowed:
            raise ValueError(f"{name} samples must be one of {', '.join(allowed)}, not {value!r}")
    out: dict[str, list[Sample]] = {}
    users = data.users
    all_items = data.items
    negatives = data.manifest.get("num_negatives", 99)
    for task in tasks:
        if task == "explanation":
            out[task] = [explanation_sample(r, templates.draw(task, rng)) for r in data.explanations["train"]]
        elif task == "sequential" and sequential == "causal":
            out[task] = [s for u in users for s in sequential_windows(data, u, rng, not user_ids)]
        elif task == "sequential" and sequential == "all":
            out[task] = [s for u in users for s in sequential_prefixes(data, u, rng, not user_ids)]
        elif task == "sequential":
            out[task] = [sequential_sample(data, u, rng, templates.draw(task, rng), not user_ids) for u in users]
        elif task == "topn" and topn == "all":
            pool = np.asarray(all_items, dtype=np.int64)
            out[task] = [s for u in users for s in topn_all(data, u, rng, pool, negatives, topn_history, not user_ids)]
        elif task == "topn":
            out[task] = [
                topn_sample(data, u, rng, templates.draw(task, rng), all_items, negatives, topn_history, not user_ids)
                for u in users
            ]
        else:
            raise ValueError(f"unknown task {task!r}")
        rng.shuffle(out[task])
    return out


def validation_samples(
    data: PreparedData,
    tasks: list[str],
    split: str = "val",
    template: int = templates.BARE,
    topn_history: bool = False,
    user_ids: bool = True,
) -> dict[str, list[Sample]]:
    """Fixed evaluation samples per task (bare template unless asked otherwise)."""
    out: dict[str, list[Sample]] = {}
    for task in tasks:
        if task == "explanation":
            out[task] = [explanation_sample(r, template) for r in data.explanations[split]]
        elif task == "sequential":
            out[task] = []
            for u in data.users:
                history, target = data.eval_example(u, split)
                text = templates.fill(task, template, u if user_ids else ANONYMOUS_USER, history)
                before = data.sequences[u][: len(data.sequences[u]) - (2 if split == "val" else 1)]
                out[task].append(Sample(task, text, item=target, exclude=tuple(before)))
        elif task == "topn":
            out[task] = []
            for u in data.users:
                cands, target = data.candidates(u, split)
                history = data.eval_example(u, split)[0] if topn_history else ()
                shown = u if user_ids else ANONYMOUS_USER
                out[task].append(Sample(task, templates.fill(task, template, shown, cands, history), item=target))
    return {k: v for k, v in out.items() if v}


def collate(samples: list[Sample], tokenizer: Tokenizer, task_index: dict[str, int]) -> dict[str, torch.Tensor]:
    """Tokenize and pad a batch; labels are padded with -100 so padding is out of the loss. Causal samples
    give `next_items` (item tokens, -100 padded) in place of `labels`."""
    enc = [tokenizer.encode_input(s.source) for s in samples]
    causal = bool(samples[0].next_items)
    if causal:
        tgt = [[tokenizer.item_tokens(i)[0] for i in s.next_items] for s in samples]
    else:
        tgt = [
            tokenizer.item_target(s.item) if s.item is not None else tokenizer.encode_target(s.target) for s in samples
        ]
    n_in = max(len(ids) for ids, _ in enc)
    n_out = max(len(t) for t in tgt)
    input_ids = torch.full((len(samples), n_in), PAD_ID, dtype=torch.long)
    whole_word = torch.zeros((len(samples), n_in), dtype=torch.long)
    mask = torch.zeros((len(samples), n_in), dtype=torch.long)
    labels = torch.full((len(samples), n_out), -100, dtype=torch.long)
    for row, ((ids, ww), t) in enumerate(zip(enc, tgt)):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        whole_word[row, : len(ww)] = torch.tensor(ww)
        mask[row, : len(ids)] = 1
        labels[row, : len(t)] = torch.tensor(t)
    return {
        "task_index": torch.tensor([task_index[s.task] for s in samples], dtype=torch.long),
        "input_ids": input_ids,
        "whole_word_ids": whole_word,
        "attention_mask": mask,
        "next_items" if causal else "labels": labels,
    }


def _length(sample: Sample) -> int:
    return len(sample.source) + len(sample.target)


def make_batches(
    samples: dict[str, list[Sample]], batch_size: int, strategy: str, rng: random.Random, rank: int = 0, world: int = 1
) -> list[list[Sample]]:
    """Batches for one epoch: one task per batch cycling through the tasks (`alternated`), or all tasks
    shuffled together (`mixed`). With several processes, each rank gets its own share and every rank
    gets the same number of batches (and, when alternated, the same task at the same step).

    Each run of BUCKET batches of the (shuffled) pool is sorted by input length before it is cut, and the
    batches are then shuffled: a batch pads to its longest input, and on Beauty a random batch padded the
    average every-prefix input to three times its length."""
    if strategy == "mixed":
        pool = [s for task in samples for s in samples[task]]
        rng.shuffle(pool)
        shards = {"mixed": pool}
    elif strategy == "alternated":
        shards = samples
    else:
        raise ValueError(f"--strategy must be alternated or mixed, not {strategy!r}")
    per_task: list[list[list[Sample]]] = []
    for pool in shards.values():
        usable = len(pool) - len(pool) % world
        mine = pool[:usable][rank::world]
        span = batch_size * BUCKET
        ordered = [s for i in range(0, len(mine), span) for s in sorted(mine[i : i + span], key=_length)]
        cut = [ordered[i : i + batch_size] for i in range(0, len(ordered), batch_size)]
        rng.shuffle(cut)
        per_task.append(cut)
    batches: list[list[Sample]] = []
    for step in range(max((len(b) for b in per_task), default=0)):
        for task_batches in per_task:  # explanation -> sequential -> top-N, as in the paper
            if step < len(task_batches):
                batches.append(task_batches[step])
    return batches
