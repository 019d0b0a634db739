"""`pod evaluate` end to end: the trained tiny model beats popularity; every task's path runs."""

from __future__ import annotations

import json

from cli.main import main
from training.evaluate import evaluate


def test_trained_tiny_model_clearly_beats_popularity(trained_sequential, default_synth):
    report = evaluate(trained_sequential, default_synth, task="sequential", limit=300, progress=False)
    res = report["results"]["sequential"]
    pod, pop = res["POD"], res["popularity"]
    assert pod["HR@10"] >= 2 * pop["HR@10"] and pod["HR@10"] - pop["HR@10"] >= 0.05, res
    assert pod["NDCG@10"] > 2 * pop["NDCG@10"], res
    assert "next-ids rule" in res  # the leak rule is always printed beside kept ids


def test_every_task_evaluates_and_writes_json_and_markdown(trained_sequential, default_synth, tmp_path, capsys):
    out = tmp_path / "eval.json"
    code = main(
        [
            "evaluate",
            "--checkpoint",
            str(trained_sequential),
            "--data",
            str(default_synth),
            "--limit",
            "6",
            "--beams",
            "6",
            "--out",
            str(out),
            "--no-progress",
            "--inference-prompt",
            "continuous+discrete",
        ]
    )
    assert code == 0
    report = json.loads(out.read_text())
    assert set(report["results"]) == {"sequential", "topn", "explanation"}
    topn = report["results"]["topn"]
    assert report["item_ids"] == "token"  # the default: one decoder step ranks every candidate exactly, so the
    assert {"POD", "popularity"} <= set(topn) and "POD (exact scoring)" not in set(topn)  # second pass is skipped
    expl = report["results"]["explanation"]
    assert {"BLEU-4", "ROUGE-1", "ROUGE-2", "ROUGE-L"} == set(expl["POD"]) == set(expl["retrieval"])
    assert set(expl["one typical sentence"]) == set(expl["POD"]) and 0 < expl["distinct"] <= 1
    train = {r["explanation"] for r in json.loads((default_synth / "explanations.json").read_text())["train"]}
    assert expl["typical_sentence"] in train  # one real training sentence, the same for every record
    md = out.with_suffix(".md").read_text()
    assert "| popularity |" in md and "| retrieval |" in md and "| one typical sentence |" in md
    assert "## sequential" in capsys.readouterr().out


def test_metrics_follow_the_paper_definitions():
    from pod.metrics import ranking_metrics, text_metrics

    m = ranking_metrics([[5, 3, 9], [1, 2, 3], [7]], [3, 8, 7])
    assert m["HR@1"] == 1 / 3 and m["HR@5"] == 2 / 3
    assert abs(m["NDCG@5"] - (1 / 1.5849625007211563 + 1.0) / 3) < 1e-9
    t = text_metrics(["the sound is warm"], ["the sound is warm"])
    assert round(t["BLEU-4"]) == 100 and round(t["ROUGE-L"]) == 100
    t = text_metrics(["a b c d e"], ["x y z w v"])
    assert t["BLEU-4"] == 0 and t["ROUGE-1"] == 0


def test_two_batches_in_flight_give_the_lists_of_one_at_a_time(trained_sequential, default_synth):
    """`run_batched` with two worker threads (its default on a GPU) returns every job's result in the jobs' order,
    the same as running the batches one by one."""
    from pod.dataset import PreparedData
    from pod.recommender import SequentialJob, TopNJob
    from training.evaluate import load_recommender, run_batched

    data = PreparedData.load(default_synth)
    rec = load_recommender(trained_sequential, data, "cpu")
    users = data.users[::25]
    seq = [SequentialJob(u, data.history_before(u, "test"), 10) for u in users]
    top = [TopNJob(u, data.candidates(u, "test")[0], 10, "beam", data.history_before(u, "test")) for u in users]
    for task, jobs, fn in (("sequential", seq, rec.sequential), ("topn", top, rec.topn)):
        one = run_batched(rec, task, jobs, fn, 7, False, workers=1)
        two = run_batched(rec, task, jobs, fn, 7, False, workers=2)
        assert len(one) == len(jobs) and [r.items for r in one] == [r.items for r in two]
