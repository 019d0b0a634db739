"""Prepared-directory invariants: leave-one-out, negatives, explanation coverage, indexing modes, manifest."""

from __future__ import annotations

import json
import random

import pytest

from pod.dataset import PreparedData, PreparedDataError
from tests.conftest import shared_path
from training.data.prepare import draw_negatives, index_items, prepare, split_explanations
from training.data.raw import DataFormatError, RawData, RawExplanation
from training.data.readers import read_csv, read_pod
from training.data.synth import synthesize, write_synthetic


def _raw(n_users: int = 30, n_items: int = 150, integer: bool = True) -> RawData:
    rng = random.Random(1)
    seqs = {}
    for u in range(1, n_users + 1):
        seqs[str(u) if integer else f"u{u}"] = [
            str(i) if integer else f"i{i}" for i in rng.sample(range(1, n_items + 1), rng.randint(3, 9))
        ]
    expl = [RawExplanation(u, i, f"text {u} {i}", "f") for u, s in seqs.items() for i in s]
    return RawData(sequences=seqs, explanations=expl, integer_keys=integer)


def test_leave_one_out_and_negatives(tmp_path):
    prepare(_raw(), tmp_path / "p", source_format="test", seed=5)
    data = PreparedData.load(tmp_path / "p")
    for user in data.users:
        seq = data.sequences[user]
        hist, val = data.eval_example(user, "val")
        test_hist, test = data.eval_example(user, "test")
        assert val == seq[-2] and test == seq[-1]
        assert hist == seq[:-2][-20:] and test_hist == seq[:-1][-20:]
        assert data.train_items(user) == seq[:-2]
        neg = data.negatives[user]
        assert len(neg) == 99 and len(set(neg)) == 99 and not set(neg) & set(seq)
        cands, target = data.candidates(user, "test")
        assert target == test and sorted(cands) == sorted([test, *neg])
    # the same seed gives the same negatives; another seed does not
    again = draw_negatives(data.sequences, data.items, 99, seed=5)
    assert again == data.negatives
    assert draw_negatives(data.sequences, data.items, 99, seed=6) != data.negatives


def test_explanation_split_is_811_and_training_covers_every_user_and_item():
    raw = _raw(60, 150)
    records = [{"user": r.user, "item": r.item, "explanation": r.explanation} for r in raw.explanations]
    split = split_explanations(records, seed=0)
    n = len(records)
    assert sum(len(v) for v in split.values()) == n
    assert abs(len(split["train"]) - 0.8 * n) <= 1
    assert abs(len(split["val"]) - len(split["test"])) <= 1
    train_users = {r["user"] for r in split["train"]}
    train_items = {r["item"] for r in split["train"]}
    for part in ("val", "test"):
        assert all(r["user"] in train_users and r["item"] in train_items for r in split[part])


def test_item_indexing_modes():
    raw = _raw(integer=True)
    keep = index_items(raw, "keep", 0)
    assert all(int(k) == v for k, v in keep.items())
    seq = index_items(raw, "sequential", 0)
    first = [k for s in raw.sequences.values() for k in s]
    order = list(dict.fromkeys(first))
    assert [seq[k] for k in order] == list(range(1, len(order) + 1))  # numbered by first appearance
    rnd = index_items(raw, "random", 0)
    assert sorted(rnd.values()) == list(range(1, len(order) + 1))
    assert rnd != seq and rnd == index_items(raw, "random", 0) and rnd != index_items(raw, "random", 1)
    with pytest.raises(DataFormatError, match="keep"):
        index_items(_raw(integer=False), "keep", 0)


