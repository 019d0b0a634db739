"""A model answers only what it was taught: tasks left out of training are reported, not evaluated or served.

Every task keeps its prompt vectors in the checkpoint, but a task training left out has random ones; before
the checkpoint recorded what it was taught, `pod evaluate` printed popularity-level figures for it and the
server answered with them.
"""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from pod.model import load_checkpoint
from service.app import create_app
from service.settings import ServeSettings
from training.evaluate import evaluate
from training.train import TrainConfig, train


@pytest.fixture(scope="module")
def sequential_only(small_synth, tmp_path_factory):
    out = tmp_path_factory.mktemp("untaught") / "run"
    cfg = TrainConfig(data=str(small_synth), out=str(out), tasks=["sequential"], max_steps=30, progress=False)
    train(cfg)
    return out


def test_the_checkpoint_records_what_it_was_taught(sequential_only):
    model, _, _ = load_checkpoint(sequential_only)
    assert model.config.trained_tasks == ["sequential"]
    assert set(model.config.tasks) == {"explanation", "sequential", "topn"}  # prompts kept for every task


def test_evaluate_skips_untaught_tasks_and_refuses_to_evaluate_one_by_name(sequential_only, small_synth):
    report = evaluate(sequential_only, small_synth, limit=10, progress=False)
    assert report["not_trained"] == ["explanation"]
    assert set(report["results"]) == {"sequential", "topn"}  # top-N: ranked under the sequential prompt
    assert report["results"]["topn"]["prompt"] == "sequential"
    with pytest.raises(ValueError, match="not trained for explanation"):
        evaluate(sequential_only, small_synth, task="explanation", limit=10, progress=False)


def test_the_server_answers_404_for_an_untaught_task(sequential_only):
    settings = ServeSettings(runtime="torch", checkpoint=str(sequential_only), threads=1)
    with TestClient(create_app(settings)) as client:  # warm-up and start-up skip the untaught task
        r = client.post("/explain", json={"user_id": 5, "item_id": 3})
        assert r.status_code == 404 and "not trained for explanation" in r.json()["detail"][0]["msg"], r.text
        assert client.post("/recommend/sequential", json={"user_id": 5, "k": 3}).status_code == 200
        r = client.post("/recommend/topn", json={"user_id": 5, "candidates": [1, 2, 3, 4], "k": 2})
        assert r.status_code == 200 and len(r.json()["items"]) == 2
