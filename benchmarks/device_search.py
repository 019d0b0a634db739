"""Multi-token item IDs: the constrained beam search on the host (NumPy, `pod.decoding.beam_search`, one
device -> host copy per decoder step) against the same search on the model's device (`pod.device_search`, the
path `Recommender._rank` takes on the PyTorch runtime), same model, same jobs, one run.

Both sides are the one recommender over the same PyTorch runtime, batched as `pod evaluate` batches
(`training.evaluate.run_batched`); the host side only hides the session's `constrained_search`, as the ONNX
runtime's sessions lack it. Prints users/s for each, the device/host ratio, and how many top-10 lists agree
(identical, and equal up to near-ties). Its purpose is a GPU; on a CPU both sides run on the same cores, so
expect a ratio near 1 there.

    python benchmarks/device_search.py                                   # CPU: tiny random model, synthetic shop
    python benchmarks/device_search.py --item-ids collaborative --normalizer allowed
    python benchmarks/device_search.py --checkpoint runs/beauty-digits/run --data data/beauty --batch-size 256
"""

from __future__ import annotations

import argparse
import os

# passive OpenMP waiting, as benchmarks/eval_throughput.py (set before torch loads OpenMP)
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.workbench import bench_data, resolve_device  # noqa: E402
from export.export import same_up_to_ties  # noqa: E402
from pod.model import build_model, load_checkpoint  # noqa: E402
from pod.recommender import Catalog, DecodingConfig, Recommender, SequentialJob, sample_users  # noqa: E402
from pod.torch_runtime import HostSearch, TorchRuntime  # noqa: E402
from training.evaluate import run_batched  # noqa: E402
from training.train import TrainConfig, tokenizer_for  # noqa: E402

TOP = 10


def sync(dev: str) -> None:
    if dev.startswith("cuda"):
        torch.cuda.synchronize()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", help="a trained checkpoint (default: a fresh random model of --preset)")
    ap.add_argument("--data", help="prepared data (default: a fresh synthetic shop of --shop-users users)")
    ap.add_argument("--shop-users", type=int, default=1000)
    ap.add_argument("--shop-items", type=int, default=300)
    ap.add_argument(
        "--item-ids", default="digits", choices=["digits", "collaborative", "semantic"], help="for a fresh model"
    )
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--users", type=int, default=200, help="a seeded random sample of test users (0 = all)")
    ap.add_argument("--beams", type=int, default=20)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--normalizer", default="exact", choices=["exact", "allowed"])
    ap.add_argument("--repeats", type=int, default=3, help="timed passes per side, alternating; the best is kept")
    ap.add_argument("--device", default="auto")
    args = ap.parse_args()
    dev = resolve_device(args.device)
    tmp = Path(tempfile.mkdtemp())
    data_dir, data = bench_data(args.data, tmp, users=args.shop_users, items=args.shop_items)
    if args.checkpoint:
        model, tok, _ = load_checkpoint(args.checkpoint, dev)
    else:
        tok = tokenizer_for(TrainConfig(data=str(data_dir), out=str(tmp), item_ids=args.item_ids), data, tmp)
        torch.manual_seed(0)
        model = build_model(tok, args.preset, init_std=0.05)
    mode = getattr(tok, "item_mode", args.item_ids)
    if mode == "token":
        raise SystemExit("token item IDs rank in one decoder step; this benchmark is for multi-token item IDs")
    runtime = TorchRuntime(model, tok, dev, bf16=dev == "cuda")
    catalog = Catalog.from_prepared(data, tok)
    cfg = DecodingConfig(beams=args.beams, normalizer=args.normalizer)
    sides = {
        "host (NumPy)": Recommender(HostSearch(runtime), catalog, cfg),
        "device": Recommender(runtime, catalog, cfg),
    }
    users = sample_users(data.users, args.users or None, seed=0)
    jobs = [SequentialJob(u, data.eval_example(u, "test")[0], TOP) for u in users]

    def once(rec: Recommender) -> tuple[float, list]:
        sync(dev)
        t0 = time.perf_counter()
        ranked = run_batched(rec, "sequential", jobs, rec.sequential, args.batch_size, progress=False)
        sync(dev)
        return time.perf_counter() - t0, ranked

    for rec in sides.values():  # warm-up: one batch each (trie tables, lazy initialisation)
        run_batched(rec, "sequential", jobs[: args.batch_size], rec.sequential, args.batch_size, progress=False)
    best = {name: float("inf") for name in sides}
    lists = {}
    for _ in range(args.repeats):
        for name, rec in sides.items():
            seconds, lists[name] = once(rec)
            best[name] = min(best[name], seconds)
    host, device = lists["host (NumPy)"], lists["device"]
    identical = sum([i for i, _ in a.items] == [i for i, _ in b.items] for a, b in zip(host, device))
    tied = sum(same_up_to_ties(a.items, b.items, 1e-5) is None for a, b in zip(host, device))
    name = torch.cuda.get_device_name() if dev.startswith("cuda") else f"CPU ({torch.get_num_threads()} threads)"
    print(
        f"device {name}; {len(jobs)} users, item ids {mode} (longest {catalog.longest_item} tokens, "
        f"{len(catalog.item_tokens)} items), {args.beams} beams, batch {args.batch_size}, normalizer "
        f"{args.normalizer}, model d_model={model.config.t5['d_model']}, vocab {tok.vocab_size}; best of {args.repeats}"
    )
    for side, seconds in best.items():
        print(f"{side:<14} {len(jobs) / seconds:9.1f} users/s  ({seconds:.3f} s)")
    print(f"ratio device / host: {best['host (NumPy)'] / best['device']:.2f}x")
    print(f"top-{TOP} lists identical: {identical}/{len(jobs)}; equal up to near-ties (1e-5): {tied}/{len(jobs)}")


if __name__ == "__main__":
    main()
