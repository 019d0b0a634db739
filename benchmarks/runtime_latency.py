"""Per-request latency of one sequential recommendation: Hugging Face `generate` vs our PyTorch and ONNX paths.

One request at a time (batch 1), 20 beams, constrained to valid item IDs with the user's history excluded, the
same model weights everywhere:
- HF: stock `model.t5.generate(inputs_embeds=..., prefix_allowed_tokens_fn=...)` on the prompt-extended
  embeddings (as `eval_throughput.run_hf`);
- PyTorch: `TorchRuntime` (encoder once, decoder steps with a KV cache) behind `pod.recommender.Recommender`,
  the code `pod evaluate` and `pod serve` rank with;
- ONNX fp32 / int8: bundles written by `export_bundle` (quantize none / int8), `OnnxRuntime` behind the same
  `Recommender` (with the bundle's catalog, as the server loads it);
- with `--static`: `TorchRuntime(static=True)` (`pod.static_graphs`: inputs padded to buckets, a preallocated
  KV cache), eager ("PyTorch static shapes"), and on CUDA also replayed as CUDA graphs (`pod.cuda_graphs`,
  "PyTorch CUDA graphs"). One untimed request per input-length bucket runs first, so graph captures fall
  outside the timing. On CUDA every row's encode/decode split is host time (launches are asynchronous; the
  projection's copy to the host waits); the total is what to compare.
Ours is timed through a wrapped runtime (`TimedRuntime`): the recommender calls it as it calls the real one.

For each model shape (random init: speed does not depend on the weights) it prints p50 and p99 over the timed
requests, where the time goes (encode = tokenize + embed + encoder, decode = the model's decoder-step calls,
search = the rest: constraints, candidate selection, HF's callback and beam bookkeeping), the share of requests
whose top-10 equals HF's, and the speed-up vs HF (HF p50 / p50) last.

Requests: users sampled (seeded) from the synthetic shop's test split, one job each (`SequentialJob`, `TopNJob`
in beam mode, `ExplainJob`); every runtime, HF included, reads the input `Recommender.text` writes (the last
20 purchases of a sequential history) and the constraint the recommender builds (the item trie without the
history, or the candidates' trie). The shop's sequences are 16-24 purchases by default so inputs average
~80-90 tokens, like the reference anchor; `--history-len 5,12` gives the stock shop (~41 tokens).

    python benchmarks/runtime_latency.py                                        # tiny + t5-small, 50 requests
    python benchmarks/runtime_latency.py --shapes tiny --requests 20 --threads 2 --out r.json
    python benchmarks/runtime_latency.py --device cuda --shapes t5-small --item-ids token --static   # + graphs
"""

from __future__ import annotations

import argparse
import json
import os

# OpenMP threads that spin while waiting collapse torch 10-20x on a 2-core machine with anything else running;
# passive waiting keeps the stock baseline honest there (set before torch loads OpenMP).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
import random  # noqa: E402
import shutil  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.hf_baseline import MAX_NEW_TOKENS, allowed_tokens, generate_inputs, item_list, new_tokens  # noqa: E402
from export.export import export_bundle  # noqa: E402
from pod.bundle import Bundle  # noqa: E402
from pod.dataset import PreparedData  # noqa: E402
from pod.model import build_model, load_checkpoint, save_checkpoint  # noqa: E402
from pod.onnx_runtime import OnnxRuntime  # noqa: E402
from pod.recommender import (  # noqa: E402
    Catalog,
    DecodingConfig,
    ExplainJob,
    Recommender,
    SequentialJob,
    TopNJob,
)
from pod.static_graphs import LENGTH_BUCKET_MIN, bucket  # noqa: E402
from pod.tokenization import EOS_ID  # noqa: E402
from pod.torch_runtime import TorchRuntime, encode_batch  # noqa: E402
from training.data.prepare import prepare  # noqa: E402
from training.data.synth import synthesize  # noqa: E402
from training.train import TrainConfig, tokenizer_for  # noqa: E402

