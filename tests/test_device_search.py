"""Multi-token item IDs (digits, collaborative, semantic): the beam search on the model's device (`pod.device_search`,
what a GPU runs) must return the lists of the NumPy reference (`pod.decoding.beam_search`) up to ties, for
both normalizers, per-row exclusions, top-N candidate tries and any beam count; and it must build and use its
trie tensors on the model's device (checked on `meta`, as tests/test_devices.py checks the graphs)."""

from __future__ import annotations

from contextlib import nullcontext

import numpy as np
import pytest
import torch

from export.export import same_up_to_ties
from pod import device_search
from pod.dataset import PreparedData
from pod.decoding import Trie, beam_search
from pod.model import PODConfig, PODModel, build_model, t5_config
from pod.recommender import Catalog, DecodingConfig, ExplainJob, Recommender, SequentialJob, TopNJob
from pod.tokenization import EOS_ID
from pod.torch_runtime import HostSearch, TorchRuntime, TorchSession
from tests.test_devices import META, OneDevice

TOL = 1e-5


EXTRA = {"collaborative": dict(item_clusters=4, item_leaf_size=16), "semantic": dict(item_codebook=8)}


@pytest.fixture(scope="module", params=["digits", "collaborative", "semantic"])
def item_runtime(request, small_synth, tmp_path_factory):
    from training.train import TrainConfig, check_config, tokenizer_for

    data = PreparedData.load(small_synth)
    extra = EXTRA.get(request.param, {})
    cfg = check_config(TrainConfig(data=str(small_synth), out="unused", item_ids=request.param, **extra), data)
    tok = tokenizer_for(cfg, data, tmp_path_factory.mktemp("tok"))
    torch.manual_seed(0)
    rt = TorchRuntime(build_model(tok, "tiny", init_std=0.05), tok)
    return rt, data, Catalog.from_prepared(data, tok)


def hyp_list(row) -> list[tuple[int, float]]:
    return [(h.value, h.score) for h in row]


def assert_same(ref, got) -> None:
    """Row by row: the same items up to near-ties, scores within TOL, each item's tokens its trie path."""
    assert len(ref) == len(got)
    for n, (a, b) in enumerate(zip(ref, got)):
        why = same_up_to_ties(hyp_list(a), hyp_list(b), TOL)
        assert why is None, f"row {n}: {why}"
        assert all(h.tokens[-1] == EOS_ID and h.logprob == h.score for h in b)


def test_layout_tables_depths_and_constraints():
    trie = Trie([((5, 7, EOS_ID), "a"), ((5, 8, EOS_ID), "b"), ((5, EOS_ID), "c"), ((6, 9, 9, EOS_ID), "d")])
    lay = device_search.TrieLayout.build(trie, EOS_ID)
    n = len(trie.children)
    assert lay.dummy == n and lay.child_token.shape == (n + 1, 3)  # node 5 has three children: EOS, 7, 8
    root = lay.child_token[0].tolist()
    assert root == [5, 6, 0] and lay.child_node[0, 2] == n  # sorted by token, padded to the dummy node
    assert lay.width == [1, 2, 3, 1, 0]  # nodes a running beam can sit on, per depth (not those after EOS)
    assert [c.tolist() for c in lay.columns] == [[5, 6], [EOS_ID, 7, 8, 9], [EOS_ID, 9], [EOS_ID], []]
    five = lay.child_node[0, 0]
    assert lay.columns[1][lay.child_column[five, :3]].tolist() == lay.child_token[five, :3].tolist()
    for value, path in trie.paths.items():
        assert lay.tokens(path[-1]) == {"a": (5, 7, 1), "b": (5, 8, 1), "c": (5, 1), "d": (6, 9, 9, 1)}[value]
    assert device_search.trie_layout(trie, EOS_ID) is device_search.trie_layout(trie, EOS_ID)  # cached
    # on the trie itself: its blocked nodes; on a part of it: the nodes it allows, as nodes of the whole
    assert device_search.constraint_nodes(trie, trie.restrict({"d"})) == (sorted(trie.paths["d"]), False)
    part = Trie([((5, 8, EOS_ID), "b"), ((6, 9, 9, EOS_ID), "d")])
    allowed, only = device_search.constraint_nodes(trie, part.restrict({"d"}))
    assert only and allowed == sorted(trie.paths["b"])
    with pytest.raises(ValueError, match="not a part"):
        device_search.constraint_nodes(trie, Trie([((5, 9, EOS_ID), "x")]).restrict())


