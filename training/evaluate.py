"""`pod evaluate`: the paper's protocol with constrained decoding, beside baselines that give numbers meaning.

Every list comes from `pod.recommender.Recommender`, the same code the server and the export's parity
checks run, over the PyTorch runtime:
- sequential: 20-beam search over the trie of all item IDs (items already in the history excluded), top-10
  from the finished beams; HR@1/5/10, NDCG@5/10.
- top-N: 20-beam search over the trie of the user's 100 candidates, and exact candidate scoring (every
  candidate's full log-likelihood, the service's `mode: "score"`); how often the two disagree is reported.
- explanation: group beam search (21 beams in 3 groups) and the best sequence; BLEU-4, ROUGE-1/2/L.
Baselines: popularity (sequential, top-N), the "next ids after the largest in the history" rule (meaningful on
kept ids, where it exposes the indexing leak), and retrieval for explanations (the item's most frequent
training explanation).

Users are all users, or a seeded random sample (`limit`): the first users of a file were numbered first and
are not a fair sample.
"""

from __future__ import annotations

import dataclasses
import gc
import itertools
import json
import random
import time
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from pod import templates
from pod.dataset import PreparedData
from pod.metrics import ranking_metrics, text_metrics
from pod.model import load_checkpoint
from pod.recommender import (
    Catalog,
    DecodingConfig,
    ExplainJob,
    Recommender,
    SequentialJob,
    TopNJob,
    by_length,
    sample_users,
)
from pod.torch_runtime import TorchRuntime

TOP = 10


def run_batched(
    recommender: Recommender,
    task: str,
    jobs: Sequence,
    fn: Callable,
    batch_size: int,
    progress: bool,
    workers: int | None = None,
):
    """`fn` (a Recommender method) over `jobs` in length-sorted batches; results in the jobs' order.

    On a GPU two batches are in flight (`workers`, default 2 there and 1 elsewhere): while one thread waits for
    the card's answer (a wait that releases the GIL), the other tokenizes the next batch and queues its work,
    so the card no longer idles while the host prepares. The first batch runs alone, so lazily built graphs are
    built once. On a CPU the model already uses every core, so batches run one after another."""
    collecting = gc.isenabled()
    gc.disable()  # the split's histories and caches are many live containers, and scanning them at every
    try:  # collection was a third of an evaluation's host time; reference counting still frees what this makes
        return _run_batched(recommender, task, jobs, fn, batch_size, progress, workers)
    finally:
        if collecting:
            gc.enable()


def _run_batched(recommender, task, jobs, fn, batch_size, progress, workers):
    out: list = [None] * len(jobs)
    batches = list(by_length(recommender, task, jobs, batch_size))
    device = getattr(recommender.runtime, "device", None)
    workers = workers or (2 if getattr(device, "type", None) == "cuda" else 1)

    def run(batch: list[int]) -> tuple[list[int], list]:
        return batch, fn([jobs[n] for n in batch])

    pool = ThreadPoolExecutor(workers) if workers > 1 else None
    try:
        first = [run(b) for b in batches[:1]]  # alone: graphs and caches built once
        rest = pool.map(run, batches[1:]) if pool else map(run, batches[1:])
        for batch, ranked in tqdm(itertools.chain(first, rest), total=len(batches), desc=task, disable=not progress):
            for n, result in zip(batch, ranked):
                out[n] = result
    finally:
        if pool:
            pool.shutdown(cancel_futures=True)
    return out


def load_recommender(
    checkpoint: str | Path, data: PreparedData, device: str = "auto", config: DecodingConfig | None = None, **kw
) -> Recommender:
    """A checkpoint behind the one recommender, on the PyTorch runtime (bf16 on CUDA)."""
    dev = "cuda" if device == "auto" and torch.cuda.is_available() else ("cpu" if device == "auto" else device)
    model, tokenizer, _ = load_checkpoint(checkpoint, dev)
    runtime = TorchRuntime(model, tokenizer, dev, bf16=dev == "cuda")
    return Recommender(runtime, Catalog.from_prepared(data, tokenizer), config, **kw)