def test_manifest_records_counts_seed_and_source_hashes(tmp_path):
    csv = tmp_path / "x.csv"
    csv.write_text(
        "user,item,timestamp\n" + "".join(f"u{u},i{(u * 7 + k) % 150},{k}\n" for u in range(20) for k in range(5))
    )
    raw = read_csv(csv)
    manifest = prepare(raw, tmp_path / "p", source_format="csv", item_index="random", seed=9, num_negatives=20)
    on_disk = json.loads((tmp_path / "p" / "manifest.json").read_text())
    assert on_disk == manifest
    assert manifest["format"] == "pod-prepared" and manifest["version"] == 1
    assert manifest["seed"] == 9 and manifest["item_index"] == "random"
    assert manifest["counts"]["users"] == 20 and manifest["counts"]["interactions"] == 100
    assert manifest["source"]["files"][0]["sha256"] and manifest["source"]["files"][0]["path"].endswith("x.csv")
    data = PreparedData.load(tmp_path / "p")
    assert data.id2user[1] == "u0"


def test_failed_prepare_leaves_previous_directory_intact(tmp_path, monkeypatch):
    out = tmp_path / "p"
    prepare(_raw(), out, source_format="test")
    before = (out / "sequences.txt").read_text()
    import training.data.prepare as prep

    def boom(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(prep, "draw_negatives", boom)
    with pytest.raises(RuntimeError):
        prepare(_raw(40), out, source_format="test")
    assert (out / "sequences.txt").read_text() == before
    assert [p.name for p in tmp_path.iterdir()] == ["p"]  # no temporary leftovers


def test_truncated_prepared_directory_is_reported(tmp_path):
    prepare(_raw(), tmp_path / "p", source_format="test")
    lines = (tmp_path / "p" / "sequences.txt").read_text().splitlines()
    (tmp_path / "p" / "sequences.txt").write_text("\n".join(lines[:-3]) + "\n")
    with pytest.raises(PreparedDataError, match="sequences.txt"):
        PreparedData.load(tmp_path / "p")
    (tmp_path / "p" / "sequences.txt").write_text("1 2 x\n")
    with pytest.raises(PreparedDataError, match=r"sequences.txt:1"):
        PreparedData.load(tmp_path / "p")


def test_synthetic_shop_is_deterministic_and_structured(tmp_path):
    a, b = synthesize(users=300, items=120, seed=4), synthesize(users=300, items=120, seed=4)
    assert a.sequences == b.sequences and a.explanations == b.explanations
    assert synthesize(users=300, items=120, seed=5).sequences != a.sequences
    # structure: most consecutive purchases stay in the same department of 20 items
    pairs = [(int(x), int(y)) for s in a.sequences.values() for x, y in zip(s, s[1:])]
    same = sum((x - 1) // 20 == (y - 1) // 20 for x, y in pairs) / len(pairs)
    assert same > 0.8
    # explanations name the item's feature
    assert all(r.feature in r.explanation for r in a.explanations)
    write_synthetic(tmp_path / "s", users=300, items=120, seed=4)
    data = PreparedData.load(tmp_path / "s")
    assert data.tasks == ["explanation", "sequential", "topn"]
    assert data.manifest["counts"]["users"] == 300


def test_pod_format_beauty_keeps_the_paper_numbering(tmp_path):
    raw = read_pod(shared_path("data", "beauty"))
    manifest = prepare(raw, tmp_path / "beauty", source_format="pod", item_index="keep", seed=0)
    assert manifest["counts"] == {
        "users": 22363,
        "items": 12101,
        "interactions": 198502,
        "dropped_short_users": 0,
        "explanations": {"train": 0, "val": 0, "test": 0},
    }
    data = PreparedData.load(tmp_path / "beauty")
    assert data.sequences[2] == [6, 7, 8, 9, 10, 4, 11]
    assert data.id2user[1] == "A1YJEY40YUW4SE"
    assert data.tasks == ["sequential", "topn"]


def test_amazon_reviews_prepare_end_to_end(tmp_path):
    from training.data.readers import read_amazon_reviews

    raw = read_amazon_reviews(
        shared_path("data", "amazon_musical_instruments", "reviews_Musical_Instruments_5.json.gz")
    )
    manifest = prepare(raw, tmp_path / "mi", source_format="amazon-reviews", item_index="random", seed=0)
    counts = manifest["counts"]
    assert counts["users"] == 1429 and counts["items"] == 900
    e = counts["explanations"]
    total = e["train"] + e["val"] + e["test"]
    assert total > 5000 and abs(e["train"] / total - 0.8) < 0.02
