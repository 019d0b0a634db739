"""`pod export`: freeze a checkpoint into an ONNX bundle, then prove it computes what PyTorch computes.

Nothing is written unless every check passes (the bundle directory is filled under a temporary name and
swapped in at the end):
- fp32 logits of the encoder + decoder-step graphs within `1e-4` (max abs) of the PyTorch model, on random
  inputs of several batch sizes and lengths, over several decoding steps;
- the same top-10 lists from the recommender (`pod.recommender`, the code `pod evaluate` and the server run)
  through ONNX Runtime and through PyTorch for sampled users, on sequential and top-N, up to float ties:
  items whose scores differ by less than `SCORE_TOLERANCE` may swap, anything else fails the export;
- int8 (dynamic quantization of the weights): top-10 overlap with the fp32 bundle on the same users; below
  `min_overlap` the export stops unless `force`.
"""

from __future__ import annotations

import json
import random
import shutil
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch

from pod import templates
from pod.atomic import write_dir_atomically
from pod.bundle import BUNDLE_FORMAT, BUNDLE_VERSION, Bundle, file_entry, sha256
from pod.dataset import PreparedData
from pod.graphs import DecoderStepGraph, EncoderGraph, OutputGraph
from pod.model import load_checkpoint, resolve_checkpoint
from pod.recommender import Catalog, Recommender, SequentialJob, TopNJob
from pod.tokenization import EOS_ID
from pod.torch_runtime import TorchRuntime

LOGIT_TOLERANCE = 1e-4
SCORE_TOLERANCE = 1e-3  # item log-probabilities: a few logits' worth of LOGIT_TOLERANCE, summed over steps
PARITY_K = 10


class ParityError(RuntimeError):
    pass


def _export(
    module: torch.nn.Module, args: tuple, path: Path, names_in: list[str], names_out: list[str], axes: dict, opset: int
) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module,
            args,
            str(path),
            input_names=names_in,
            output_names=names_out,
            dynamic_axes=axes,
            opset_version=opset,
            dynamo=False,
            do_constant_folding=True,
        )


def export_graphs(model, tasks: list[str], out: Path, opset: int) -> None:
    cfg = model.t5.config
    ids = torch.randint(3, 50, (2, 7))
    enc_args = (ids, torch.zeros_like(ids), torch.ones_like(ids))
    for task in tasks:
        _export(
            EncoderGraph(model, task).eval(),
            enc_args,
            out / f"encoder_{task}.onnx",
            ["input_ids", "whole_word_ids", "attention_mask"],
            ["cross_kv", "encoder_mask"],
            {
                "input_ids": {0: "batch", 1: "length"},
                "whole_word_ids": {0: "batch", 1: "length"},
                "attention_mask": {0: "batch", 1: "length"},
                "cross_kv": {2: "batch", 4: "source"},
                "encoder_mask": {0: "batch", 1: "source"},
            },
            opset,
        )
    layers, heads, d_kv, s = cfg.num_decoder_layers, cfg.num_heads, cfg.d_kv, 7 + model.config.num_prompts
    dtype = next(model.parameters()).dtype
    dec_args = (
        torch.tensor([0, 5, 6, 7]),
        torch.ones(2, s, dtype=torch.long),
        torch.randn(layers, 2, 2, heads, s, d_kv, dtype=dtype),
        torch.randn(layers, 2, 4, heads, 2, d_kv, dtype=dtype),
    )
    _export(
        DecoderStepGraph(model).eval(),
        dec_args,
        out / "decoder_step.onnx",
        ["tokens", "encoder_mask", "cross_kv", "past_kv"],
        ["hidden", "present_kv"],
        {
            "tokens": {0: "rows"},
            "encoder_mask": {0: "batch", 1: "source"},
            "cross_kv": {2: "batch", 4: "source"},
            "past_kv": {2: "rows", 4: "steps"},
            "hidden": {0: "rows"},
            "present_kv": {2: "rows", 4: "steps_plus_one"},
        },
        opset,
    )
    hidden = torch.randn(4, cfg.d_model, dtype=torch.float32)
    _export(
        OutputGraph(model).eval(),
        (hidden, torch.tensor([1, 5, 9])),
        out / "output_columns.onnx",
        ["hidden", "columns"],
        ["logits"],
        {"hidden": {0: "rows"}, "columns": {0: "columns"}, "logits": {0: "rows", 1: "columns"}},
        opset,
    )
    _export(
        OutputGraph(model, full=True).eval(),
        (hidden,),
        out / "output_full.onnx",
        ["hidden"],
        ["logits"],
        {"hidden": {0: "rows"}, "logits": {0: "rows"}},
        opset,
    )


