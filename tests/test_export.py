"""ONNX export: parity with PyTorch, bundle verification, int8 refusal, and a torch-free serving path."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from export.export import (
    SCORE_TOLERANCE,
    ParityError,
    check_ranking_parity,
    export_bundle,
    same_up_to_ties,
)
from pod import templates
from pod.bundle import Bundle, BundleError
from pod.dataset import PreparedData
from pod.decoding import beam_search
from pod.model import load_checkpoint
from pod.onnx_runtime import OnnxRuntime
from pod.recommender import Catalog, Recommender
from pod.tokenization import EOS_ID
from pod.torch_runtime import TorchRuntime
from tests.conftest import ROOT


def test_bundle_manifest_and_parity_report(exported_bundle):
    manifest = json.loads((exported_bundle / "bundle.json").read_text())
    assert manifest["format"] == "pod-bundle" and manifest["dtype"] == "fp32" and manifest["quantization"] == "none"
    assert manifest["item_ids"] == "token" and manifest["version"] == 3
    assert set(manifest["files"]) == {
        "encoder_explanation.onnx",
        "encoder_sequential.onnx",
        "encoder_topn.onnx",
        "decoder_step.onnx",
        "output_columns.onnx",
        "output_full.onnx",
        "spiece.model",
        "items.json",
        "catalog.json",
        "histories.txt",
    }
    assert (
        manifest["num_prompts"] == 3 and manifest["opset"] == 17 and len(manifest["source_checkpoint"]["sha256"]) == 64
    )
    parity = manifest["parity"]
    assert parity["max_abs_logit_diff_fp32"] <= 1e-4
    assert parity["sequential_differ_beyond_ties_fp32"] == 0 and parity["topn_differ_beyond_ties_fp32"] == 0
    assert parity["sequential_identical_top10_fp32"] >= 0.9 and parity["topn_identical_top10_fp32"] >= 0.9


def test_onnx_beam_search_ranks_like_pytorch(exported_bundle, trained_sequential, default_synth):
    data = PreparedData.load(default_synth)
    bundle = Bundle.load(exported_bundle)
    onnx_rt = OnnxRuntime(bundle)
    model, tok, _ = load_checkpoint(trained_sequential)
    torch_rt = TorchRuntime(model, tok)
    users = data.users[-12:]  # users the export's own check did not necessarily sample
    catalog = Catalog.from_bundle(bundle)
    trie = catalog.trie
    for task in ("sequential", "topn"):
        _, problems = check_ranking_parity(
            Recommender(torch_rt, catalog), Recommender(onnx_rt, catalog), data, users, task, 20, SCORE_TOLERANCE
        )
        assert problems == []
    # the allowed-token normalizer (output columns only, forced end skipped) agrees across runtimes too
    texts = [templates.fill("sequential", templates.BARE, u, data.eval_example(u, "test")[0]) for u in users]
    cons = [trie.restrict(data.eval_example(u, "test")[0]) for u in users]
    lists = [
        [
            [h.value for h in row]
            for row in beam_search(
                rt.start("sequential", texts),
                len(users),
                20,
                16,
                EOS_ID,
                constraints=cons,
                length_penalty=0.0,
                normalize="allowed",
            )
        ]
        for rt in (onnx_rt, torch_rt)
    ]
    assert all(len(row) == 20 for row in lists[0])
    assert sum(a == b for a, b in zip(*lists)) >= len(users) - 1  # floats may tie; never more than one user


@pytest.mark.parametrize("batch,length", [(1, 3), (4, 11), (7, 25)])
def test_encoder_and_step_logits_match_at_several_shapes(exported_bundle, trained_sequential, batch, length):
    model, tok, _ = load_checkpoint(trained_sequential)
    rt = OnnxRuntime(Bundle.load(exported_bundle))
    rng = np.random.default_rng(batch * 100 + length)
    texts = [
        f"user_{rng.integers(1, 999)} " + " ".join(f"item_{i}" for i in rng.integers(1, 300, length))
        for _ in range(batch)
    ]
    dec = torch.from_numpy(np.concatenate([np.zeros((batch, 1)), rng.integers(3, 700, (batch, 4))], 1).astype(np.int64))
    enc = {k: torch.from_numpy(v) for k, v in tok.encode_batch(texts).items()}
    with torch.no_grad():
        ref = model.logits(torch.full((batch,), model.config.task_index("topn")), **enc, decoder_input_ids=dec).numpy()
    session = rt.start("topn", texts)
    for t in range(dec.shape[1]):
        got = session.step(dec[:, t].numpy(), None if t == 0 else np.arange(batch))
        assert np.abs(got - ref[:, t]).max() <= 1e-4


def _copy(bundle, tmp_path):
    dst = tmp_path / "b"
    shutil.copytree(bundle, dst)
    return dst


def test_missing_truncated_or_tampered_files_stop_loading(exported_bundle, tmp_path):
    b = _copy(exported_bundle, tmp_path)
    (b / "decoder_step.onnx").unlink()
    with pytest.raises(BundleError, match="decoder_step.onnx: missing"):
        Bundle.load(b)
    b = _copy(exported_bundle, tmp_path / "2")
    data = (b / "encoder_topn.onnx").read_bytes()
    (b / "encoder_topn.onnx").write_bytes(data[: len(data) // 2])
    with pytest.raises(BundleError, match="encoder_topn.onnx: .*truncated"):
        Bundle.load(b)
    b = _copy(exported_bundle, tmp_path / "3")
    cat = (b / "catalog.json").read_bytes()
    (b / "catalog.json").write_bytes(cat.replace(b'"1"', b'"9"', 1))
    with pytest.raises(BundleError, match="catalog.json: SHA-256"):
        Bundle.load(b)
    with pytest.raises(BundleError, match="bundle.json: missing"):
        Bundle.load(tmp_path / "nothing")


def test_int8_reports_overlap_and_refuses_under_threshold(trained_sequential, default_synth, exported_bundle, tmp_path):
    out = tmp_path / "int8"
    with pytest.raises(ParityError, match="overlap"):
        export_bundle(
            trained_sequential,
            out,
            data=default_synth,
            quantize="int8",
            min_overlap=1.01,
            parity_users=6,
            log=lambda *_: None,
        )
    assert not out.exists()  # nothing half-written
    report = export_bundle(
        trained_sequential,
        out,
        data=default_synth,
        quantize="int8",
        min_overlap=1.01,
        force=True,
        parity_users=6,
        log=lambda *_: None,
    )
    assert 0.5 <= report["sequential_top10_overlap_vs_fp32"] <= 1.0
    manifest = json.loads((out / "bundle.json").read_text())
    assert manifest["quantization"] == "int8"
    for name in ("decoder_step.onnx", "encoder_sequential.onnx"):  # int8 weights: well under half the fp32 size
        assert (out / name).stat().st_size < 0.5 * (exported_bundle / name).stat().st_size


def test_onnx_serving_path_imports_no_torch(exported_bundle):
    code = (
        "import sys, numpy as np\n"
        "from pod.bundle import Bundle\nfrom pod.onnx_runtime import OnnxRuntime\n"
        "from pod.decoding import beam_search\n"
        f"b = Bundle.load({str(exported_bundle)!r})\nrt = OnnxRuntime(b)\n"
        "from pod.recommender import Catalog, Recommender, SequentialJob\n"
        "rec = Recommender(rt, Catalog.from_bundle(b))\n"
        "(r,) = rec.sequential([SequentialJob(3, [5, 6], 4)])\n"
        "assert len(r.items) == 4 and all(i not in (5, 6) for i, _ in r.items)\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\nprint('ok')\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stderr[-2000:]


def test_near_ties_may_swap_but_real_differences_fail():
    ref = [(28, -4.150077819824219), (13, -4.150078773498535), (7, -5.0), (9, -6.0)]
    swapped = [(13, -4.150079), (28, -4.150077), (7, -5.0000002), (9, -6.0)]  # the tie of issue 13
    assert same_up_to_ties(ref, swapped, SCORE_TOLERANCE) is None
    at_cut = [(28, -4.15), (13, -4.15), (7, -5.0), (11, -6.0000001)]  # the last place ties an outsider
    assert same_up_to_ties(ref, at_cut, SCORE_TOLERANCE) is None
    assert "rank 3" in same_up_to_ties(ref, [(28, -4.15), (13, -4.15), (9, -6.0), (7, -5.0)], SCORE_TOLERANCE)
    assert same_up_to_ties(ref, [(28, -4.15), (13, -4.15), (7, -5.0), (11, -5.5)], SCORE_TOLERANCE)
    assert same_up_to_ties(ref, ref[:3], SCORE_TOLERANCE)


class _Perturbed:
    """A runtime whose logits for one item token are pushed up: a graph that computes something else."""

    def __init__(self, runtime, column: int, by: float) -> None:
        self.runtime, self.column, self.by = runtime, column, by
        self.tokenizer, self.topn_history, self.user_ids = runtime.tokenizer, runtime.topn_history, runtime.user_ids
        self.tasks = runtime.tasks

    def start(self, task, texts):
        session = self.runtime.start(task, texts)
        column, by = self.column, self.by

        class Session:
            def step(self, tokens, parents):
                out = session.step(tokens, parents).copy()
                out[:, column] += by
                return out

        return Session()


def test_parity_passes_a_constructed_near_tie_and_fails_a_perturbed_graph(exported_bundle, default_synth):
    data = PreparedData.load(default_synth)
    bundle = Bundle.load(exported_bundle)
    catalog = Catalog.from_bundle(bundle)
    rt = OnnxRuntime(bundle)
    users = data.users[:8]
    first = catalog.item_tokens[data.items[0]][0]  # the first token of an item ID
    tie = Recommender(_Perturbed(rt, first, 3e-5), catalog)  # a near-tie's worth: may swap, must pass
    _, problems = check_ranking_parity(Recommender(rt, catalog), tie, data, users, "sequential", 10, SCORE_TOLERANCE)
    assert problems == []
    wrong = Recommender(_Perturbed(rt, first, 0.5), catalog)
    _, problems = check_ranking_parity(Recommender(rt, catalog), wrong, data, users, "sequential", 10, SCORE_TOLERANCE)
    assert problems and "user" in problems[0]


@pytest.mark.parametrize("item_ids", ["digits", "collaborative", "semantic"])
def test_every_item_mode_exports_with_parity_and_ranks_from_the_bundle(item_ids, small_synth, tmp_path):
    """Token mode is the fixtures' model; the paper's digits and the collaborative and semantic codes (several
    tokens per item: a real trie under the beam search) go through training, export parity and the bundle too."""
    from training.train import TrainConfig, train

    run = tmp_path / "run"
    train(
        TrainConfig(
            data=str(small_synth),
            out=str(run),
            tasks=["sequential", "topn"],
            item_ids=item_ids,
            item_clusters=4,
            item_leaf_size=16,
            item_levels=3,
            item_codebook=8,
            batch_size=32,
            lr=1e-3,
            max_steps=60,
            val_limit=50,
            progress=False,
        )
    )
    report = export_bundle(run, tmp_path / "bundle", data=small_synth, parity_users=6, log=lambda *_: None)
    assert report["sequential_differ_beyond_ties_fp32"] == 0 and report["topn_differ_beyond_ties_fp32"] == 0
    bundle = Bundle.load(tmp_path / "bundle")
    assert bundle.manifest["item_ids"] == item_ids
    catalog = Catalog.from_bundle(bundle)
    if item_ids == "collaborative":
        assert min(len(t) for t in catalog.item_tokens.values()) >= 3  # clusters, then the unique token, then </s>
    if item_ids == "semantic":
        assert {len(t) for t in catalog.item_tokens.values()} == {5}  # 3 levels, the unique token, </s>
    rec = Recommender(OnnxRuntime(bundle), catalog)
    data = PreparedData.load(small_synth)
    from pod.recommender import SequentialJob, TopNJob

    user = data.users[0]
    history = data.history_before(user, "test")
    (seq,) = rec.sequential([SequentialJob(user, history, 10)])
    items = [i for i, _ in seq.items]
    assert len(items) == 10 == len(set(items)) and not set(items) & set(history)
    cands = data.candidates(user, "test")[0]
    beam, score = rec.topn([TopNJob(user, cands, 5, "beam"), TopNJob(user, cands, 5, "score")])
    assert set(i for i, _ in beam.items) <= set(cands) and set(i for i, _ in score.items) <= set(cands)