def evaluate(
    checkpoint: str | Path,
    data_dir: str | Path,
    task: str = "all",
    split: str = "test",
    beams: int | None = None,
    batch_size: int = 32,
    limit: int | None = None,
    seed: int = 0,
    inference_prompt: str = "continuous",
    device: str = "auto",
    progress: bool = True,
    config: DecodingConfig | None = None,
    topn_scoring: bool = True,
    keep_lists: bool = False,
) -> dict:
    """Evaluate a checkpoint on a prepared split; returns a JSON-able report with baselines beside the model.

    `topn_scoring=False` skips exact candidate scoring, for time-boxed runs that can only afford the beam
    search the paper used. `keep_lists=True` adds every user's top-10 (`lists`), to compare with a server.
    Decoding follows `config` (the service's defaults when None); `beams` overrides its beam count."""
    data = PreparedData.load(data_dir)
    config = config or DecodingConfig()
    if beams is not None:
        config = dataclasses.replace(config, beams=beams)
    template = templates.WORDY if inference_prompt == "continuous+discrete" else templates.BARE
    rec = load_recommender(checkpoint, data, device, config, template=template)
    tasks = [t for t in ("sequential", "topn", "explanation") if task in ("all", t) and t in data.tasks]
    untaught = [t for t in tasks if not rec.serves(t)]  # random prompts: no figure would mean anything
    if untaught and task != "all":
        raise ValueError(f"{checkpoint}: the model was not trained for {task} (only {', '.join(rec.runtime.tasks)})")
    tasks = [t for t in tasks if t not in untaught]
    users = sample_users(data.users, limit, seed)
    popularity = data.item_popularity()
    pop_order = sorted(popularity, key=lambda i: (-popularity[i], i))
    report: dict = {
        "checkpoint": str(checkpoint),
        "data": str(data_dir),
        "split": split,
        "beams": config.beams,
        "decoding": dataclasses.asdict(config),
        "inference_prompt": inference_prompt,
        "item_index": data.manifest.get("item_index"),
        "item_ids": getattr(rec.tokenizer, "item_mode", "digits"),
        "users": len(users),
        "sample": "all users" if len(users) == len(data.users) else f"seeded random sample (seed {seed})",
        "device": str(rec.runtime.device),
        "not_trained": untaught,  # tasks the data has but the model was not taught: not evaluated
        "results": {},
    }

    if "sequential" in tasks:
        histories = {u: data.history_before(u, split) for u in users}
        targets = [data.eval_example(u, split)[1] for u in users]
        jobs = [SequentialJob(u, histories[u], TOP) for u in users]
        t0 = time.perf_counter()
        ranked = run_batched(rec, "sequential", jobs, rec.sequential, batch_size, progress)
        seconds = time.perf_counter() - t0
        lists = [[i for i, _ in r.items] for r in ranked]
        seen = [set(histories[u]) for u in users]
        report["results"]["sequential"] = {
            "POD": ranking_metrics(lists, targets),
            "popularity": ranking_metrics(
                [list(itertools.islice((i for i in pop_order if i not in s), TOP)) for s in seen], targets
            ),
            "next-ids rule": ranking_metrics(
                [[max(histories[u]) + k for k in range(1, TOP + 1)] for u in users], targets
            ),
            "seconds": seconds,
            "users_per_s": len(users) / seconds,
        }
        if keep_lists:
            report["results"]["sequential"]["lists"] = {str(u): r.items for u, r in zip(users, ranked)}
    if "topn" in tasks:
        cands, targets = zip(*(data.candidates(u, split) for u in users)) if users else ((), ())
        t0 = time.perf_counter()
        histories = {u: data.history_before(u, split) for u in users}
        jobs = [TopNJob(u, list(c), TOP, "beam", histories[u]) for u, c in zip(users, cands)]
        ranked = run_batched(rec, "topn", jobs, rec.topn, batch_size, progress)
        seconds = time.perf_counter() - t0
        beam_lists = [[i for i, _ in r.items] for r in ranked]
        pop_lists = [sorted(c, key=lambda i: (-popularity.get(i, 0), i))[:TOP] for c in cands]
        res: dict = {"POD": ranking_metrics(beam_lists, targets)}
        # token ids: one decoder step already ranks every candidate exactly, so a second pass would repeat it
        topn_scoring = topn_scoring and rec.catalog.item_ids != "token"
        if topn_scoring:
            jobs = [TopNJob(u, list(c), TOP, "score", histories[u]) for u, c in zip(users, cands)]
            scored = run_batched(rec, "topn", jobs, rec.topn, batch_size, progress)
            score_lists = [[i for i, _ in r.items] for r in scored]
            res["POD (exact scoring)"] = ranking_metrics(score_lists, targets)
        res["popularity"] = ranking_metrics(pop_lists, targets)
        if topn_scoring:
            res["beam vs scoring"] = {
                "top1_disagree": float(np.mean([a[:1] != b[:1] for a, b in zip(beam_lists, score_lists)])),
                "top10_overlap": float(np.mean([len(set(a) & set(b)) / TOP for a, b in zip(beam_lists, score_lists)])),
            }
        res.update(seconds=seconds, users_per_s=len(users) / seconds)
        res["prompt"] = rec.topn_task
        report["results"]["topn"] = res
    if "explanation" in tasks:
        records = data.explanations[split]
        if limit and limit < len(records):
            records = [records[k] for k in sorted(random.Random(seed).sample(range(len(records)), limit))]
        jobs = [ExplainJob(r["user"], r["item"], config.max_explanation_tokens) for r in records]
        t0 = time.perf_counter()
        preds = [e.text for e in run_batched(rec, "explanation", jobs, rec.explain, batch_size, progress)]
        seconds = time.perf_counter() - t0
        by_item: dict[int, Counter] = {}
        for r in data.explanations["train"]:
            by_item.setdefault(r["item"], Counter())[r["explanation"]] += 1
        overall = Counter(r["explanation"] for r in data.explanations["train"]).most_common(1)
        fallback = overall[0][0] if overall else ""
        retrieval = [by_item[r["item"]].most_common(1)[0][0] if r["item"] in by_item else fallback for r in records]
        refs = [r["explanation"] for r in records]
        typical = typical_sentence([r["explanation"] for r in data.explanations["train"]], seed)
        report["results"]["explanation"] = {
            "POD": text_metrics(preds, refs),
            "retrieval": text_metrics(retrieval, refs),
            "one typical sentence": text_metrics([typical] * len(refs), refs),
            "typical_sentence": typical,
            "distinct": len(set(preds)) / max(1, len(preds)),
            "examples": [
                {"user": r["user"], "item": r["item"], "reference": r["explanation"], "POD": p}
                for r, p in list(zip(records, preds))[:5]
            ],
            "seconds": seconds,
            "records": len(records),
        }
    return report


