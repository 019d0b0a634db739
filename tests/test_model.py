"""The model definition and checkpoints: prompts and whole-word embeddings, safe round trips, local backbones."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import T5Config, T5ForConditionalGeneration

from pod.items import ItemIndex
from pod.model import PODModel, build_model, load_checkpoint, save_checkpoint
from pod.tokenization import Tokenizer


@pytest.fixture()
def tiny(t5_spiece):
    torch.manual_seed(0)
    tok = Tokenizer(t5_spiece)
    model = build_model(tok, "tiny", num_prompts=3)
    return model.eval(), tok


def _batch(tok: Tokenizer, texts: list[str]):
    enc = [tok.encode_input(t) for t in texts]
    n = max(len(i) for i, _ in enc)
    ids = torch.tensor([i + [0] * (n - len(i)) for i, _ in enc])
    ww = torch.tensor([w + [0] * (n - len(w)) for _, w in enc])
    mask = (torch.arange(n)[None] < torch.tensor([len(i) for i, _ in enc])[:, None]).long()
    return ids, ww, mask


def test_prompts_are_prepended_per_task(tiny):
    model, tok = tiny
    ids, ww, mask = _batch(tok, ["user_1 item_2 item_3", "user_4 item_5"])
    task = torch.tensor([1, 2])
    embeds, full_mask = model.embed(task, ids, ww, mask)
    assert embeds.shape == (2, 3 + ids.shape[1], 128)
    assert torch.equal(full_mask[:, :3], torch.ones(2, 3, dtype=mask.dtype))
    assert torch.equal(embeds[0, :3], model.prompts[1]) and torch.equal(embeds[1, :3], model.prompts[2])
    assert model.prompts.abs().max() <= 0.1  # uniform(-0.1, 0.1) initialisation
    token_part = model.t5.get_input_embeddings()(ids) + model.whole_word(ww)
    assert torch.allclose(embeds[:, 3:], token_part)


def test_checkpoint_round_trip_gives_same_logits(tiny, tmp_path):
    model, tok = tiny
    ids, ww, mask = _batch(tok, ["user_1 item_2 item_3", "explain why user_4 likes item_5"])
    dec = torch.tensor([[0, 37, 5], [0, 8, 9]])
    task = torch.tensor([1, 0])
    before = model.logits(task, ids, ww, mask, dec)
    save_checkpoint(model, tok, tmp_path / "ckpt", {"note": "x"})
    names = sorted(p.name for p in (tmp_path / "ckpt").iterdir())
    assert names == ["config.json", "model.safetensors", "spiece.model"]
    loaded, tok2, meta = load_checkpoint(tmp_path / "ckpt")
    assert meta["note"] == "x" and meta["pod"]["num_prompts"] == 3
    after = loaded.eval().logits(task, ids, ww, mask, dec)
    assert torch.equal(before, after)
    # tied output projection survives the round trip
    assert loaded.t5.lm_head.weight.data_ptr() == loaded.t5.shared.weight.data_ptr()


def test_loading_rejects_a_foreign_directory(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(ValueError, match="not a POD checkpoint"):
        load_checkpoint(tmp_path)
    with pytest.raises(FileNotFoundError):
        load_checkpoint(tmp_path / "missing")


def test_local_pretrained_backbone_is_loaded(t5_spiece, tmp_path):
    torch.manual_seed(1)
    cfg = T5Config(
        vocab_size=32100,
        d_model=64,
        d_ff=128,
        num_layers=1,
        num_decoder_layers=1,
        num_heads=2,
        d_kv=32,
        decoder_start_token_id=0,
    )
    backbone = T5ForConditionalGeneration(cfg)
    backbone.save_pretrained(tmp_path / "t5", safe_serialization=True)
    (tmp_path / "t5" / "spiece.model").write_bytes(t5_spiece.read_bytes())
    tok = Tokenizer(tmp_path / "t5" / "spiece.model")
    model = build_model(tok, backbone=tmp_path / "t5")
    assert isinstance(model, PODModel)
    assert torch.equal(model.t5.shared.weight, backbone.shared.weight)
    assert model.config.t5["d_model"] == 64


def test_checkpoint_carries_the_item_index(t5_spiece, tmp_path):
    torch.manual_seed(0)
    tok = Tokenizer(t5_spiece, items=ItemIndex.token(range(1, 51)))
    model = build_model(tok, "tiny").eval()
    assert model.t5.config.vocab_size == tok.vocab_size == 32150
    ids, ww, mask = _batch(tok, ["user_1 item_2 item_3"])
    dec = torch.tensor([[0, tok.item_target(7)[0]]])
    before = model.logits(torch.tensor([1]), ids, ww, mask, dec)
    save_checkpoint(model, tok, tmp_path / "ckpt")
    assert (tmp_path / "ckpt" / "items.json").is_file()
    loaded, tok2, meta = load_checkpoint(tmp_path / "ckpt")
    assert meta["item_ids"] == "token" and tok2.item_mode == "token" and tok2.vocab_size == 32150
    assert tok2.item_target(7) == tok.item_target(7)
    assert torch.equal(before, loaded.eval().logits(torch.tensor([1]), ids, ww, mask, dec))
    # a checkpoint whose items.json asks for more rows than the model has is refused
    (tmp_path / "ckpt" / "items.json").write_text(json.dumps(ItemIndex.token(range(1, 99)).to_json()))
    with pytest.raises(ValueError, match="embedding rows"):
        load_checkpoint(tmp_path / "ckpt")


def test_pretrained_backbone_grows_rows_for_item_tokens(t5_spiece, tmp_path):
    cfg = T5Config(vocab_size=32100, d_model=32, d_ff=64, num_layers=1, num_decoder_layers=1, num_heads=2, d_kv=16)
    T5ForConditionalGeneration(cfg).save_pretrained(tmp_path / "t5", safe_serialization=True)
    (tmp_path / "t5" / "spiece.model").write_bytes(t5_spiece.read_bytes())
    tok = Tokenizer(tmp_path / "t5" / "spiece.model", items=ItemIndex.token(range(1, 11)))
    model = build_model(tok, backbone=tmp_path / "t5")
    assert model.t5.get_input_embeddings().weight.shape[0] == 32110 == model.config.t5["vocab_size"]


def test_a_config_field_this_code_does_not_know_is_refused_by_name(tiny, tmp_path):
    """A checkpoint from another version of POD (a field added or removed since) is refused with the file and the
    field's name, not a bare TypeError from the dataclass."""
    model, tok = tiny
    save_checkpoint(model, tok, tmp_path / "ckpt")
    config = tmp_path / "ckpt" / "config.json"
    meta = json.loads(config.read_text())
    meta["pod"]["split_outputs_from"] = None
    config.write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=r"config\.json: unknown PODConfig field\(s\) split_outputs_from"):
        load_checkpoint(tmp_path / "ckpt")