def check_logits(model, runtime, tokenizer, data: PreparedData, rng: random.Random) -> float:
    """Max abs logit difference ONNX vs PyTorch over batch sizes x lengths x 4 decoding steps."""
    worst = 0.0
    items = data.items
    for batch, length in ((1, 1), (3, 5), (8, 20)):
        texts = [
            templates.fill(
                "sequential",
                templates.BARE,
                rng.choice(data.users),
                [rng.choice(items) for _ in range(rng.randint(1, length))],
            )
            for _ in range(batch)
        ]
        dec = torch.tensor([[0] + [rng.randrange(3, tokenizer.vocab_size) for _ in range(3)] for _ in range(batch)])
        enc = {k: torch.from_numpy(v) for k, v in tokenizer.encode_batch(texts).items()}
        with torch.no_grad():
            ref = (
                model.logits(torch.full((batch,), model.config.task_index("sequential")), **enc, decoder_input_ids=dec)
                .float()
                .numpy()
            )
        session = runtime.start("sequential", texts)
        for t in range(dec.shape[1]):
            got = session.step(dec[:, t].numpy(), None if t == 0 else np.arange(batch))
            worst = max(worst, float(np.abs(got - ref[:, t]).max()))
    return worst


def parity_jobs(data: PreparedData, users: list[int], task: str, k: int) -> list:
    """The jobs the parity check ranks: each sampled user's test input, as `pod evaluate` builds it."""
    if task == "sequential":
        return [SequentialJob(u, data.history_before(u, "test"), k) for u in users]
    return [TopNJob(u, data.candidates(u, "test")[0], k, "beam", data.history_before(u, "test")) for u in users]


def ranked_lists(recommender: Recommender, task: str, jobs: list) -> list[list[tuple[int, float]]]:
    fn = recommender.sequential if task == "sequential" else recommender.topn
    return [r.items for r in fn(jobs)]


def same_up_to_ties(ref: list[tuple[int, float]], got: list[tuple[int, float]], tol: float) -> str | None:
    """None when `got` ranks like `ref` up to near-ties, else why not.

    Floats tie: two items whose scores differ by less than `tol` may swap (and one at the cut may trade places
    with the next one outside the list). Anything else is a real difference: a score off by more than `tol`,
    or an item moved past one it does not tie with.
    """
    if len(ref) != len(got):
        return f"{len(ref)} items vs {len(got)}"
    ref_score, got_score = dict(ref), dict(got)
    for n, ((a, sa), (b, sb)) in enumerate(zip(ref, got)):
        if abs(sa - sb) > tol:
            return f"rank {n + 1}: item {a} scores {sa:.6f} but item {b} scores {sb:.6f}"
    for item, s in got:
        if item in ref_score and abs(ref_score[item] - s) > tol:
            return f"item {item}: score {ref_score[item]:.6f} vs {s:.6f}"
    if ref:
        for item, s in got:  # present in one list only: must tie with the other list's last item
            if item not in ref_score and abs(s - ref[-1][1]) > tol:
                return f"item {item} ({s:.6f}) is not in the reference list and does not tie its last item"
        for item, s in ref:
            if item not in got_score and abs(s - got[-1][1]) > tol:
                return f"item {item} ({s:.6f}) is missing and does not tie the last item ({got[-1][1]:.6f})"
    return None