def _jobs(data: PreparedData, catalog: Catalog, rows: int):
    """Sequential inputs with each user's history banned; one row banned down to 3 items (fewer than beams)."""
    users = data.users[:rows]
    histories = [data.history_before(u, "test") for u in users]
    texts = [f"user_{u} " + " ".join(f"item_{i}" for i in h[-8:]) for u, h in zip(users, histories)]
    cons = [catalog.trie.restrict(set(h)) for h in histories]
    items = sorted(catalog.item_tokens)
    cons[-1] = catalog.trie.restrict(set(items[3:]))
    return texts, cons


@pytest.mark.parametrize("normalize", ["exact", "allowed"])
@pytest.mark.parametrize("beams", [4, 20])
def test_device_search_equals_the_numpy_reference(item_runtime, normalize, beams):
    rt, data, catalog = item_runtime
    texts, cons = _jobs(data, catalog, 7)
    longest = catalog.longest_item
    ref = beam_search(
        rt.start("sequential", texts),
        len(texts),
        beams,
        longest,
        EOS_ID,
        constraints=cons,
        length_penalty=0.0,
        normalize=normalize,
    )
    got = rt.start("sequential", texts).constrained_search(catalog.trie, cons, beams, longest, EOS_ID, normalize)
    assert_same(ref, got)
    assert [len(r) for r in got[:-1]] == [beams] * (len(texts) - 1) and len(got[-1]) == 3
    banned = set(data.history_before(data.users[0], "test"))
    assert not banned & {h.value for h in got[0]}
    assert {h.value for h in got[-1]} == set(sorted(catalog.item_tokens)[:3])
    if normalize == "allowed":  # three items left: their renormalized probabilities sum to one
        assert np.isclose(sum(np.exp(h.score) for h in got[-1]), 1.0, atol=1e-4)


def test_topn_candidate_tries_map_onto_the_catalog_trie(item_runtime):
    """A top-N row's trie is its candidates' own: the device search reads it as allowed nodes of the catalog's
    trie (one cached layout for every row) and ranks exactly the candidates the reference ranks."""
    rt, data, catalog = item_runtime
    users = data.users[10:15]
    cands = [data.candidates(u, "test")[0][:30] for u in users]
    cons = [catalog.subtrie(c).restrict({c[0]}) for c in cands]  # and one candidate excluded per row
    texts = [f"user_{u} " + " ".join(f"item_{i}" for i in c) for u, c in zip(users, cands)]
    for normalize in ("exact", "allowed"):
        args = (len(texts), 8, catalog.longest_item, EOS_ID)
        ref = beam_search(rt.start("topn", texts), *args, constraints=cons, length_penalty=0.0, normalize=normalize)
        got = rt.start("topn", texts).constrained_search(catalog.trie, cons, 8, catalog.longest_item, EOS_ID, normalize)
        assert_same(ref, got)
        for c, row in zip(cands, got):
            assert {h.value for h in row} <= set(c[1:])


@pytest.mark.parametrize("normalizer", ["exact", "allowed"])
def test_recommender_lists_are_the_same_on_the_device_and_on_the_host(item_runtime, normalizer):
    rt, data, catalog = item_runtime
    cfg = DecodingConfig(beams=10, normalizer=normalizer)
    device, host = Recommender(rt, catalog, cfg), Recommender(HostSearch(rt), catalog, cfg)
    users = data.users[20:28]
    seq = [SequentialJob(u, data.history_before(u, "test"), 5, frozenset({u % 50 + 1})) for u in users]
    top = [TopNJob(u, data.candidates(u, "test")[0][:25], 5, "beam", data.history_before(u, "test")) for u in users]
    for got, ref in ((device.sequential(seq), host.sequential(seq)), (device.topn(top), host.topn(top))):
        for a, b in zip(ref, got):
            assert same_up_to_ties(a.items, b.items, TOL) is None
            assert len(b.items) == 5 and a.tokens == b.tokens
    for job, ranked in zip(seq, device.sequential(seq)):
        assert not (set(job.history) | job.exclude) & {i for i, _ in ranked.items}


