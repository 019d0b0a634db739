"""Task-alternated vs sample-mixed training throughput, each at the largest batch that fits a memory budget.

The paper's protocol (Sec. 5.5, Table 5): both strategies get the biggest batch the device holds; then
we time real training steps and print samples/s and estimated time per epoch side by side, the speed
ratio last.

Memory: on CUDA the real peak (`torch.cuda.max_memory_allocated`) of a forward+backward on the worst
batch of that size; on CPU, where no allocator reports a peak, the padded token count of the worst batch
(input + target tokens) against a token budget, which is what memory scales with for a fixed model.

    python benchmarks/train_throughput.py                       # CPU: tiny preset, synthetic shop
    python benchmarks/train_throughput.py --preset t5-small --memory-gib 40 --seconds 60 --out r.json  # GPU
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.workbench import bench_data, resolve_device  # noqa: E402
from pod.model import build_model  # noqa: E402
from training.samples import Sample, collate, epoch_samples, make_batches  # noqa: E402
from training.train import TrainConfig, autocast, tokenizer_for  # noqa: E402


def worst_batch(samples: list[Sample], size: int) -> list[Sample]:
    """The `size` longest samples: the batch that decides whether a batch size fits."""
    ranked = sorted(samples, key=lambda s: len(s.source) + 4 * len(s.target), reverse=True)
    return (ranked * (size // max(1, len(ranked)) + 1))[:size]


def fits(model, tok, task_index, batch: list[Sample], device, budget: float, cfg) -> bool:
    enc = collate(batch, tok, task_index)
    if device.type != "cuda":
        tokens = enc["input_ids"].numel() + enc["labels"].numel()
        return tokens <= budget
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    try:
        with autocast(cfg, device):
            loss = model(**{k: v.to(device) for k, v in enc.items()})
        loss.backward()
        model.zero_grad(set_to_none=True)
        return torch.cuda.max_memory_allocated() <= budget
    except torch.OutOfMemoryError:
        model.zero_grad(set_to_none=True)
        return False


def largest_batch(model, tok, task_index, pool: list[Sample], device, budget, cfg, cap: int) -> int:
    lo, hi = 0, 1
    while hi <= cap and fits(model, tok, task_index, worst_batch(pool, hi), device, budget, cfg):
        lo, hi = hi, hi * 2
    hi = min(hi, cap + 1)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if fits(model, tok, task_index, worst_batch(pool, mid), device, budget, cfg):
            lo = mid
        else:
            hi = mid
    return lo


def time_batches(model, tok, task_index, batches: list[list[Sample]], device, seconds: float, cfg) -> dict:
    """Real training steps (forward, backward, AdamW) for `seconds` (at least 2 batches, after 1 warm-up)."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")

    def one(batch: list[Sample]) -> None:
        with autocast(cfg, device):
            loss = model(**{k: v.to(device, non_blocking=True) for k, v in collate(batch, tok, task_index).items()})
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    one(batches[0])
    if device.type == "cuda":
        torch.cuda.synchronize()
    done = samples = 0
    start = time.perf_counter()
    while done < len(batches) and (done < 2 or time.perf_counter() - start < seconds):
        one(batches[done])
        samples += len(batches[done])
        done += 1
    if device.type == "cuda":
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    return {"steps": done, "samples": samples, "seconds": elapsed, "samples_per_s": samples / elapsed}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", help="prepared data directory (default: a fresh synthetic shop)")
    ap.add_argument("--users", type=int, default=1000, help="synthetic shop size when --data is not given")
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--memory-gib", type=float, default=20.0, help="CUDA memory budget")
    ap.add_argument("--token-budget", type=int, default=64 * 512, help="CPU budget in padded tokens per batch")
    ap.add_argument("--max-batch", type=int, default=4096)
    ap.add_argument("--seconds", type=float, default=20.0, help="timed seconds per strategy")
    ap.add_argument("--out", help="write the JSON report here")
    args = ap.parse_args()

    device = torch.device(resolve_device(args.device))
    tmp = Path(tempfile.mkdtemp())
    data_dir, data = bench_data(args.data, tmp, users=args.users, items=max(300, args.users // 4))
    cfg = TrainConfig(data=str(data_dir), out=str(tmp), preset=args.preset)
    tok = tokenizer_for(cfg, data, tmp)
    torch.manual_seed(0)
    model = build_model(tok, args.preset).to(device).train()
    task_index = {t: model.config.task_index(t) for t in model.config.tasks}
    samples = epoch_samples(data, data.tasks, random.Random(0))
    epoch_size = sum(len(v) for v in samples.values())
    budget = args.memory_gib * 2**30 if device.type == "cuda" else args.token_budget

    sizes = {
        t: largest_batch(model, tok, task_index, pool, device, budget, cfg, args.max_batch)
        for t, pool in samples.items()
    }
    mixed_pool = [s for pool in samples.values() for s in pool]
    sizes["mixed"] = largest_batch(model, tok, task_index, mixed_pool, device, budget, cfg, args.max_batch)
    if device.type == "cuda":
        torch.cuda.empty_cache()

    # Alternated: each task at its own largest batch; an epoch costs the sum over tasks of (samples / rate),
    # so each task is timed on its own batches. Mixed: one batch size for everything, timed directly.
    results: dict = {"task-alternated": {"per_task": {}}}
    epoch_seconds = 0.0
    for task, pool in samples.items():
        batches = make_batches({task: pool}, max(1, sizes[task]), "alternated", random.Random(1))
        r = time_batches(model, tok, task_index, batches, device, args.seconds / len(samples), cfg)
        results["task-alternated"]["per_task"][task] = r
        epoch_seconds += len(pool) / r["samples_per_s"]
    results["task-alternated"].update(samples_per_s=epoch_size / epoch_seconds, epoch_minutes=epoch_seconds / 60)
    mixed = make_batches(samples, max(1, sizes["mixed"]), "mixed", random.Random(1))
    r = time_batches(model, tok, task_index, mixed, device, args.seconds, cfg)
    results["sample-mixed"] = {**r, "epoch_minutes": epoch_size / r["samples_per_s"] / 60}
    ratio = results["task-alternated"]["samples_per_s"] / results["sample-mixed"]["samples_per_s"]
    device_name = (
        torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    )
    report = {
        "device": device_name,
        "preset": args.preset,
        "data": str(data_dir),
        "epoch_samples": epoch_size,
        "batch_sizes": sizes,
        "budget": budget,
        "results": results,
        "speedup": ratio,
    }
    print(f"device {device_name}, preset {args.preset}, {epoch_size} samples per epoch")
    print(f"largest batches: {json.dumps(sizes)}")
    print(f"{'strategy':<16} {'samples/s':>10} {'min/epoch':>10}")
    for name in ("sample-mixed", "task-alternated"):
        r = results[name]
        print(f"{name:<16} {r['samples_per_s']:>10.1f} {r['epoch_minutes']:>10.2f}")
    print(f"task-alternated / sample-mixed speed ratio: {ratio:.2f}x")
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
