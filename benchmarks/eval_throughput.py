"""Sequential evaluation throughput: our trie-constrained beam search vs Hugging Face `generate` with
`prefix_allowed_tokens_fn` (the stock way to constrain), same model, same inputs, same beams.

Ours is `pod.recommender.Recommender.sequential` over the PyTorch runtime, batched as `pod evaluate` batches
(`training.evaluate.run_batched`: length-sorted batches); HF gets the same batches, the input text
`Recommender.text` writes and the constraint the recommender builds (the item trie without the history).
Users: all test users, or a seeded random sample (`pod.recommender.sample_users`, as `pod evaluate --limit`).

Prints users/s for both, the share of users whose top-10 lists are identical, and the speed ratio last.

    python benchmarks/eval_throughput.py                               # CPU: a fresh tiny model, synthetic shop
    python benchmarks/eval_throughput.py --checkpoint runs/demo --data data/synthetic
    python benchmarks/eval_throughput.py --preset t5-small --users 2000 --batch-size 32 --out r.json   # GPU
"""

from __future__ import annotations

import argparse
import json
import os

# OpenMP threads that spin while waiting collapse torch 10-20x on a 2-core machine with anything else running;
# passive waiting keeps the stock baseline honest there (set before torch loads OpenMP).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.hf_baseline import allowed_tokens, generate_inputs, item_list, new_tokens  # noqa: E402
from benchmarks.workbench import bench_data, resolve_device  # noqa: E402
from pod.model import build_model, load_checkpoint  # noqa: E402
from pod.recommender import Catalog, DecodingConfig, Recommender, SequentialJob, by_length, sample_users  # noqa: E402
from pod.torch_runtime import TorchRuntime, encode_batch  # noqa: E402
from training.evaluate import run_batched  # noqa: E402

TOP = 10


def run_ours(rec: Recommender, jobs: list[SequentialJob], batch_size: int) -> list[list[int]]:
    """`pod evaluate`'s sequential loop: the recommender over length-sorted batches, lists in the jobs' order."""
    ranked = run_batched(rec, "sequential", jobs, rec.sequential, batch_size, progress=False)
    return [[item for item, _ in r.items] for r in ranked]


def hf_batches(rec: Recommender, jobs: list[SequentialJob], batch_size: int):
    """The same length-sorted batches for HF: (job indices, input texts, constraints) per batch."""
    for batch in by_length(rec, "sequential", jobs, batch_size):
        texts = [rec.text("sequential", jobs[n].user, jobs[n].history) for n in batch]
        cons = [rec.catalog.trie.restrict(set(jobs[n].history) | set(jobs[n].exclude)) for n in batch]
        yield batch, texts, cons


@torch.inference_mode()
def run_hf_plain(rec: Recommender, jobs: list[SequentialJob], batch_size: int) -> None:
    """The REFERENCE anchor: plain beam-search `generate`, as many new tokens as an item ID, no constraint."""
    runtime, beams = rec.runtime, rec.config.beams
    model, tok, dev = runtime.model, runtime.tokenizer, runtime.device
    length = rec.catalog.longest_item
    for _, chunk, _ in hf_batches(rec, jobs, batch_size):
        enc = {k: v.to(dev) for k, v in encode_batch(tok, chunk).items()}
        task = torch.full((len(chunk),), model.config.task_index("sequential"), device=dev)
        with runtime.autocast():
            model.t5.generate(
                **generate_inputs(model, task, enc),
                num_beams=beams,
                num_return_sequences=beams,
                max_new_tokens=length,
                min_new_tokens=length,
                do_sample=False,
            )
    return None