def test_explanations_read_only_each_rows_best_tokens_and_match_the_host_search(item_runtime):
    """Unconstrained beams (explanations): the session's `step_top` sends back each row's best 2 x group-size
    tokens, not the vocabulary, and the search must find what the full-vocabulary reference finds."""
    rt, data, catalog = item_runtime
    texts = [f"user_{u} item_{data.history_before(u, 'test')[-1]}" for u in data.users[:6]]
    assert hasattr(rt.start("explanation", texts), "step_top")
    # `</s>` masked for 4 steps: one spare token a row; repeats banned: as many spare tokens as a row has bans
    for groups, min_new, no_repeat in ((1, 0, 0), (3, 0, 0), (3, 4, 0), (3, 0, 1), (1, 4, 2)):
        kw = dict(num_groups=groups, length_penalty=1.0, min_new_tokens=min_new, no_repeat_ngram=no_repeat)
        ref = beam_search(HostSearch(rt).start("explanation", texts), len(texts), 9, 10, EOS_ID, **kw)
        got = beam_search(rt.start("explanation", texts), len(texts), 9, 10, EOS_ID, **kw)
        for a, b in zip(ref, got):  # sentences that tie may swap places
            assert same_up_to_ties([(h.tokens, h.score) for h in a], [(h.tokens, h.score) for h in b], TOL) is None
            assert all(len(h.tokens) > min_new for h in b)
            for h in b if no_repeat else ():  # no n-gram twice (the start token counts)
                text = (0, *h.tokens)
                grams = [text[i : i + no_repeat] for i in range(len(text) - no_repeat + 1)]
                assert len(set(grams)) == len(grams)
    cfg = DecodingConfig(explanation_beams=9, explanation_groups=3, max_explanation_tokens=10)
    jobs = [ExplainJob(u, data.history_before(u, "test")[-1], 10) for u in data.users[:6]]
    device, host = Recommender(rt, catalog, cfg).explain(jobs), Recommender(HostSearch(rt), catalog, cfg).explain(jobs)
    for a, b in zip(host, device):
        assert abs(a.score - b.score) < TOL and (a.text == b.text or a.score == b.score)


# The device check (tests/test_devices.py's): a model on `meta`, and a dispatch mode that refuses any operation
# whose inputs sit on two devices, so a trie table or index built on the CPU beside the weights fails here as
# it would on CUDA. The search's ops are shape-static (no nonzero, no boolean indexing), so the whole search
# runs on meta; only the final read-back (`hypotheses`) cannot, a meta tensor has no values.


def test_the_search_and_its_trie_tensors_stay_on_the_models_device():
    with torch.device(META):
        model = PODModel(PODConfig(t5=t5_config("tiny", 900)))
    rt = TorchRuntime(model, tokenizer=None, device=META)
    rt.autocast = nullcontext  # torch has no autocast for meta (the runtime enables it on CUDA only, for bf16)
    cfg = model.t5.config
    rng = np.random.default_rng(0)
    trie = Trie((tuple(rng.integers(2, 900, size=int(rng.integers(1, 4)))) + (EOS_ID,), n) for n in range(60))
    tokens = device_search.trie_layout(trie, EOS_ID).tokens
    part = Trie((tokens(trie.paths[v][-1]), v) for v in (5, 7, 9))  # a top-N row: a few candidates
    cons = [trie.restrict({0, 1, 2}), trie.restrict(), part.restrict({9})]
    batch, source = len(cons), 11
    cross_kv = torch.zeros(cfg.num_decoder_layers, 2, batch, cfg.num_heads, source, cfg.d_kv, device=META)
    mask = torch.ones(batch, source, dtype=torch.long, device=META)
    session = TorchSession(rt, cross_kv, mask)
    with OneDevice():
        tables = device_search.trie_tensors(trie, EOS_ID, META)
        assert {t.device for t in (tables.child_token, tables.child_node, tables.child_column, *tables.columns)} == {
            META
        }
        for normalize in ("exact", "allowed"):
            found = device_search.search_tensors(
                session.advance, session._logits, META, trie, cons, 6, 4, EOS_ID, normalize=normalize
            )
            assert found.score.device == META and found.score.shape == (batch, 6) == found.node.shape
    assert device_search.trie_tensors(trie, EOS_ID, META) is tables  # built once per trie and device
