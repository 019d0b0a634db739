"""Training behaviour: loss falls, resume equals an uninterrupted run, DDP with 2 processes, CLI errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from cli.main import main
from pod.dataset import PreparedData
from pod.model import load_checkpoint
from tests.conftest import ROOT
from training.samples import validation_samples
from training.train import UNCONDITIONAL_NATS, TrainConfig, train, unconditional_warning, validate

FAST = dict(batch_size=16, eval_batch_size=64, val_limit=48, log_every=1, progress=False, lr=2e-3)


def test_loss_falls_on_synthetic_data(small_synth, tmp_path):
    cfg = TrainConfig(
        data=str(small_synth),
        out=str(tmp_path / "run"),
        tasks=["explanation", "sequential"],
        epochs=3,
        select_by="loss",  # best/ = the lowest validation loss (the default, auto, picks by HR@10 for token ids)
        **FAST,
    )
    summary = train(cfg)
    epochs = [
        json.loads(x)
        for x in (tmp_path / "run" / "log.jsonl").read_text().splitlines()
        if '"epoch", "epoch"' in x or json.loads(x)["event"] == "epoch"
    ]
    val = [e["val_loss"]["total"] for e in epochs]
    assert len(val) == 3 and min(val) < val[0] * 0.85
    assert summary["best_val"] == min(val)
    run = tmp_path / "run"
    assert (run / "best" / "model.safetensors").is_file() and (run / "loss.png").stat().st_size > 1000
    best_cfg = json.loads((run / "best" / "config.json").read_text())
    assert best_cfg["data_manifest"]["counts"]["users"] == 200  # a copy of the data manifest


def test_resume_matches_uninterrupted_run(small_synth, tmp_path):
    common = dict(
        data=str(small_synth),
        epochs=2,
        tasks=["explanation", "sequential", "topn"],
        seed=7,
        warmup_steps=5,
        schedule="linear",
        **FAST,
    )
    common["val_limit"] = 16
    full = tmp_path / "full"
    train(TrainConfig(out=str(full), **common))
    part = tmp_path / "part"
    train(TrainConfig(out=str(part), max_steps=7, **common))  # stops inside the first epoch
    progress = json.loads((part / "last" / "training_state.json").read_text())["progress"]
    assert progress["global_step"] == 7 and progress["epoch"] == 0
    # a kill between the checkpoint swap's two renames leaves only `.last.old`: resume falls back to it
    (part / "last").rename(part / ".last.old")
    train(TrainConfig(out=str(part), **common), resume=True)
    a = load_file(str(full / "last" / "model.safetensors"))
    b = load_file(str(part / "last" / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert (a[k] == b[k]).all(), k


def test_ddp_two_processes_gloo(small_synth, tmp_path):
    out = tmp_path / "ddp"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        "--master_port=29533",
        "-m",
        "cli.main",
        "train",
        "--data",
        str(small_synth),
        "--out",
        str(out),
        "--tasks",
        "sequential",
        "--sequential-samples",
        "one",
        "--epochs",
        "1",
        "--batch-size",
        "16",
        "--val-limit",
        "32",
        "--no-progress",
        "--device",
        "cpu",
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    steps = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    assert (out / "best" / "model.safetensors").is_file()
    # each of the 2 ranks takes half the 200 users -> 100 / 16 = 7 steps per epoch
    assert json.loads((out / "last" / "training_state.json").read_text())["progress"]["global_step"] == 7
    assert steps[-1]["event"] == "epoch"


def test_cli_reports_bad_input_without_traceback(tmp_path, capsys):
    bad = tmp_path / "raw"
    bad.mkdir()
    (bad / "sequential.txt").write_text("1 2 3\n2 x 4\n")
    (bad / "datamaps.json").write_text(
        json.dumps({"id2user": {"1": "a", "2": "b"}, "id2item": {"2": "x", "3": "y", "4": "z"}})
    )
    assert main(["data", "prepare", "--format", "pod", str(bad), "--out", str(tmp_path / "p")]) == 2
    err = capsys.readouterr().err
    assert "sequential.txt:2" in err and "Traceback" not in err
    assert not (tmp_path / "p").exists()
    assert main(["train", "--data", str(tmp_path / "nothing"), "--out", str(tmp_path / "r")]) == 2
    assert "manifest.json" in capsys.readouterr().err


@pytest.mark.parametrize("strategy", ["alternated", "mixed"])
def test_batches_hold_one_task_when_alternated(small_synth, strategy):
    import random

    from pod.dataset import PreparedData
    from training.samples import epoch_samples, make_batches

    data = PreparedData.load(small_synth)
    samples = epoch_samples(data, data.tasks, random.Random(0))
    batches = make_batches(samples, 32, strategy, random.Random(0))
    assert sum(len(b) for b in batches) == sum(len(v) for v in samples.values())
    kinds = [{s.task for s in b} for b in batches]
    if strategy == "alternated":
        assert all(len(k) == 1 for k in kinds)
        assert [k.pop() for k in kinds[:3]] == ["explanation", "sequential", "topn"]
    else:
        assert any(len(k) > 1 for k in kinds)


def test_cli_entry_point_runs(tmp_path):
    out = Path(tmp_path) / "s"
    assert main(["data", "synth", "--out", str(out), "--users", "150", "--items", "120"]) == 0
    assert (out / "manifest.json").is_file()


def _parse(text: str) -> tuple[int, list[int]]:
    from pod.ids import ID_PATTERN

    found = ID_PATTERN.findall(text)
    return next(int(n) for kind, n in found if kind == "user"), [int(n) for kind, n in found if kind == "item"]


def test_sequential_all_holds_every_prefix(small_synth):
    import random
    from collections import Counter

    from pod.dataset import MAX_HISTORY, PreparedData
    from training.samples import epoch_samples

    data = PreparedData.load(small_synth)
    samples = epoch_samples(data, ["sequential"], random.Random(0), sequential="all")["sequential"]
    assert len(samples) == sum(len(data.train_items(u)) - 1 for u in data.users)
    assert Counter(s.item for s in samples) == Counter(i for u in data.users for i in data.train_items(u)[1:])
    for s in samples:
        user, history = _parse(s.source)
        items = data.train_items(user)
        t = items.index(s.item)
        assert history == items[max(0, t - MAX_HISTORY) : t] and s.target == ""
    one = epoch_samples(data, ["sequential"], random.Random(0))["sequential"]
    assert len(one) == len(data.users)


def test_topn_all_gives_every_training_item_fresh_negatives(small_synth):
    import random

    from pod.dataset import PreparedData
    from training.samples import epoch_samples

    data = PreparedData.load(small_synth)
    samples = epoch_samples(data, ["topn"], random.Random(0), topn="all")["topn"]
    assert len(samples) == sum(len(data.train_items(u)) for u in data.users)
    negatives = set()
    for s in samples:
        user, cands = _parse(s.source)
        assert len(cands) == len(set(cands)) == 100 and s.item in cands
        assert not (set(cands) - {s.item}) & set(data.sequences[user])
        negatives.add(frozenset(cands) - {s.item})
    assert len(negatives) == len(samples)  # drawn afresh for each positive


def test_short_run_in_token_mode_selects_by_hit_rate(tmp_path):
    from training.data.synth import write_synthetic

    data = tmp_path / "shop"
    write_synthetic(data, users=200, items=120, seed=3, item_ids="token")  # the manifest's default mode
    cfg = TrainConfig(
        data=str(data),
        out=str(tmp_path / "run"),
        tasks=["sequential"],
        sequential_samples="all",
        select_by="hr10",
        epochs=2,
        **{**FAST, "batch_size": 32, "log_every": 10},
    )
    summary = train(cfg)
    run = tmp_path / "run"
    epochs = [json.loads(x) for x in (run / "log.jsonl").read_text().splitlines() if '"event": "epoch"' in x]
    hr = [e["val_ranking"]["sequential_hr10"] for e in epochs]
    assert len(hr) == 2 and all(0 <= h <= 1 for h in hr)
    assert all(0 <= e["val_ranking"]["sequential_ndcg10"] <= h for e, h in zip(epochs, hr))
    assert summary["best_val"] == max(hr)
    best = json.loads((run / "best" / "config.json").read_text())
    assert best["item_ids"] == "token" and best["train_config"]["item_ids"] == "token"
    assert (run / "best" / "items.json").is_file() and (run / "last" / "items.json").is_file()
    # 48 validation users, 2 epochs of every prefix (~1,100 samples each)
    assert json.loads((run / "last" / "training_state.json").read_text())["progress"]["global_step"] > 60


def test_collaborative_run_trains_and_resumes(small_synth, tmp_path):
    common = dict(
        data=str(small_synth), tasks=["sequential"], item_ids="collaborative", epochs=1, **{**FAST, "val_limit": 16}
    )
    train(TrainConfig(out=str(tmp_path / "run"), max_steps=3, **common))
    summary = train(TrainConfig(out=str(tmp_path / "run"), **common), resume=True)
    assert summary["epoch"] == 1
    best = json.loads((tmp_path / "run" / "best" / "config.json").read_text())
    assert best["item_ids"] == "collaborative" and (tmp_path / "run" / "best" / "items.json").is_file()


def test_hit_rate_selection_needs_token_ids(small_synth, tmp_path):
    with pytest.raises(ValueError, match="--select-by hr10 needs"):
        train(TrainConfig(data=str(small_synth), out=str(tmp_path / "r"), select_by="hr10", item_ids="digits", **FAST))


def test_worker_processes_tokenize_the_same_batches(small_synth, tmp_path):
    """`--loader-workers` (the GPU default) only moves tokenizing into other processes: same batches, same losses."""
    from training.train import TrainConfig, train

    losses = {}
    for workers in (0, 2):
        out = tmp_path / f"w{workers}"
        cfg = TrainConfig(
            data=str(small_synth),
            out=str(out),
            tasks=["sequential", "topn"],
            max_steps=6,
            log_every=1,
            batch_size=8,
            val_limit=10,
            loader_workers=workers,
            progress=False,
        )
        train(cfg)
        steps = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
        losses[workers] = [(r["task"], round(r["loss"], 5)) for r in steps if r["event"] == "step"]
    assert len(losses[0]) == 6 and losses[0] == losses[2]


def test_training_precision_is_fp32_unless_bf16_is_asked_for():
    """bf16 autocast diverged on CUDA (RESULTS.md): `auto` must mean fp32 on a GPU as on the CPU."""
    import torch

    from training.train import autocast

    for device in ("cpu", "cuda"):
        assert not autocast(TrainConfig(data="d", out="o"), torch.device(device))._enabled
    # (on a machine without CUDA torch turns a CUDA autocast off by itself, so the opt-in is checked on the CPU)
    assert autocast(TrainConfig(data="d", out="o", precision="bf16"), torch.device("cpu"))._enabled


def test_a_decaying_schedule_ends_with_the_time_box_when_that_comes_first():
    from training.train import TrainConfig, lr_lambda

    clock = {"s": 0.0}
    boxed = TrainConfig(data="d", out="o", schedule="linear", max_minutes=10, warmup_steps=0)
    factor = lr_lambda(boxed, total_steps=100_000, elapsed_s=lambda: clock["s"])
    assert factor(10) == pytest.approx(1.0 - 10 / 100_000)  # early: the step horizon
    clock["s"] = 300.0
    assert factor(10) == pytest.approx(0.5)  # half the box gone: half the decay
    clock["s"] = 900.0
    assert factor(10) == 0.0
    cosine = lr_lambda(TrainConfig(data="d", out="o", schedule="cosine", max_minutes=10), 100_000, lambda: 300.0)
    assert cosine(10) == pytest.approx(0.5, abs=1e-3)
    steps_only = lr_lambda(TrainConfig(data="d", out="o", schedule="linear"), 1000, lambda: 1e9)
    assert steps_only(500) == pytest.approx(0.5)  # no time box: time does not count
    constant = lr_lambda(TrainConfig(data="d", out="o", max_minutes=1), 1000, lambda: 1e9)
    assert constant(500) == 1.0


def test_a_time_boxed_decaying_run_trains_and_logs_a_falling_lr(small_synth, tmp_path):
    """The whole run, not just the factor: the scheduler asks for a factor when it is built, before the
    training loop, and that once crashed every `--schedule linear --max-minutes` run at start-up."""
    out = tmp_path / "run"
    cfg = TrainConfig(
        data=str(small_synth), out=str(out), epochs=1, max_steps=6, max_minutes=10, schedule="linear", **FAST
    )
    summary = train(cfg)
    assert summary["global_step"] == 6
    lrs = [json.loads(line)["lr"] for line in (out / "log.jsonl").read_text().splitlines() if '"lr"' in line]
    assert lrs and all(b <= a for a, b in zip(lrs, lrs[1:])) and lrs[-1] < 2e-3


def test_validation_measures_how_much_explanations_read_their_input(small_synth, tmp_path):
    """`explanation_input_gain`: the loss with another record's encoder states minus the loss with its own. A
    decoder cut off from the encoder (cross-attention outputs zeroed) gains exactly nothing, and only then
    does the run's closing warning fire."""
    run = tmp_path / "run"
    cfg = TrainConfig(data=str(small_synth), out=str(run), tasks=["explanation", "sequential"], epochs=1, **FAST)
    train(cfg)
    log = [json.loads(x) for x in (run / "log.jsonl").read_text().splitlines()]
    logged = [e["val_ranking"]["explanation_input_gain"] for e in log if e.get("event") == "epoch"]
    assert len(logged) == 1

    model, tokenizer, _ = load_checkpoint(run / "best")
    val = validation_samples(PreparedData.load(small_synth), ["explanation"])
    val["explanation"] = val["explanation"][:48]
    _, ranking = validate(model, val, tokenizer, cfg, torch.device("cpu"), 0, 1)
    gain = ranking["explanation_input_gain"]
    assert abs(gain) > 1e-4  # a model that reads its input scores another record's targets differently
    assert (unconditional_warning(ranking) is None) == (gain >= UNCONDITIONAL_NATS)

    with torch.no_grad():
        for block in model.t5.decoder.block:
            block.layer[1].EncDecAttention.o.weight.zero_()
    _, ranking = validate(model, val, tokenizer, cfg, torch.device("cpu"), 0, 1)
    assert abs(ranking["explanation_input_gain"]) < 1e-5
    assert "do not depend on the user and item" in unconditional_warning(ranking)


