"""Causal-history models (`--sequential-samples causal`): one pass per user must train exactly what inference reads.

The speed-up rests on two invariants: a prefix's encoder states do not depend on the items after it, and
the decoder's rows in `next_item_states` equal the one-step decodes that serving runs on each prefix (the
exported graphs and the HF forward alike). If either broke, training would teach one model and serving
would query another.
"""

from __future__ import annotations

import random

import pytest
import torch

from pod.dataset import MAX_HISTORY, PreparedData
from pod.graphs import DecoderStepGraph, EncoderGraph
from pod.model import build_model, load_checkpoint
from training.samples import collate, sequential_prefixes, sequential_windows

ITEMS = [5, 17, 3, 40, 8, 61]


@pytest.fixture(scope="module")
def causal(small_synth, tmp_path_factory):
    from training.train import TrainConfig, check_config, tokenizer_for

    data = PreparedData.load(small_synth)
    cfg = check_config(TrainConfig(data=str(small_synth), out="unused", item_ids="token"), data)
    tok = tokenizer_for(cfg, data, tmp_path_factory.mktemp("tok"))
    torch.manual_seed(0)
    model = build_model(tok, "tiny", init_std=0.05, causal_items_from=tok.item_offset).eval()
    return model, tok


def _inputs(model, tok, items, template="user_7 {}"):
    ids, ww = tok.encode_input(template.format(" ".join(f"item_{i}" for i in items)))
    return dict(
        task_index=torch.tensor([model.config.task_index("sequential")]),
        input_ids=torch.tensor([ids]),
        whole_word_ids=torch.tensor([ww]),
        attention_mask=torch.ones(1, len(ids), dtype=torch.long),
    )


@torch.no_grad()
@pytest.mark.parametrize("template", ["user_7 {}", "here is what user_7 bought so far , in order : {} . next ?"])
def test_a_prefix_reads_nothing_after_it(causal, template):
    model, tok = causal
    full_hidden, full_visible = model.encode(**_inputs(model, tok, ITEMS, template))
    for k in range(1, len(ITEMS)):
        hidden, visible = model.encode(**_inputs(model, tok, ITEMS[:k], template))
        read = visible[0].bool()  # words before the items, and the k items (not the words after them)
        assert int(read.sum()) < hidden.shape[1]  # the closing words are out of what anything reads
        n = int(torch.nonzero(read).max()) + 1
        assert torch.equal(full_visible[0, :n].bool(), read[:n])
        assert torch.allclose(full_hidden[0, :n][read[:n]], hidden[0, :n][read[:n]], atol=1e-5)


@torch.no_grad()
def test_training_rows_are_the_one_step_decodes_serving_runs(causal):
    model, tok = causal
    states = model.next_item_states(**_inputs(model, tok, ITEMS), rows=len(ITEMS))
    cfg = model.t5.config
    empty = torch.zeros(cfg.num_decoder_layers, 2, 1, cfg.num_heads, 0, cfg.d_kv)
    first = tok.item_offset
    for k in range(1, len(ITEMS) + 1):
        cut = _inputs(model, tok, ITEMS[:k])
        kv, mask = EncoderGraph(model, "sequential")(cut["input_ids"], cut["whole_word_ids"], cut["attention_mask"])
        served, _ = DecoderStepGraph(model)(torch.zeros(1, dtype=torch.long), mask, kv, empty)
        assert torch.allclose(states[0, k - 1], served[0], atol=1e-5)
        hf = model.logits(**cut, decoder_input_ids=torch.zeros(1, 1, dtype=torch.long))[0, 0, first:]
        assert torch.allclose(states[0, k - 1] @ model.t5.lm_head.weight[first:].t(), hf, atol=1e-4)


@torch.no_grad()
def test_other_tasks_and_full_attention_models_read_the_whole_input(causal):
    model, tok = causal
    x = _inputs(model, tok, ITEMS)
    topn = {**x, "task_index": torch.tensor([model.config.task_index("topn")])}
    as_topn, mask = model.encode(**topn)
    assert bool(mask.all())
    plain = build_model(tok, "tiny")
    plain.load_state_dict(model.state_dict())
    plain.eval()
    assert torch.allclose(plain.encode(**topn)[0], as_topn, atol=1e-5)
    hidden, mask = plain.encode(**x)
    assert bool(mask.all()) and not torch.allclose(hidden, model.encode(**x)[0], atol=1e-4)
    with pytest.raises(ValueError, match="causal"):
        plain.next_item_states(**x, rows=2)


def test_windows_hold_every_prefix_target_once(small_synth):
    data = PreparedData.load(small_synth)
    users = data.users[:60]
    long_user = max(users, key=lambda u: len(data.train_items(u)))
    for user in users:
        items = data.train_items(user)
        windows = sequential_windows(data, user, random.Random(0))
        targets = sorted(i for w in windows for i in w.next_items)
        assert targets == sorted(s.item for s in sequential_prefixes(data, user, random.Random(0)))
        assert all(len(w.next_items) <= MAX_HISTORY for w in windows)
        assert windows[0].next_items[-1] == items[-1]
    assert len(data.train_items(long_user)) > 3


