"""Item indexes: one token per item, collaborative codes (deterministic, unique, leak-free), JSON round trips."""

from __future__ import annotations

import numpy as np
import pytest

from pod.dataset import PreparedData
from pod.items import ItemIndex, cooccurrence, spectral_split


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
        ItemIndex("semantic")


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


def test_spectral_split_of_a_graph_without_edges_falls_back_to_equal_parts():
    graph = cooccurrence([], list(range(1, 41)), 3)
    labels = spectral_split(graph, 4, seed=0)
    assert sorted(np.bincount(labels).tolist()) == [10, 10, 10, 10]


def test_item_index_file_errors_name_the_file(tmp_path):
    bad = tmp_path / "items.json"
    bad.write_text('{"format": "pod-items", "version": 1, "mode": "token", "tokens": ["<a>"], "codes": {"1": [4]}}')
    with pytest.raises(ValueError, match="items.json"):
        ItemIndex.load(bad)
