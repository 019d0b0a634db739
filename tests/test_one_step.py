"""Token item IDs rank in one decoder step: the NumPy reference (`pod.decoding.top_columns`) and the PyTorch
session's on-device version (`TorchSession.top_columns`, what a GPU runs) must give identical lists."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pod.dataset import PreparedData
from pod.decoding import top_columns
from pod.model import build_model
from pod.recommender import Catalog, Recommender, SequentialJob, TopNJob
from pod.tokenization import PAD_ID
from pod.torch_runtime import TorchRuntime


def test_reference_keeps_bans_normalizes_and_breaks_ties_to_the_lower_column():
    logits = np.array([[1.0, 3.0, 3.0, 0.0, 2.0], [0.5, 0.1, 0.2, 0.3, 0.4]], dtype=np.float32)
    lse = np.array([10.0, 20.0], dtype=np.float32)
    idx, scores = top_columns(logits, lse, [np.array([2]), np.array([0, 4])], keep=False, k=3)
    assert idx.tolist() == [[1, 4, 0], [3, 2, 1]]
    assert np.allclose(scores[0], [3 - 10, 2 - 10, 1 - 10])
    idx, scores = top_columns(logits, None, [np.array([1, 2]), np.array([3])], keep=True, k=3)
    assert idx.tolist() == [[1, 2, -1], [3, -1, -1]]  # tie -> lower column; fewer allowed than k -> padding
    assert np.allclose(scores[0, :2], np.log(0.5)) and scores[1, 0] == pytest.approx(0.0)
    assert np.isneginf(scores[0, 2])
    idx, _ = top_columns(logits, lse, [np.arange(5), np.array([], dtype=np.int64)], keep=False, k=2)
    assert idx[0].tolist() == [-1, -1] and idx[1].tolist() == [0, 4]


@pytest.fixture(scope="module")
def token_runtime(small_synth, tmp_path_factory):
    from training.train import TrainConfig, check_config, tokenizer_for

    data = PreparedData.load(small_synth)
    cfg = check_config(TrainConfig(data=str(small_synth), out="unused", item_ids="token"), data)
    tok = tokenizer_for(cfg, data, tmp_path_factory.mktemp("tok"))
    torch.manual_seed(0)
    model = build_model(tok, "tiny", topn_history=True, init_std=0.05)
    return TorchRuntime(model, tok), data


class NoDeviceRanking:
    """The same runtime without `top_columns`: the recommender falls back to the NumPy reference."""

    def __init__(self, rt: TorchRuntime) -> None:
        self.rt, self.tokenizer, self.topn_history, self.user_ids = rt, rt.tokenizer, rt.topn_history, rt.user_ids
        self.tasks = rt.tasks

    def start(self, task, texts):
        session = self.rt.start(task, texts)
        return type("Plain", (), {"step_columns": session.step_columns, "step": session.step})()


@pytest.mark.parametrize("exact", [True, False])
@pytest.mark.parametrize("keep", [True, False])
def test_device_ranking_equals_the_reference(token_runtime, keep, exact):
    rt, data = token_runtime
    catalog = Catalog.from_prepared(data, rt.tokenizer)
    rng = np.random.default_rng(1)
    n = len(catalog.item_columns)
    sets = [np.sort(rng.choice(n, size=int(rng.integers(0, 40)), replace=False)) for _ in range(12)]
    texts = [f"user_{u} item_{u % 50} item_{u % 7}" for u in range(12)]
    start = np.full(12, PAD_ID, dtype=np.int64)
    idx, scores = rt.start("sequential", texts).top_columns(start, catalog.item_columns, sets, keep, 10, exact)
    logits, lse = rt.start("sequential", texts).step_columns(start, None, catalog.item_columns, exact)
    ref_idx, ref_scores = top_columns(logits, lse, sets, keep, 10)
    assert np.array_equal(idx, ref_idx)
    assert np.allclose(scores, ref_scores, atol=1e-5)


def test_recommender_gives_the_same_lists_with_or_without_device_ranking(token_runtime):
    rt, data = token_runtime
    catalog = Catalog.from_prepared(data, rt.tokenizer)
    device, host = Recommender(rt, catalog), Recommender(NoDeviceRanking(rt), catalog)
    users = data.users[:16]
    seq = [SequentialJob(u, data.history_before(u, "test"), 10) for u in users]
    top = [TopNJob(u, data.candidates(u, "test")[0], 5, "score", data.history_before(u, "test")) for u in users]
    for a, b in zip(device.sequential(seq) + device.topn(top), host.sequential(seq) + host.topn(top)):
        assert [i for i, _ in a.items] == [i for i, _ in b.items]
        assert np.allclose([s for _, s in a.items], [s for _, s in b.items], atol=1e-5)
    history = set(seq[0].history)
    assert not history & {i for i, _ in device.sequential(seq[:1])[0].items}


def test_topn_reads_the_sequential_prompt_at_the_candidates(token_runtime):
    """Token ids rank top-N candidates under the sequential prompt by default: each candidate's score is the
    next-item log-probability given the user's history, the same number the sequential ranking gives it."""
    from pod.recommender import DecodingConfig

    rt, data = token_runtime
    catalog = Catalog.from_prepared(data, rt.tokenizer)
    rec = Recommender(rt, catalog)
    assert rec.topn_task == "sequential"
    assert Recommender(rt, catalog, DecodingConfig(topn_prompt="topn")).topn_task == "topn"
    users = data.users[:8]
    jobs = [TopNJob(u, data.candidates(u, "test")[0], 10, "score", data.history_before(u, "test")) for u in users]
    texts = [rec.text("sequential", j.user, j.history) for j in jobs]
    start = np.full(len(jobs), PAD_ID, dtype=np.int64)
    logits, lse = rt.start("sequential", texts).step_columns(start, None, catalog.item_columns, True)
    logp = logits - lse[:, None]
    for row, (job, ranked) in enumerate(zip(jobs, rec.topn(jobs))):
        expected = sorted(job.candidates, key=lambda i: -logp[row, catalog.column_of[i]])[:10]
        assert [i for i, _ in ranked.items] == expected
        assert np.allclose([s for _, s in ranked.items], [logp[row, catalog.column_of[i]] for i in expected], atol=1e-5)
    # the top-N prompt reads the candidates instead: other inputs, other scores
    other = Recommender(rt, catalog, DecodingConfig(topn_prompt="topn")).topn(jobs)
    assert any([s for _, s in a.items] != [s for _, s in b.items] for a, b in zip(other, rec.topn(jobs)))