def test_collate_gives_next_item_tokens_and_the_loss_is_the_rows_mean(causal, small_synth):
    model, tok = causal
    data = PreparedData.load(small_synth)
    windows = [w for u in data.users[:4] for w in sequential_windows(data, u, random.Random(1))]
    batch = collate(windows, tok, {t: model.config.task_index(t) for t in model.config.tasks})
    assert "labels" not in batch and batch["next_items"].shape[0] == len(windows)
    assert int((batch["next_items"] >= 0).sum()) == sum(len(w.next_items) for w in windows)
    with torch.no_grad():
        loss = model(**batch)
        states = model.next_item_states(
            **{k: v for k, v in batch.items() if k != "next_items"}, rows=batch["next_items"].shape[1]
        )
    keep = batch["next_items"] >= 0
    logits = states[keep] @ model.t5.lm_head.weight[tok.item_offset :].t()
    expected = torch.nn.functional.cross_entropy(logits, batch["next_items"][keep] - tok.item_offset)
    assert torch.allclose(loss, expected, atol=1e-5)
    # label smoothing: (1 - e) of the target's NLL plus e of the mean NLL over the items
    e = 0.1
    with torch.no_grad():
        smoothed = model(**batch, label_smoothing=e)
    logp = logits.log_softmax(-1)
    target = logp.gather(1, (batch["next_items"][keep] - tok.item_offset)[:, None])[:, 0]
    assert torch.allclose(smoothed, -((1 - e) * target + e * logp.mean(-1)).mean(), atol=1e-5)


def test_label_smoothing_smooths_the_token_loss_too_and_rejects_nonsense(causal, small_synth):
    from training.train import TrainConfig, check_config

    model, tok = causal
    data = PreparedData.load(small_synth)
    ids, ww = tok.encode_input("user_7 item_3 item_9")
    x = dict(
        task_index=torch.tensor([model.config.task_index("explanation")]),
        input_ids=torch.tensor([ids]),
        whole_word_ids=torch.tensor([ww]),
        attention_mask=torch.ones(1, len(ids), dtype=torch.long),
    )
    labels = torch.tensor([[5, 9, 1, -100]])
    with torch.no_grad():
        plain, smoothed = model(**x, labels=labels), model(**x, labels=labels, label_smoothing=0.2)
        logits = model.logits(**x, decoder_input_ids=model.t5._shift_right(labels))
    manual = torch.nn.functional.cross_entropy(logits[0], labels[0], ignore_index=-100, label_smoothing=0.2)
    assert torch.allclose(smoothed, manual, atol=1e-5) and not torch.allclose(plain, smoothed)
    for bad in (-0.1, 1.0):
        cfg = TrainConfig(data=str(small_synth), out="unused", label_smoothing=bad)
        with pytest.raises(ValueError, match="--label-smoothing must be in"):
            check_config(cfg, data)


def test_causal_needs_token_ids(small_synth):
    from training.train import TrainConfig, check_config

    data = PreparedData.load(small_synth)
    cfg = TrainConfig(data=str(small_synth), out="unused", item_ids="digits", sequential_samples="causal")
    with pytest.raises(ValueError, match="causal needs --item-ids token"):
        check_config(cfg, data)


def test_causal_training_exports_with_parity_and_serves(small_synth, tmp_path):
    """Trained, checkpointed, exported (the export's own parity check runs the causal ONNX encoder against
    PyTorch) and served from the bundle: the causal mask travels in the checkpoint's config."""
    from export.export import export_bundle
    from pod.bundle import Bundle
    from pod.onnx_runtime import OnnxRuntime
    from pod.recommender import Catalog, Recommender, SequentialJob
    from training.train import TrainConfig, train

    run = tmp_path / "run"
    train(
        TrainConfig(
            data=str(small_synth),
            out=str(run),
            tasks=["sequential", "explanation"],
            item_ids="token",
            sequential_samples="causal",
            batch_size=16,
            lr=1e-3,
            max_steps=80,
            val_limit=50,
            progress=False,
        )
    )
    model, tok, meta = load_checkpoint(run)
    assert model.config.causal_items_from == tok.item_offset
    assert meta["train_config"]["sequential_samples"] == "causal"
    report = export_bundle(run, tmp_path / "bundle", data=small_synth, parity_users=8, log=lambda *_: None)
    assert report["sequential_differ_beyond_ties_fp32"] == 0
    bundle = Bundle.load(tmp_path / "bundle")
    data = PreparedData.load(small_synth)
    user = data.users[0]
    history = data.history_before(user, "test")
    (seq,) = Recommender(OnnxRuntime(bundle), Catalog.from_bundle(bundle)).sequential(
        [SequentialJob(user, history, 10)]
    )
    items = [i for i, _ in seq.items]
    assert len(items) == 10 == len(set(items)) and not set(items) & set(history)
