"""SASRec baseline (benchmarks/baselines/sasrec.py): it learns the synthetic shop in seconds and beats popularity
under the same protocol as POD's sequential task."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

from pod.dataset import PreparedData
from pod.metrics import ranking_metrics

ROOT = Path(__file__).resolve().parents[1]


def _sasrec():
    spec = importlib.util.spec_from_file_location("sasrec", ROOT / "benchmarks" / "baselines" / "sasrec.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["sasrec"] = module
    spec.loader.exec_module(module)
    return module


def _popularity(data: PreparedData) -> dict[str, float]:
    pop = data.item_popularity()
    order = sorted(pop, key=lambda i: (-pop[i], i))
    lists, targets = [], []
    for u in data.users:
        seen = set(data.sequences[u][:-1])
        lists.append([i for i in order if i not in seen][:10])
        targets.append(data.sequences[u][-1])
    return ranking_metrics(lists, targets)


def test_sasrec_trains_fast_and_beats_popularity(small_synth, tmp_path):
    sasrec = _sasrec()
    data = PreparedData.load(small_synth)
    cfg = sasrec.SASRecConfig(epochs=10, eval_every=5, minutes=1.0, dropout=0.2)
    report = sasrec.train_sasrec(data, cfg, log=lambda *_: None)
    test, pop = report["test"], _popularity(data)
    assert report["users"] == len(data.users) and report["best_epoch"] in (5, 10)
    assert test["HR@10"] >= 2 * pop["HR@10"] and test["NDCG@10"] > 2 * pop["NDCG@10"], (test, pop)
    assert set(test) == {"HR@1", "HR@5", "HR@10", "NDCG@5", "NDCG@10"}


def test_sasrec_ranks_all_items_except_the_history(small_synth):
    sasrec = _sasrec()
    data = PreparedData.load(small_synth)
    cfg = sasrec.SASRecConfig(epochs=1)
    model = sasrec.SASRec(max(data.items), cfg)
    users = data.users[:40]
    lists, targets = sasrec.rank(model, data, users, "test", cfg)
    for u, top, target in zip(users, lists, targets):
        assert target == data.sequences[u][-1]
        assert len(top) == len(set(top)) == 10
        assert not set(top) & set(data.sequences[u][:-1]) and 0 not in top
    _, val_targets = sasrec.rank(model, data, users, "val", cfg)
    assert val_targets == [data.sequences[u][-2] for u in users]


def test_sasrec_cli_writes_a_report(small_synth, tmp_path):
    sasrec = _sasrec()
    out = tmp_path / "sasrec.json"
    assert sasrec.main(["--data", str(small_synth), "--epochs", "2", "--eval-every", "1", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["method"] == "SASRec" and report["epochs"] == 2 and "test" in report