def test_topn_prompt_must_be_known_and_trained(token_runtime):
    from pod.recommender import DecodingConfig

    with pytest.raises(ValueError, match="topn_prompt"):
        DecodingConfig(topn_prompt="candidates")
    rt, data = token_runtime
    catalog = Catalog.from_prepared(data, rt.tokenizer)
    no_topn = NoDeviceRanking(rt)
    no_topn.tasks = ["sequential", "explanation"]  # a model trained without the top-N task
    assert Recommender(no_topn, catalog).topn_task == "sequential"
    with pytest.raises(ValueError, match="no topn prompt"):
        Recommender(no_topn, catalog, DecodingConfig(topn_prompt="topn"))


def test_topn_under_the_sequential_prompt_with_multi_token_ids(small_synth, tmp_path):
    """Digits ids rank top-N by beam search or exact scoring; under the sequential prompt both read the history
    through the sequential encoder and return only candidates."""
    from pod.recommender import DecodingConfig
    from training.train import TrainConfig, check_config, tokenizer_for

    data = PreparedData.load(small_synth)
    cfg = check_config(TrainConfig(data=str(small_synth), out="unused", item_ids="digits"), data)
    tok = tokenizer_for(cfg, data, tmp_path)
    torch.manual_seed(0)
    rt = TorchRuntime(build_model(tok, "tiny"), tok)
    prompts: list[str] = []
    start = rt.start
    rt.start = lambda task, texts: prompts.append(task) or start(task, texts)
    rec = Recommender(rt, Catalog.from_prepared(data, tok), DecodingConfig(beams=8, topn_prompt="sequential"))
    assert rec.topn_task == "sequential"
    users = data.users[:4]
    for mode in ("beam", "score"):
        jobs = [TopNJob(u, data.candidates(u, "test")[0][:20], 5, mode, data.history_before(u, "test")) for u in users]
        for job, ranked in zip(jobs, rec.topn(jobs)):
            items = [i for i, _ in ranked.items]
            assert items and set(items) <= set(job.candidates) and len(set(items)) == len(items)
            scores = [s for _, s in ranked.items]
            assert scores == sorted(scores, reverse=True)
    assert prompts and set(prompts) == {"sequential"}