def check_ranking_parity(
    ref: Recommender, got: Recommender, data: PreparedData, users: list[int], task: str, k: int, tol: float
) -> tuple[float, list[str]]:
    """Share of users whose top-k lists are identical, and the users whose lists differ beyond ties."""
    jobs = parity_jobs(data, users, task, k)
    a, b = ranked_lists(ref, task, jobs), ranked_lists(got, task, jobs)
    identical = sum([i for i, _ in x] == [i for i, _ in y] for x, y in zip(a, b)) / max(1, len(jobs))
    problems = [f"user {u}: {why}" for u, x, y in zip(users, a, b) if (why := same_up_to_ties(x, y, tol))]
    return identical, problems


def export_bundle(
    checkpoint: str | Path,
    out: str | Path,
    data: str | Path | None = None,
    quantize: str = "none",
    dtype: str = "fp32",
    opset: int = 17,
    force: bool = False,
    min_overlap: float = 0.9,
    parity_users: int = 16,
    seed: int = 0,
    log=print,
) -> dict:
    from pod.onnx_runtime import OnnxRuntime

    ckpt = resolve_checkpoint(checkpoint)
    model, tokenizer, meta = load_checkpoint(ckpt)
    model.eval()
    data_dir = Path(data or meta.get("train_config", {}).get("data", ""))
    if not (data_dir / "manifest.json").is_file():
        raise FileNotFoundError(
            f"{data_dir}: prepared data not found; pass --data (the directory the model was trained on)"
        )
    prepared = PreparedData.load(data_dir)
    tasks = list(model.config.tasks)
    rng = random.Random(seed)
    sample = rng.sample(prepared.users, min(parity_users, len(prepared.users)))
    report: dict = {}

    def fill(tmp: Path) -> None:
        work = Path(tempfile.mkdtemp(prefix="pod-export-"))
        try:
            fp32_dir = work / "fp32"
            fp32_dir.mkdir()
            export_graphs(model, tasks, fp32_dir, opset)
            if dtype == "fp16":
                export_graphs(model.half(), tasks, tmp, opset)
                model.float()
            elif quantize == "int8":
                import logging

                from onnxruntime.quantization import QuantType, quantize_dynamic

                quiet = logging.getLogger().level
                logging.getLogger().setLevel(logging.ERROR)  # its "consider pre-processing" notes, once per file
                try:
                    for f in fp32_dir.glob("*.onnx"):
                        quantize_dynamic(str(f), str(tmp / f.name), weight_type=QuantType.QInt8)
                finally:
                    logging.getLogger().setLevel(quiet)
            else:
                for f in fp32_dir.glob("*.onnx"):
                    shutil.copyfile(f, tmp / f.name)
            tokenizer.save(tmp)  # spiece.model, and items.json when items are not digits
            catalog = {
                "id2user": {str(k): v for k, v in prepared.id2user.items()},
                "id2item": {str(k): v for k, v in prepared.id2item.items()},
                "item_tokens": {str(i): tokenizer.item_target(i) for i in prepared.items},
            }
            (tmp / "catalog.json").write_text(json.dumps(catalog))
            with open(tmp / "histories.txt", "w") as fh:
                for u in prepared.users:
                    fh.write(" ".join(map(str, [u, *prepared.sequences[u]])) + "\n")
            cfg = model.t5.config
            manifest = {
                "format": BUNDLE_FORMAT,
                "version": BUNDLE_VERSION,
                "tasks": tasks,
                "trained": model.config.trained_tasks,  # the tasks the model was taught (the server serves these)
                "num_prompts": model.config.num_prompts,
                "item_ids": getattr(tokenizer, "item_mode", "digits"),
                "topn_history": model.config.topn_history,
                "user_ids": model.config.user_ids,
                "opset": opset,
                "dtype": dtype,
                "quantization": quantize,
                "source_checkpoint": {"path": str(ckpt), "sha256": sha256(ckpt / "model.safetensors")},
                "model": {
                    "layers": cfg.num_decoder_layers,
                    "heads": cfg.num_heads,
                    "d_kv": cfg.d_kv,
                    "d_model": cfg.d_model,
                    "vocab": cfg.vocab_size,
                    "eos_id": EOS_ID,
                    "pad_id": 0,
                    "whole_word_size": model.config.whole_word_size,
                },
                "data_manifest": prepared.manifest,
                "files": {f.name: file_entry(f) for f in sorted(tmp.iterdir())},
            }
            (tmp / "bundle.json").write_text(json.dumps(manifest, indent=2))

            # parity, on the files as written
            (fp32_dir / "bundle.json").write_text(json.dumps({**manifest, "files": {}}))
            for name in ("spiece.model", "items.json", "catalog.json", "histories.txt"):
                if not (tmp / name).exists():
                    continue
                shutil.copyfile(tmp / name, fp32_dir / name)
            fp32 = OnnxRuntime(Bundle.load(fp32_dir, verify=False), provider="cpu")
            written = OnnxRuntime(Bundle.load(tmp), provider="cpu")
            torch_rt = TorchRuntime(model, tokenizer, "cpu")
            diff = check_logits(model, fp32, tokenizer, prepared, rng)
            report["max_abs_logit_diff_fp32"] = diff
            log(f"parity: fp32 ONNX vs PyTorch max |logit diff| = {diff:.2e} (limit {LOGIT_TOLERANCE:g})")
            if diff > LOGIT_TOLERANCE:
                raise ParityError(f"fp32 ONNX logits differ from PyTorch by {diff:.2e} > {LOGIT_TOLERANCE:g}")
            catalog = Catalog.from_bundle(Bundle.load(fp32_dir, verify=False))
            reference = Recommender(torch_rt, catalog)
            onnx32 = Recommender(fp32, catalog)
            for task in ("sequential", "topn"):
                same, problems = check_ranking_parity(
                    reference, onnx32, prepared, sample, task, PARITY_K, SCORE_TOLERANCE
                )
                report[f"{task}_identical_top{PARITY_K}_fp32"] = same
                report[f"{task}_differ_beyond_ties_fp32"] = len(problems)
                log(
                    f"parity: {task} top-{PARITY_K} ONNX fp32 vs PyTorch: identical for {100 * same:.0f}% of "
                    f"{len(sample)} users, equal up to ties (|score diff| < {SCORE_TOLERANCE:g}) for "
                    f"{len(sample) - len(problems)}"
                )
                if problems:
                    raise ParityError(
                        f"{task}: ONNX fp32 and PyTorch rank differently beyond float ties for {len(problems)} of "
                        f"{len(sample)} sampled users; first: {problems[0]}"
                    )
                if quantize != "none" or dtype != "fp32":
                    jobs = parity_jobs(prepared, sample, task, PARITY_K)
                    ref = [[i for i, _ in r] for r in ranked_lists(reference, task, jobs)]
                    q = [[i for i, _ in r] for r in ranked_lists(Recommender(written, catalog), task, jobs)]
                    overlap = float(np.mean([len(set(a) & set(b)) / PARITY_K for a, b in zip(ref, q)]))
                    report[f"{task}_top10_overlap_vs_fp32"] = overlap
                    kind = quantize if quantize != "none" else dtype
                    log(
                        f"parity: {task} top-10 overlap {kind} vs fp32 = {100 * overlap:.1f}% "
                        f"(threshold {100 * min_overlap:.0f}%)"
                    )
                    if overlap < min_overlap and not force:
                        raise ParityError(
                            f"{task}: {kind} top-10 overlap with fp32 is "
                            f"{100 * overlap:.1f}% < {100 * min_overlap:.0f}%; use --force to "
                            "write it anyway"
                        )
            manifest["parity"] = report
            (tmp / "bundle.json").write_text(json.dumps(manifest, indent=2))
        finally:
            shutil.rmtree(work, ignore_errors=True)

    write_dir_atomically(Path(out), fill)
    log(f"wrote {out}")
    return report