def test_explanation_first_trains_explanations_alone_then_both(small_synth, tmp_path):
    """`explanation_first=N`: the first N epochs hold explanation batches only; they are neither best/ nor
    counted by patience, so a two-task run cannot stop (or select) before it has trained both tasks."""
    run = tmp_path / "run"
    cfg = TrainConfig(
        data=str(small_synth),
        out=str(run),
        tasks=["explanation", "sequential"],
        epochs=3,
        explanation_first=2,
        patience=1,
        select_by="loss",
        **FAST,
    )
    train(cfg)
    epochs = [e for e in map(json.loads, (run / "log.jsonl").read_text().splitlines()) if e.get("event") == "epoch"]
    assert [sorted(e["train_loss"]) for e in epochs] == [["explanation"]] * 2 + [["explanation", "sequential"]]
    assert [e["best"] for e in epochs] == [False, False, True]
    assert json.loads((run / "best" / "config.json").read_text())["epoch"] == 3


def test_resume_refuses_a_saved_setting_this_code_does_not_know(small_synth, tmp_path):
    run = tmp_path / "run"
    cfg = TrainConfig(data=str(small_synth), out=str(run), tasks=["sequential"], max_steps=2, **FAST)
    train(cfg)
    state_file = run / "last" / "training_state.json"
    state = json.loads(state_file.read_text())
    state["progress"]["config"]["split_outputs"] = False
    state_file.write_text(json.dumps(state))
    with pytest.raises(ValueError, match=r"training_state\.json: unknown TrainConfig field\(s\) split_outputs"):
        train(cfg, resume=True)