@torch.inference_mode()
def run_hf(rec: Recommender, jobs: list[SequentialJob], batch_size: int) -> list[list[int]]:
    """Stock path: HF generate on the same encoder inputs (prompts prepended), constrained by a callback."""
    runtime, beams, trie = rec.runtime, rec.config.beams, rec.catalog.trie
    model, tok, dev = runtime.model, runtime.tokenizer, runtime.device
    lists: list = [None] * len(jobs)
    for batch, chunk, cons in hf_batches(rec, jobs, batch_size):
        enc = {k: v.to(dev) for k, v in encode_batch(tok, chunk).items()}
        task = torch.full((len(chunk),), model.config.task_index("sequential"), device=dev)
        with runtime.autocast():
            out = model.t5.generate(
                **generate_inputs(model, task, enc),
                num_beams=beams,
                num_return_sequences=beams,
                max_new_tokens=new_tokens(rec.catalog.longest_item),
                length_penalty=0.0,
                prefix_allowed_tokens_fn=allowed_tokens(trie, cons.__getitem__),
                do_sample=False,
            )
        seqs = out.view(len(chunk), beams, -1).tolist()
        for n, row in zip(batch, seqs):
            lists[n] = item_list(trie, row, TOP)
    return lists


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", help="a trained checkpoint (default: a fresh model of --preset)")
    ap.add_argument("--data", help="prepared data (default: a fresh synthetic shop)")
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--users", type=int, default=200, help="a seeded random sample of this many test users (0 = all)")
    ap.add_argument("--beams", type=int, default=20)
    ap.add_argument("--batch-size", type=int, default=8, help="users per batch, ours")
    ap.add_argument("--hf-batch-size", type=int, help="users per batch for HF (default: --batch-size)")
    ap.add_argument(
        "--tokenizer",
        default="data",
        help="'data' = a small vocabulary trained on the shop; 'auto' = T5's spiece.model from ../shared (as the "
        "REFERENCE anchors); or a path",
    )
    ap.add_argument("--device", default="auto")
    ap.add_argument("--out")
    args = ap.parse_args()
    dev = resolve_device(args.device)
    tmp = Path(tempfile.mkdtemp())
    data_dir, data = bench_data(args.data, tmp)
    if args.checkpoint:
        model, tok, _ = load_checkpoint(args.checkpoint, dev)
    else:
        from runtime_latency import benchmark_tokenizer  # this folder is on sys.path when run as a script

        tok = benchmark_tokenizer(args.tokenizer, data_dir, data, tmp)
        torch.manual_seed(0)
        model = build_model(tok, args.preset)
    runtime = TorchRuntime(model, tok, dev, bf16=dev == "cuda")  # as `training.evaluate.load_recommender`
    catalog = Catalog.from_prepared(data, tok)
    exact = Recommender(runtime, catalog, DecodingConfig(beams=args.beams))
    allowed = Recommender(runtime, catalog, DecodingConfig(beams=args.beams, normalizer="allowed"))
    users = sample_users(data.users, args.users or None, seed=0)
    jobs, targets = [], []
    for u in users:
        h, target = data.eval_example(u, "test")
        jobs.append(SequentialJob(u, h, TOP))
        targets.append(target)
    hf_batch = args.hf_batch_size or args.batch_size
    runners = {
        "HF generate + prefix_allowed_tokens_fn": (run_hf, exact, hf_batch),
        "HF generate, unconstrained (anchor)": (run_hf_plain, exact, hf_batch),
        "POD beam search (exact)": (run_ours, exact, args.batch_size),
        "POD beam search (allowed-token normalizer)": (run_ours, allowed, args.batch_size),
    }
    for fn, rec, batch in runners.values():  # warm-up: one batch each
        fn(rec, jobs[:batch], batch)
    timings, lists = {}, {}
    for name, (fn, rec, batch) in runners.items():
        if dev == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        lists[name] = fn(rec, jobs, batch)
        if dev == "cuda":
            torch.cuda.synchronize()
        timings[name] = len(jobs) / (time.perf_counter() - t0)
    ref = lists["HF generate + prefix_allowed_tokens_fn"]
    same = {name: sum(x == y for x, y in zip(ref, got)) / len(ref) for name, got in lists.items() if got is not None}
    base = timings["HF generate + prefix_allowed_tokens_fn"]
    hits = {
        name: sum(t in got[:TOP] for t, got in zip(targets, lst)) / len(targets) for name, lst in lists.items() if lst
    }
    device_name = torch.cuda.get_device_name() if dev == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    print(
        f"device {device_name}; {len(jobs)} users, {args.beams} beams, batch {args.batch_size}, "
        f"model d_model={model.config.t5['d_model']}, vocab {tok.vocab_size}"
    )
    print(f"{'runner':<44} {'users/s':>9} {'HR@10':>6} {'top-10 = HF constrained':>24} {'ratio vs HF constrained':>24}")
    for name, v in timings.items():
        agree = f"{100 * same[name]:.1f}%" if name in same else "n/a (no items)"
        hr = f"{hits[name]:.3f}" if name in hits else "-"
        print(f"{name:<44} {v:>9.1f} {hr:>6} {agree:>24} {v / base:>23.2f}x")
    if args.out:
        Path(args.out).write_text(
            json.dumps(
                {
                    "device": device_name,
                    "users": len(jobs),
                    "beams": args.beams,
                    "batch_size": args.batch_size,
                    "hf_batch_size": hf_batch,
                    "vocab": tok.vocab_size,
                    "users_per_s": timings,
                    "identical_top10_vs_hf_constrained": same,
                    "hr_at_10": hits,
                    "ratio_vs_hf_constrained": {name: v / base for name, v in timings.items()},
                },
                indent=2,
            )
        )


if __name__ == "__main__":
    main()
