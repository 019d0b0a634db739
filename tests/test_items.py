"""Item indexes: one token per item, collaborative and semantic codes (deterministic, unique, leak-free), JSON round
trips."""

from __future__ import annotations

import numpy as np
import pytest

from pod.dataset import PreparedData
from pod.items import ItemIndex, cooccurrence, residual_kmeans, spectral_split


def _train_parts(data: PreparedData) -> list[list[int]]:
    return [data.train_items(u) for u in data.users]


def test_token_index_gives_each_item_its_own_token():
    index = ItemIndex.token([5, 3, 9, 3])
    assert index.codes == {3: (0,), 5: (1,), 9: (2,)}
    assert index.num_tokens == 3 and index.token_names[2] == "<item_9>"
    assert ItemIndex.from_json(index.to_json()) == index


def test_digits_index_has_no_tokens_and_modes_are_checked():
    assert ItemIndex.digits().num_tokens == 0
    with pytest.raises(ValueError, match="item ids must be one of"):
        ItemIndex("bogus")


def test_collaborative_codes_are_unique_prefix_free_and_deterministic(small_synth):
    data = PreparedData.load(small_synth)
    a = ItemIndex.collaborative(_train_parts(data), data.items, clusters=4, leaf_size=10, seed=1)
    b = ItemIndex.collaborative(_train_parts(data), data.items, clusters=4, leaf_size=10, seed=1)
    assert a.to_json() == b.to_json()
    assert set(a.codes) == set(data.items)  # every item, also those never seen in training
    codes = list(a.codes.values())
    assert len(set(codes)) == len(codes)
    full = set(codes)
    assert not any(c[:k] in full for c in codes for k in range(1, len(c)))  # no code is a prefix of another
    depth = a.params["depth"]
    assert depth >= 2  # 120 items, leaves of at most 10, 4 clusters per level
    for code in codes:
        *path, leaf = code
        assert [t // 4 for t in path] == list(range(len(path)))  # level-l cluster tokens at level l
        assert depth * 4 <= leaf < a.num_tokens and leaf - depth * 4 < 10  # then a leaf position
    assert ItemIndex.from_json(a.to_json()) == a


def test_collaborative_codes_ignore_validation_and_test_items(small_synth):
    data = PreparedData.load(small_synth)
    base = ItemIndex.collaborative(_train_parts(data), data.items, clusters=4, leaf_size=16)
    # changing every user's last two items (the validation and test targets) changes nothing
    shuffled = {u: s[:-2] + [s[-1], s[-2]] for u, s in data.sequences.items()}
    again = ItemIndex.collaborative([s[:-2] for s in shuffled.values()], data.items, clusters=4, leaf_size=16)
    assert again.codes == base.codes


def test_collaborative_clusters_follow_cooccurrence():
    # two disjoint shops of 30 items each: the first split must not mix them
    rng = np.random.default_rng(0)
    seqs = [list(rng.permutation(30)[:6] + 1 + 30 * (k % 2)) for k in range(400)]
    index = ItemIndex.collaborative(seqs, range(1, 61), clusters=2, leaf_size=30)
    first = {item: code[0] for item, code in index.codes.items()}
    assert len({first[i] for i in range(1, 31)}) == 1 and len({first[i] for i in range(31, 61)}) == 1
    assert first[1] != first[31]


def test_semantic_codes_are_unique_levelled_and_deterministic(small_synth, tmp_path):
    data = PreparedData.load(small_synth)
    a = ItemIndex.semantic(_train_parts(data), data.items, levels=3, codebook=8, seed=1)
    b = ItemIndex.semantic(_train_parts(data), data.items, levels=3, codebook=8, seed=1)
    assert a.to_json() == b.to_json()
    assert set(a.codes) == set(data.items)
    codes = list(a.codes.values())
    assert len(set(codes)) == len(codes) and all(len(c) == 4 for c in codes)  # 3 levels + 1 disambiguation token
    positions: dict[tuple[int, ...], list[int]] = {}
    for item in sorted(a.codes):
        *levels, last = a.codes[item]
        assert [t // 8 for t in levels] == [0, 1, 2]  # level l's codes in block l
        assert 24 <= last < a.num_tokens
        positions.setdefault(tuple(levels), []).append(last - 24)
    # the last token numbers the items sharing all three levels 0, 1, 2, ... in item order
    assert all(p == list(range(len(p))) for p in positions.values())
    assert a.num_tokens == 24 + max(len(p) for p in positions.values())
    distinct = [len({c[:k] for c in codes}) for k in (1, 2, 3)]
    assert distinct[0] <= 8 < distinct[1] < distinct[2]  # each residual level splits what the one before left
    assert ItemIndex.semantic(_train_parts(data), data.items, levels=3, codebook=8, seed=2).codes != a.codes
    a.save(tmp_path / "items.json")
    back = ItemIndex.load(tmp_path / "items.json")
    assert back == a and back.mode == "semantic" and back.params["levels"] == 3 and back.params["codebook"] == 8


def test_semantic_codes_ignore_validation_and_test_items(small_synth):
    data = PreparedData.load(small_synth)
    base = ItemIndex.semantic(_train_parts(data), data.items)
    shuffled = {u: s[:-2] + [s[-1], s[-2]] for u, s in data.sequences.items()}
    again = ItemIndex.semantic([s[:-2] for s in shuffled.values()], data.items)
    assert again.codes == base.codes
    # while the training part does matter
    changed = ItemIndex.semantic([s[:-3] for s in data.sequences.values()], data.items)
    assert changed.codes != base.codes


def test_semantic_prefixes_follow_cooccurrence(small_synth):
    """Pairs bought close together (the heaviest tenth of the training graph's edges) share their first code,
    and their first two, far more often than random pairs do."""
    data = PreparedData.load(small_synth)
    parts = _train_parts(data)
    index = ItemIndex.semantic(parts, data.items, seed=0)
    items = sorted(data.items)
    graph = cooccurrence(parts, items).tocoo()
    upper = graph.row < graph.col
    heaviest = np.argsort(-graph.data[upper], kind="stable")[: upper.sum() // 10]
    close = [(items[a], items[b]) for a, b in zip(graph.row[upper][heaviest], graph.col[upper][heaviest])]
    rng = np.random.default_rng(0)
    anywhere = [(a, b) for a, b in rng.choice(items, size=(2000, 2)).tolist() if a != b]

    def shared(pairs: list[tuple[int, int]], k: int) -> float:
        return float(np.mean([index.codes[a][:k] == index.codes[b][:k] for a, b in pairs]))

    assert len(close) >= 30
    assert shared(close, 1) > 0.5 and shared(close, 1) > 5 * shared(anywhere, 1)
    assert shared(close, 2) > 0.1 and shared(close, 2) > 5 * shared(anywhere, 2)


def test_semantic_items_without_cooccurrence_are_spread_over_the_codes():
    # items 1..30 bought together in two shops, items 31..60 never in training
    rng = np.random.default_rng(0)
    seqs = [list(rng.permutation(15)[:5] + 1 + 15 * (k % 2)) for k in range(200)]
    index = ItemIndex.semantic(seqs, range(1, 61), levels=2, codebook=4)
    assert index.params["linked_items"] == 30 and len(set(index.codes.values())) == 60
    cold = [index.codes[i][:2] for i in range(31, 61)]
    assert len({c[0] for c in cold}) == 4 and len(set(cold)) >= 8  # not piled on one path
    assert max(cold.count(c) for c in cold) <= 6
    first = {i: index.codes[i][0] for i in range(1, 31)}
    assert not {first[i] for i in range(1, 16)} & {first[i] for i in range(16, 31)}  # the two shops stay apart


def test_residual_kmeans_refines_level_by_level():
    # four far-apart blobs, each made of two close sub-blobs: level 0 finds the blobs, level 1 the sub-blobs
    rng = np.random.default_rng(0)
    centers = np.array([[10.0, 0], [-10, 0], [0, 10], [0, -10]])
    offsets = np.array([[1.0, 1.0], [-1.0, -1.0]])
    points = np.concatenate([c + o + 0.05 * rng.standard_normal((25, 2)) for c in centers for o in offsets])
    blob, sub = np.repeat(np.arange(4), 50), np.tile(np.repeat(np.arange(2), 25), 4)
    codes = residual_kmeans(points, levels=2, codebook=4, seed=0)
    assert len(set(zip(blob, codes[:, 0]))) == 4  # level 0 labels are the blobs
    # level 1 quantizes the residuals, the shared offsets: no code mixes the two sub-blobs, and every blob uses
    # the same codes (one codebook for all residuals)
    assert len(set(zip(sub, codes[:, 1]))) == len(set(codes[:, 1]))
    assert all(set(codes[blob == b, 1]) == set(codes[:, 1]) for b in range(4))
    assert np.array_equal(residual_kmeans(points, levels=2, codebook=4, seed=0), codes)


def test_spectral_split_of_a_graph_without_edges_falls_back_to_equal_parts():
    graph = cooccurrence([], list(range(1, 41)), 3)
    labels = spectral_split(graph, 4, seed=0)
    assert sorted(np.bincount(labels).tolist()) == [10, 10, 10, 10]


def test_item_index_file_errors_name_the_file(tmp_path):
    bad = tmp_path / "items.json"
    bad.write_text('{"format": "pod-items", "version": 1, "mode": "token", "tokens": ["<a>"], "codes": {"1": [4]}}')
    with pytest.raises(ValueError, match="items.json"):
        ItemIndex.load(bad)