TOP = 10
EXPLANATION_TOKENS = 20  # explanations: every runtime decodes exactly this many tokens, so work is equal
# REFERENCE anchor, measured on this machine type: HF constrained generate, t5-small shape, 2 CPU cores.
ANCHOR = {"shape": "t5-small", "runtime": "HF generate", "hardware": "2-core CPU", "input_tokens": 90, "ms": 277.0}
HF = "HF generate + prefix_allowed_tokens_fn"
NAMES = {
    "hf": HF,
    "hf-plain": "HF generate, unconstrained (anchor)",
    "torch-allowed": "PyTorch runtime, allowed-token normalizer",
    "onnx-fp32-allowed": "ONNX fp32, allowed-token normalizer",
    "onnx-int8-allowed": "ONNX int8, allowed-token normalizer",
    "torch": "PyTorch runtime + POD beam search",
    "onnx-fp32": "ONNX Runtime fp32 + POD beam search",
    "onnx-int8": "ONNX Runtime int8 + POD beam search",
    "torch-static": "PyTorch static shapes + POD beam search",
    "torch-graphs": "PyTorch CUDA graphs + POD beam search",
}


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


class TimedSession:
    """Wraps a decoder session and adds up the time spent in its steps (the model, KV-cache reorder included).

    `min_tokens`: the end token is masked for that many steps (explanations: every runtime then decodes the same
    number of tokens, as HF's `min_new_tokens`). It is masked after the whole-vocabulary log-normalizer is
    computed, as HF and `beam_search(min_new_tokens=...)` mask it, so every other token keeps the model's score.
    """

    def __init__(self, session, min_tokens: int = 0) -> None:
        self.session, self.min_tokens, self.seconds, self.steps = session, min_tokens, 0.0, 0
        if hasattr(session, "step_top"):  # the search asks for it only where the runtime offers it
            self.step_top = self._step_top

    def step(self, tokens, parents):  # exact top-N scoring's teacher forcing (never with min_tokens)
        t0 = time.perf_counter()
        out = self.session.step(tokens, parents)
        self.seconds += time.perf_counter() - t0
        self.steps += 1
        return out

    def step_columns(self, tokens, parents, columns, normalizer):  # the beam search's call (both runtimes offer it)
        t0 = time.perf_counter()
        logits, lse = self.session.step_columns(tokens, parents, columns, normalizer)
        self.seconds += time.perf_counter() - t0
        if self.steps < self.min_tokens:
            col = EOS_ID if columns is None else int(np.searchsorted(columns, EOS_ID))
            if columns is None or (col < len(columns) and columns[col] == EOS_ID):
                logits = logits.copy()
                logits[:, col] = -np.inf
        self.steps += 1
        return logits, lse

    def _step_top(self, tokens, parents, k):  # explanations on the PyTorch runtime: each row's best k tokens
        masked = self.steps < self.min_tokens
        t0 = time.perf_counter()
        vals, ids = self.session.step_top(tokens, parents, k + masked)  # one spare for a masked `</s>`
        self.seconds += time.perf_counter() - t0
        self.steps += 1
        if masked:
            vals = np.where(ids == EOS_ID, -np.inf, vals).astype(np.float32)
        return vals, ids


class TimedRuntime:
    """A runtime as `Recommender` sees it (`.tokenizer`, `.start(task, texts)`), timing what the recommender
    asks of it: `start` (tokenize + embed + encoder) and every decoder step of the sessions it returns."""

    def __init__(self, runtime, min_tokens: int = 0) -> None:
        self.runtime, self.tokenizer, self.min_tokens = runtime, runtime.tokenizer, min_tokens
        self.topn_history, self.user_ids = runtime.topn_history, runtime.user_ids  # what the input holds
        self.tasks = runtime.tasks
        self.reset()

    def reset(self) -> None:
        self.encode, self.sessions = 0.0, []

    def start(self, task: str, texts: list[str]) -> TimedSession:
        t0 = time.perf_counter()
        session = self.runtime.start(task, texts)
        self.encode += time.perf_counter() - t0
        self.sessions.append(TimedSession(session, self.min_tokens))
        return self.sessions[-1]

    def parts(self) -> dict:
        return {
            "encode": self.encode,
            "decode": sum(s.seconds for s in self.sessions),
            "steps": sum(s.steps for s in self.sessions),
        }