BASELINES = ("popularity", "next-ids rule", "retrieval", "one typical sentence")


def typical_sentence(sentences: Sequence[str], seed: int = 0, sample: int = 300) -> str:
    """The training sentence with the highest mean ROUGE-L against the others (seeded samples of `sample`).

    BLEU and ROUGE reward overlap with generic phrasing, so one sentence for everyone can score well without
    reading the user or the item (on Musical Instruments it beats retrieval); a model must clear it too."""
    from rouge_score import rouge_scorer

    if not sentences:
        return ""
    rng = random.Random(seed)
    pool = list(dict.fromkeys(sentences))
    candidates = rng.sample(pool, min(sample, len(pool)))
    judges = rng.sample(list(sentences), min(sample, len(sentences)))
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    return max(candidates, key=lambda c: sum(scorer.score(j, c)["rougeL"].fmeasure for j in judges))


def margin_line(res: dict) -> str | None:
    """POD against the strongest baseline on the headline metric (HR@10 and NDCG@10, or BLEU-4 and ROUGE-L)."""
    baselines = {k: v for k, v in res.items() if k in BASELINES and isinstance(v, dict)}
    if "POD" not in res or not baselines:
        return None
    out = []
    for metric in ("HR@10", "NDCG@10", "BLEU-4", "ROUGE-L"):
        if metric not in res["POD"]:
            continue
        name, best = max(((k, v[metric]) for k, v in baselines.items()), key=lambda x: x[1])
        ours = res["POD"][metric]
        ratio = f", {ours / best:.1f}x" if best > 0 else ""
        verdict = "beats" if ours > best else "does NOT beat"
        out.append(f"{metric} {ours:.4g} {verdict} {name} {best:.4g} by {ours - best:+.4g}{ratio}")
    return "margin over the strongest baseline: " + "; ".join(out)


def markdown(report: dict) -> str:
    """The report as Markdown tables, one per task, baselines beside the model."""
    lines = [
        f"# Evaluation: {report['checkpoint']} on {report['data']} ({report['split']}, "
        f"{report['users']} users ({report.get('sample', 'all users')}), item index {report['item_index']}, "
        f"item ids {report.get('item_ids', 'digits')}, prompt {report['inference_prompt']})",
        "",
    ]
    if report.get("not_trained"):
        lines += [f"Not evaluated, the model was not trained for them: {', '.join(report['not_trained'])}.", ""]
    for task, res in report["results"].items():
        rows = {k: v for k, v in res.items() if isinstance(v, dict) and k not in ("beam vs scoring", "lists")}
        metrics = list(next(iter(rows.values())).keys())
        lines += [f"## {task}", "", "| method | " + " | ".join(metrics) + " |", "|---" * (len(metrics) + 1) + "|"]
        for name, vals in rows.items():
            fmt = "{:.4f}" if task != "explanation" else "{:.2f}"
            lines.append(f"| {name} | " + " | ".join(fmt.format(vals[m]) for m in metrics) + " |")
        margin = margin_line(res)
        if margin:
            lines.append("\n" + margin)
        if "beam vs scoring" in res:
            d = res["beam vs scoring"]
            lines.append(
                f"\nbeam search vs exact scoring: top-1 differs for {100 * d['top1_disagree']:.1f}% of "
                f"users, top-10 overlap {100 * d['top10_overlap']:.1f}%"
            )
        if "prompt" in res:
            lines.append(f"\ncandidates ranked under the {res['prompt']} prompt")
        if "distinct" in res:
            lines.append(f"\ndistinct POD sentences: {100 * res['distinct']:.1f}% of {res['records']}")
            lines.append(f'\none typical sentence: "{res["typical_sentence"]}"')
        if "users_per_s" in res:
            lines.append(f"\ndecoding: {res['seconds']:.1f} s, {res['users_per_s']:.1f} users/s")
        lines.append("")
    return "\n".join(lines)


def write_report(report: dict, out: str | Path) -> None:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    out.with_suffix(".md").write_text(markdown(report))
