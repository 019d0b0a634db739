"""Sequential evaluation throughput: our trie-constrained beam search vs Hugging Face `generate` with
`prefix_allowed_tokens_fn` (the stock way to constrain), same model, same inputs, same beams.

Prints users/s for both, the share of users whose top-10 lists are identical, and the speed ratio last.

    python benchmarks/eval_throughput.py                               # CPU: a fresh tiny model, synthetic shop
    python benchmarks/eval_throughput.py --checkpoint runs/demo --data data/synthetic
    python benchmarks/eval_throughput.py --preset t5-small --users 2000 --batch-size 32 --out r.json   # GPU
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pod import templates  # noqa: E402
from pod.dataset import PreparedData  # noqa: E402
from pod.decoding import beam_search  # noqa: E402
from pod.model import build_model, load_checkpoint  # noqa: E402
from pod.tokenization import EOS_ID  # noqa: E402
from pod.torch_runtime import TorchRuntime, encode_batch  # noqa: E402
from training.data.synth import write_synthetic  # noqa: E402
from training.evaluate import item_trie  # noqa: E402
from training.train import TrainConfig, tokenizer_for  # noqa: E402

TOP = 10


def run_ours(runtime, texts, histories, trie, beams, batch_size):
    lists = []
    for i in range(0, len(texts), batch_size):
        chunk = texts[i : i + batch_size]
        session = runtime.start("sequential", chunk, beams)
        cons = [trie.restrict(h) for h in histories[i : i + batch_size]]
        hyps = beam_search(session, len(chunk), beams, 16, EOS_ID, constraints=cons, length_penalty=0.0)
        lists += [[h.value for h in row][:TOP] for row in hyps]
    return lists


@torch.inference_mode()
def run_hf(runtime, texts, histories, trie, beams, batch_size):
    """Stock path: HF generate on the same encoder inputs (prompts prepended), constrained by a callback."""
    model, tok, dev = runtime.model, runtime.tokenizer, runtime.device
    lists = []
    for i in range(0, len(texts), batch_size):
        chunk = texts[i : i + batch_size]
        cons = [trie.restrict(h) for h in histories[i : i + batch_size]]

        def allowed(batch_id: int, prefix: torch.Tensor, cons=cons) -> list[int]:
            node = 0
            for t in prefix.tolist()[1:]:
                node = trie.children[node].get(t, -1)
                if node < 0:
                    return [EOS_ID]
            return [t for t, _ in cons[batch_id].allowed(node)] or [EOS_ID]

        enc = {k: v.to(dev) for k, v in encode_batch(tok, chunk).items()}
        task = torch.full((len(chunk),), model.config.task_index("sequential"), device=dev)
        with runtime.autocast():
            embeds, mask = model.embed(task, **enc)
            out = model.t5.generate(
                inputs_embeds=embeds,
                attention_mask=mask,
                num_beams=beams,
                num_return_sequences=beams,
                max_new_tokens=16,
                length_penalty=0.0,
                prefix_allowed_tokens_fn=allowed,
                do_sample=False,
            )
        seqs = out.view(len(chunk), beams, -1).tolist()
        for row in seqs:
            items = []
            for seq in row:
                node = 0
                for t in seq[1:]:
                    node = trie.children[node].get(t, -1)
                    if node < 0 or t == EOS_ID:
                        break
                value = trie.value.get(node)
                if value is not None and value not in items:
                    items.append(value)
            lists.append(items[:TOP])
    return lists


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", help="a trained checkpoint (default: a fresh model of --preset)")
    ap.add_argument("--data", help="prepared data (default: a fresh synthetic shop)")
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--users", type=int, default=200, help="evaluate this many test users (0 = all)")
    ap.add_argument("--beams", type=int, default=20)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--out")
    args = ap.parse_args()
    dev = (
        "cuda"
        if args.device == "auto" and torch.cuda.is_available()
        else ("cpu" if args.device == "auto" else args.device)
    )
    tmp = Path(tempfile.mkdtemp())
    data_dir = Path(args.data) if args.data else tmp / "synth"
    if not args.data:
        write_synthetic(data_dir)
    data = PreparedData.load(data_dir)
    if args.checkpoint:
        model, tok, _ = load_checkpoint(args.checkpoint, dev)
    else:
        tok = tokenizer_for(TrainConfig(data=str(data_dir), out=str(tmp)), data, tmp)
        torch.manual_seed(0)
        model = build_model(tok, args.preset)
    runtime = TorchRuntime(model, tok, dev, bf16=dev == "cuda")
    users = data.users[: args.users] if args.users else data.users
    histories, texts = [], []
    for u in users:
        h, _ = data.eval_example(u, "test")
        histories.append(h)
        texts.append(templates.fill("sequential", templates.BARE, u, h))
    order = sorted(range(len(users)), key=lambda i: len(texts[i]))
    texts = [texts[i] for i in order]
    histories = [histories[i] for i in order]
    trie = item_trie(tok, data.items)
    warm = min(len(texts), args.batch_size)
    run_ours(runtime, texts[:warm], histories[:warm], trie, args.beams, args.batch_size)
    run_hf(runtime, texts[:warm], histories[:warm], trie, args.beams, args.batch_size)
    timings, lists = {}, {}
    for name, fn in (("HF generate + prefix_allowed_tokens_fn", run_hf), ("POD beam search", run_ours)):
        if dev == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        lists[name] = fn(runtime, texts, histories, trie, args.beams, args.batch_size)
        if dev == "cuda":
            torch.cuda.synchronize()
        timings[name] = len(texts) / (time.perf_counter() - t0)
    a, b = lists.values()
    same = sum(x == y for x, y in zip(a, b)) / len(a)
    ratio = timings["POD beam search"] / timings["HF generate + prefix_allowed_tokens_fn"]
    device_name = torch.cuda.get_device_name() if dev == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    print(
        f"device {device_name}; {len(texts)} users, {args.beams} beams, batch {args.batch_size}, "
        f"model d_model={model.config.t5['d_model']}, vocab {tok.vocab_size}"
    )
    for name, v in timings.items():
        print(f"{name:<42} {v:>9.1f} users/s")
    print(f"identical top-10 lists: {100 * same:.1f}%")
    print(f"speed ratio (ours / HF): {ratio:.2f}x")
    if args.out:
        Path(args.out).write_text(
            json.dumps(
                {
                    "device": device_name,
                    "users": len(texts),
                    "beams": args.beams,
                    "batch_size": args.batch_size,
                    "users_per_s": timings,
                    "identical_top10": same,
                    "speedup": ratio,
                },
                indent=2,
            )
        )


if __name__ == "__main__":
    main()