def recommender(runtime, catalog: Catalog, task: str, beams: int, normalize: str = "exact") -> Recommender:
    """The one recommender over a timed runtime. Explanations: plain beam search (one group; HF 5.x has no group
    beam search) of exactly EXPLANATION_TOKENS tokens."""
    config = DecodingConfig(
        beams=beams,
        explanation_beams=beams,
        explanation_groups=1,
        max_explanation_tokens=EXPLANATION_TOKENS,
        normalizer=normalize,
    )
    timed = TimedRuntime(runtime, EXPLANATION_TOKENS if task == "explanation" else 0)
    return Recommender(timed, catalog, config)


def ours(rec: Recommender, task: str):
    """A request function for our runtimes: job -> (top items or explanation text, timing parts in seconds).

    The request is one `Recommender` call, as `pod serve` and `pod evaluate` make it; the wrapped runtime
    splits its time into encode and decode, search is the rest (inputs, constraints, beam bookkeeping)."""
    call = {"sequential": rec.sequential, "topn": rec.topn, "explanation": rec.explain}[task]
    timed: TimedRuntime = rec.runtime

    def run(job) -> tuple[list | str, dict]:
        timed.reset()
        t0 = time.perf_counter()
        (result,) = call([job])
        total = time.perf_counter() - t0
        out = result.text if task == "explanation" else [item for item, _ in result.items]
        parts = timed.parts()
        parts["search"] = total - parts["encode"] - parts["decode"]
        return out, {"total": total, **parts}

    return run


def job_input(rec: Recommender, task: str, job) -> tuple[str, object]:
    """A job's encoder input, as the recommender writes it, and its constraint, as the recommender builds it
    (None for explanations): what the HF baseline gets, so both sides decode the same thing."""
    cat = rec.catalog
    if task == "sequential":
        return rec.text(task, job.user, job.history), cat.trie.restrict(set(job.history) | set(job.exclude))
    if task == "topn":
        return rec.text(task, job.user, job.candidates), cat.subtrie(job.candidates).restrict()
    return rec.text(task, job.user, [job.item]), None


def hf(runtime: TorchRuntime, rec: Recommender, task: str, beams: int, constrained: bool = True, item_tokens: int = 5):
    """The stock path, one request: HF generate on the same prompt-extended embeddings, constrained by a callback.

    `rec` only supplies the job's input text and its constraint (`job_input`); the search is HF's.
    `constrained=False` is plain `generate` with beams and a fixed number of new tokens (the REFERENCE anchor:
    an item's length, or EXPLANATION_TOKENS for explanations), whose output may be no valid item at all.

    Forward hooks time the encoder (encode = request start to encoder end, like ours: tokenize + embed +
    encoder) and the model's decoder-step calls; search is the rest of `generate`.
    """
    model, tok, dev = runtime.model, runtime.tokenizer, runtime.device
    clock = {"enc_end": 0.0, "fwd_start": 0.0, "decode": 0.0, "steps": 0}

    def enc_done(*_):
        clock["enc_end"] = time.perf_counter()

    def fwd_start(*_):
        clock["fwd_start"] = time.perf_counter()

    def fwd_done(*_):
        clock["decode"] += time.perf_counter() - clock["fwd_start"]
        clock["steps"] += 1

    task_index = model.config.task_index(task)

    @torch.inference_mode()
    def run(job) -> tuple[list | str, dict]:
        clock.update(decode=0.0, steps=0)
        hooks = [  # only while this request runs, so the other runtimes never pay for them
            model.t5.get_encoder().register_forward_hook(enc_done),
            model.t5.register_forward_pre_hook(fwd_start),
            model.t5.register_forward_hook(fwd_done),
        ]
        try:
            return request(job)
        finally:
            for h in hooks:
                h.remove()

    def request(job) -> tuple[list | str, dict]:
        t0 = time.perf_counter()
        text, con = job_input(rec, task, job)
        trie = con.trie if con is not None else None
        if task == "explanation" or not constrained:
            length = EXPLANATION_TOKENS if task == "explanation" else item_tokens
            limits = {"max_new_tokens": length, "min_new_tokens": length, "length_penalty": 1.0}
            limits["num_return_sequences"] = 1 if task == "explanation" else beams
        else:
            limits = {"max_new_tokens": new_tokens(item_tokens), "length_penalty": 0.0, "num_return_sequences": beams}
            limits["prefix_allowed_tokens_fn"] = allowed_tokens(trie, lambda _: con)

        enc = {k: v.to(dev) for k, v in encode_batch(tok, [text]).items()}
        with runtime.autocast():
            out = model.t5.generate(
                **generate_inputs(model, torch.full((1,), task_index, device=dev), enc),
                num_beams=beams,
                do_sample=False,
                **limits,
            )
        if task == "explanation" or trie is None:
            total = time.perf_counter() - t0
            parts = {"encode": clock["enc_end"] - t0, "decode": clock["decode"], "steps": clock["steps"]}
            parts["search"] = total - parts["encode"] - parts["decode"]
            return tok.decode(out[0].tolist()[1:]), {"total": total, **parts}
        items = item_list(trie, out.tolist(), TOP)
        total = time.perf_counter() - t0
        parts = {"encode": clock["enc_end"] - t0, "decode": clock["decode"], "steps": clock["steps"]}
        parts["search"] = total - parts["encode"] - parts["decode"]
        return items, {"total": total, **parts}

    return run


def busy_seconds() -> float | None:
    """CPU seconds all processes have used since boot (Linux `/proc/stat`), None elsewhere."""
    try:
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def time_requests(runners: dict, requests: list, warmup: int, rounds: int) -> tuple[dict, dict]:
    """Top-10 lists (explanations: texts) and timings per runtime, in `rounds` rounds of blocks; `requests` are jobs.

    The timed requests are cut into `rounds` chunks; each round runs every runtime through its chunk, one
    runtime after the other, after untimed warm-up (all `warmup` requests in the first round, one later), so
    a slow drift of a shared machine spreads over all runtimes. Not interleaved per request: on a 2-core CPU,
    ONNX Runtime's and OpenMP's idle-spinning threads then overlap the next runtime's request, which
    inflated HF's p50 about 3x (tiny shape).
    """
    timed = requests[warmup:]
    size = -(-len(timed) // max(1, rounds))
    lists: dict[str, list] = {key: [] for key in runners}
    timings: dict[str, list] = {key: [] for key in runners}
    for r in range(0, len(timed), size):
        for key, fn in runners.items():
            for job in requests[:warmup] if r == 0 else requests[:1]:
                fn(job)
            for job in timed[r : r + size]:
                items, t = fn(job)
                lists[key].append(items)
                timings[key].append(t)
    return lists, timings


def summarize(timings: list[dict]) -> dict:
    ms = np.array([t["total"] for t in timings]) * 1000
    return {
        "p50_ms": float(np.percentile(ms, 50)),
        "p99_ms": float(np.percentile(ms, 99)),
        "mean_ms": float(ms.mean()),
        "median_encode_ms": float(np.median([t["encode"] for t in timings]) * 1000),
        "median_decode_ms": float(np.median([t["decode"] for t in timings]) * 1000),
        "median_search_ms": float(np.median([t["search"] for t in timings]) * 1000),
        "median_steps": float(np.median([t["steps"] for t in timings])),
        "latencies_ms": [round(float(x), 3) for x in ms],
    }


def make_data(
    out: Path, users: int, history_len: tuple[int, int], seed: int, items: int = 300, item_ids: str = "digits"
) -> PreparedData:
    lo, hi = history_len
    raw = synthesize(users=users, items=items, seed=seed, min_len=lo, max_len=hi)
    prepare(raw, out, source_format="synthetic", seed=seed, item_ids=item_ids)
    return PreparedData.load(out)


def bench_shape(preset, data, data_dir, tok, requests, args, tmp: Path) -> dict:
    work = tmp / preset
    torch.manual_seed(args.seed)
    save_checkpoint(build_model(tok, preset), tok, work / "ckpt", {"train_config": {"data": str(data_dir)}})
    model, tok, _ = load_checkpoint(work / "ckpt")
    model.eval()
    parity = {}
    for quant in ("none", "int8") if args.device == "cpu" else ():  # ONNX Runtime is CPU-only on the GPU image
        t0 = time.perf_counter()
        parity[quant] = export_bundle(
            work / "ckpt",
            work / f"bundle-{quant}",
            data=data_dir,
            quantize=quant,
            force=quant != "none",  # random weights: int8 top-10 overlap is whatever it is; we report it
            parity_users=args.parity_users,
            seed=args.seed,
            log=lambda m, q=quant: log(f"  [{preset} export {q}] {m}"),
        )
        log(f"  [{preset} export {quant}] {time.perf_counter() - t0:.0f} s")
    task, b = args.task, args.beams
    catalog = Catalog.from_prepared(data, tok)
    torch_rt = TorchRuntime(model, tok, args.device)
    rec = recommender(torch_rt, catalog, task, b)
    runners = {"hf": hf(torch_rt, rec, task, b, item_tokens=catalog.longest_item)}
    if task != "explanation":
        runners["hf-plain"] = hf(torch_rt, rec, task, b, constrained=False, item_tokens=catalog.longest_item)
    runners["torch"] = ours(rec, task)
    if task != "explanation":
        runners["torch-allowed"] = ours(recommender(torch_rt, catalog, task, b, "allowed"), task)
    if args.static:  # same model; captures (CUDA) happen on first use of a shape, so one request per bucket first
        first_of_bucket = {}
        for job in requests:
            length = len(tok.encode_input(job_input(rec, task, job)[0])[0])
            first_of_bucket.setdefault(bucket(length, LENGTH_BUCKET_MIN), job)
        kinds = {"torch-static": False, **({"torch-graphs": True} if args.device == "cuda" else {})}
        for key, graphs in kinds.items():
            static_rt = TorchRuntime(model, tok, args.device, static=True, cuda_graphs=graphs)
            runners[key] = ours(recommender(static_rt, catalog, task, b), task)
            for job in first_of_bucket.values():
                runners[key](job)
    if args.device == "cpu":
        for name in ("fp32", "int8"):  # each bundle behind its own catalog, as `pod serve` loads it
            bundle = Bundle.load(work / f"bundle-{'none' if name == 'fp32' else name}")
            onnx_rt, onnx_catalog = OnnxRuntime(bundle, "cpu", args.threads), Catalog.from_bundle(bundle)
            runners[f"onnx-{name}"] = ours(recommender(onnx_rt, onnx_catalog, task, b), task)
            if task != "explanation":
                allowed = recommender(onnx_rt, onnx_catalog, task, b, "allowed")
                runners[f"onnx-{name}-allowed"] = ours(allowed, task)
    mean_tokens = float(
        np.mean([len(tok.encode_input(job_input(rec, task, j)[0])[0]) for j in requests[args.warmup :]])
    )
    t0, busy0, own0 = time.perf_counter(), busy_seconds(), time.process_time()
    lists, timings = time_requests(runners, requests, args.warmup, args.rounds)
    wall, busy1, own1 = time.perf_counter() - t0, busy_seconds(), time.process_time()
    # cores kept busy by other processes while we timed (ours excluded): anything well above 0 inflates the numbers
    others = None if busy0 is None else max(0.0, (busy1 - busy0) - (own1 - own0)) / wall
    results = {key: summarize(t) for key, t in timings.items()}
    log(f"  [{preset}] timed in {wall:.0f} s")
    for key, r in results.items():
        if key == "hf-plain":  # unconstrained: its outputs are not item lists
            r["identical_top10_vs_hf"] = r["top10_overlap_vs_hf"] = float("nan")
            r["speedup_vs_hf_p50"] = results["hf"]["p50_ms"] / r["p50_ms"]
            continue
        pairs = list(zip(lists["hf"], lists[key]))
        r["identical_top10_vs_hf"] = sum(a == b for a, b in pairs) / len(pairs)  # explanations: the same text
        r["top10_overlap_vs_hf"] = (
            float(np.mean([len(set(a) & set(b)) / TOP for a, b in pairs])) if task != "explanation" else float("nan")
        )
        r["speedup_vs_hf_p50"] = results["hf"]["p50_ms"] / r["p50_ms"]
        if key in ("torch-static", "torch-graphs"):  # the same model and search: lists should match (up to ties)
            r["identical_top10_vs_torch"] = sum(a == c for a, c in zip(lists["torch"], lists[key])) / len(pairs)
    cfg = model.t5.config
    return {
        "model": {
            "preset": preset,
            "d_model": cfg.d_model,
            "layers": f"{cfg.num_layers}+{cfg.num_decoder_layers}",
            "heads": cfg.num_heads,
            "vocab": cfg.vocab_size,
            "parameters": sum(p.numel() for p in model.parameters()),
            "num_prompts": model.config.num_prompts,
        },
        "other_processes_busy_cores": others,
        "mean_input_tokens": mean_tokens,
        "export_parity": {("fp32" if q == "none" else q): v for q, v in parity.items()},
        "runtimes": {NAMES[k]: v for k, v in results.items()},
    }


def print_table(
    preset: str, res: dict, n: int, warmup: int, rounds: int, tokens: float, beams: int, task: str = "sequential"
) -> None:
    m = res["model"]
    print(
        f"\nshape {preset}: d_model {m['d_model']}, layers {m['layers']}, vocab {m['vocab']}, "
        f"{m['parameters'] / 1e6:.1f}M params; {n} {task} requests after {warmup} warm-up "
        f"({rounds} rounds), batch 1, "
        f"{beams} beams, mean input {tokens:.1f} tokens (+{m['num_prompts']} prompts)"
    )
    head = (
        f"{'runtime':<40} {'p50 ms':>8} {'p99 ms':>8} {'encode':>7} {'decode':>7} {'search':>7} "
        f"{'steps':>5} {'top10=HF':>8} {'speed-up vs HF p50':>19}"
    )
    print(head)
    print("-" * len(head))
    for name, r in res["runtimes"].items():
        print(
            f"{name:<40} {r['p50_ms']:>8.1f} {r['p99_ms']:>8.1f} {r['median_encode_ms']:>7.1f} "
            f"{r['median_decode_ms']:>7.1f} {r['median_search_ms']:>7.1f} {r['median_steps']:>5.0f} "
            f"{100 * r['identical_top10_vs_hf']:>7.0f}% {r['speedup_vs_hf_p50']:>18.2f}x"
        )
    for name, r in res["runtimes"].items():
        if "identical_top10_vs_torch" in r:
            print(f"{name}: the same output as the eager PyTorch runtime for {r['identical_top10_vs_torch']:.0%}")
    if res["other_processes_busy_cores"] is not None:
        others = res["other_processes_busy_cores"]
        note = " (WARNING: a shared machine; latencies inflated, torch's most)" if others > 0.25 else ""
        print(f"other processes kept {others:.2f} cores busy on average while timing{note}")
    if preset == ANCHOR["shape"]:
        print(
            f"reference anchor: {ANCHOR['runtime']}, {ANCHOR['shape']} shape, {ANCHOR['hardware']}, "
            f"{ANCHOR['input_tokens']}-token inputs: {ANCHOR['ms']:.0f} ms per request"
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="tiny,t5-small", help="comma-separated model presets")
    ap.add_argument("--requests", type=int, default=50, help="timed requests per runtime")
    ap.add_argument("--warmup", type=int, default=5, help="untimed requests per runtime first")
    ap.add_argument("--rounds", type=int, default=3, help="timed requests in this many rounds of runtime blocks")
    ap.add_argument("--threads", type=int, default=0, help="intra-op threads for torch and ONNX (0: all cores)")
    ap.add_argument("--beams", type=int, default=20)
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="cuda: HF and PyTorch only")
    ap.add_argument("--task", choices=["sequential", "topn", "explanation"], default="sequential")
    ap.add_argument(
        "--static",
        action="store_true",
        help="also time TorchRuntime(static=True): static shapes, eager, and on CUDA replayed as CUDA graphs",
    )
    ap.add_argument(
        "--tokenizer",
        default="auto",
        help="SentencePiece model for the vocabulary: 'auto' = T5's (../shared/tokenizers/t5/spiece.model) when "
        "present, as the REFERENCE anchors used; 'data' = the small one trained on the synthetic shop",
    )
    ap.add_argument("--users", type=int, default=1000, help="synthetic shop size")
    ap.add_argument(
        "--item-ids",
        choices=["digits", "token", "collaborative", "semantic"],
        default="digits",
        help="how items are written (default: digits, the REFERENCE anchors' form; token: one step + exact top-k)",
    )
    ap.add_argument(
        "--items",
        type=int,
        default=300,
        help="catalogue size; 12101 (Beauty's) makes an ID 5 new tokens with T5's vocabulary, as the anchor",
    )
    ap.add_argument("--history-len", default="16,24", help="MIN,MAX purchases per user in the synthetic shop")
    ap.add_argument("--parity-users", type=int, default=4, help="users for the export's parity checks")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", help="write the results (every latency included) as JSON here")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    args.threads = args.threads or threads
    shapes = [s.strip() for s in args.shapes.split(",") if s.strip()]
    history_len = tuple(int(x) for x in args.history_len.split(","))

    tmp = Path(tempfile.mkdtemp(prefix="pod-latency-"))
    try:
        run(args, threads, shapes, history_len, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def benchmark_tokenizer(choice: str, data_dir: Path, data: PreparedData, tmp: Path, item_ids: str = "digits"):
    """'auto': T5's spiece.model from a `shared/` beside the checkout (what the REFERENCE anchors used), else the
    small one trained on the data; 'data': always the latter; anything else: a path to a spiece.model."""
    spiece = None
    if choice == "auto":
        found = [p / "shared/tokenizers/t5/spiece.model" for p in Path(__file__).resolve().parents]
        spiece = next((str(p) for p in found if p.is_file()), None)
    elif choice != "data":
        spiece = choice
    return tokenizer_for(TrainConfig(data=str(data_dir), out=str(tmp), tokenizer=spiece, item_ids=item_ids), data, tmp)


def run(args, threads: int, shapes: list[str], history_len: tuple[int, int], tmp: Path) -> None:
    data_dir = tmp / "synth"
    data = make_data(data_dir, args.users, history_len, args.seed, args.items, args.item_ids)
    tok = benchmark_tokenizer(args.tokenizer, data_dir, data, tmp, args.item_ids)
    users = random.Random(args.seed).sample(data.users, args.warmup + args.requests)
    requests = []  # one job per request, as `pod serve` hands them to the recommender
    for u in users:
        history, target = data.eval_example(u, "test")
        if args.task == "sequential":
            requests.append(SequentialJob(u, history, TOP))
        elif args.task == "topn":
            requests.append(TopNJob(u, list(data.candidates(u, "test")[0]), TOP, "beam"))
        else:
            requests.append(ExplainJob(u, target, EXPLANATION_TOKENS))

    device = f"CPU ({os.cpu_count()} cores, {threads} torch threads, {args.threads} ONNX Runtime threads)"
    if args.device == "cuda":
        device = f"{torch.cuda.get_device_name()} (fp32), host {device}"
    log(f"{device}; data {data_dir} (history {args.history_len}), {len(requests)} requests, work dir {tmp}")
    results = {}
    for preset in shapes:
        results[preset] = bench_shape(preset, data, data_dir, tok, requests, args, tmp)
    timed_tokens = next(iter(results.values()))["mean_input_tokens"]  # the same inputs for every shape
    print(f"device {device}; torch {torch.__version__}; latency per request; encode/decode/search: medians in ms")
    for preset, res in results.items():
        print_table(preset, res, args.requests, args.warmup, args.rounds, timed_tokens, args.beams, args.task)
    if args.out:
        Path(args.out).write_text(
            json.dumps(
                {
                    "device": device,
                    "requests": args.requests,
                    "warmup": args.warmup,
                    "rounds": args.rounds,
                    "beams": args.beams,
                    "max_new_tokens": MAX_NEW_TOKENS,
                    "history_len": list(history_len),
                    "mean_input_tokens": timed_tokens,
                    "anchor": ANCHOR,
                    "shapes": results,
                },
                indent=2,
            )
        )


if __name__ == "__main__":
    main()
