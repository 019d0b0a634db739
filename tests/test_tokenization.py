from __future__ import annotations

import random

import pytest

from pod import templates
from pod.items import ItemIndex
from pod.tokenization import EOS_ID, Tokenizer, train_sentencepiece, whole_word_ids


def test_t5_vocabulary_splits_ids_as_the_paper(t5_spiece):
    tok = Tokenizer(t5_spiece)
    ids, ww = tok.encode_input("user_1234")
    assert tok.pieces("user_1234") == ["\u2581user", "_", "12", "34"]
    assert ids == [1139, 834, 2122, 3710, EOS_ID]
    assert ww == [1, 1, 1, 1, 0]


def test_whole_word_slots_follow_id_order_and_skip_words(t5_spiece):
    tok = Tokenizer(t5_spiece)
    text = "explain why user_12 would enjoy item_345 , not item_7."
    pieces = tok.pieces(text)
    ww = whole_word_ids(pieces)
    by_slot: dict[int, str] = {}
    for piece, slot in zip(pieces, ww):
        by_slot[slot] = by_slot.get(slot, "") + piece.replace("\u2581", "")
    assert by_slot[1] == "user_12"
    assert by_slot[2] == "item_345"
    assert by_slot[3] == "item_7"  # the full stop after it stays a word token
    assert set(ww) == {0, 1, 2, 3}


def test_whole_word_slots_are_capped_at_table_size():
    pieces = [p for n in range(1, 600) for p in ("\u2581item", "_", str(n))]
    assert max(whole_word_ids(pieces, size=512)) == 511


def test_own_vocabulary_splits_digits(tmp_path):
    corpus = [templates.fill("sequential", t, u, [u + 1, u + 2]) for u in range(1, 200) for t in range(3)]
    corpus += ["the sound is warm and works well"] * 20
    path = train_sentencepiece(corpus, tmp_path / "spiece.model", vocab_size=120)
    tok = Tokenizer(path)
    assert tok.pieces("user_1234")[-4:] == ["1", "2", "3", "4"]
    ids, ww = tok.encode_input("user_1234 item_56")
    assert ww[:-1] == [1] * (len(ids) - 1 - len(tok.pieces(" item_56"))) + [2] * len(tok.pieces(" item_56"))
    assert tok.decode(tok.encode_target("1234")) == "1234"


def test_templates_have_five_or_more_per_task_with_bare_form_first():
    rng = random.Random(0)
    for task, options in templates.TEMPLATES.items():
        assert len(options) >= 5
        bare = templates.fill(task, templates.BARE, 3, [5, 6] if task != "explanation" else [5])
        assert bare == ("user_3 item_5 item_6" if task != "explanation" else "user_3 item_5")
        drawn = {templates.draw(task, rng) for _ in range(500)}
        assert drawn == set(range(len(options)))  # every template, the bare one included, gets drawn
        for t in range(len(options)):
            text = templates.fill(task, t, 3, [5, 6])
            assert "user_3" in text and "item_5" in text


def _own_tokenizer(tmp_path, items=None) -> Tokenizer:
    corpus = [templates.fill("sequential", t, u, [u + 1, u + 2]) for u in range(1, 200) for t in range(3)]
    corpus += ["the sound is warm and works well"] * 20
    path = tmp_path / "spiece.model"
    if not path.exists():
        train_sentencepiece(corpus, path, vocab_size=120)
    return Tokenizer(path, items=items)


def test_token_items_are_one_token_with_their_whole_word_slot(tmp_path):
    digits = _own_tokenizer(tmp_path)
    tok = _own_tokenizer(tmp_path, ItemIndex.token(range(1, 301)))
    assert tok.item_mode == "token" and digits.item_mode == "digits"
    assert tok.item_offset == digits.vocab_size and tok.vocab_size == digits.vocab_size + 300
    text = "here is what user_12 bought so far , in order : item_17 item_250 . which item comes next ?"
    ids, ww = tok.encode_input(text)
    d_ids, d_ww = digits.encode_input(text)
    item_ids = [i for i in ids if i >= tok.item_offset]
    assert item_ids == [tok.item_offset + 16, tok.item_offset + 249]  # one token per item, in order
    assert [ww[ids.index(i)] for i in item_ids] == [2, 3]
    # the user ID and the words are tokenized exactly as in digits mode
    keep = [(i, w) for i, w in zip(d_ids, d_ww) if w not in (2, 3)]
    assert [(i, w) for i, w in zip(ids, ww) if i < tok.item_offset] == keep
    assert ids[-1] == EOS_ID and ww[-1] == 0
    assert tok.item_target(17) == [tok.item_offset + 16, EOS_ID]
    assert digits.item_target(17) == digits.encode_target("17")  # digits: the paper's target, unchanged
    assert "which item comes next" in tok.decode(ids)  # item tokens are skipped, not crashed on
    # an item the index does not know keeps its digit pieces in the input
    ids, ww = tok.encode_input("user_1 item_999")
    assert ids == digits.encode_input("user_1 item_999")[0]


def test_collaborative_items_share_their_slot(tmp_path, small_synth):
    from pod.dataset import PreparedData

    data = PreparedData.load(small_synth)
    index = ItemIndex.collaborative([data.train_items(u) for u in data.users], data.items, clusters=4, leaf_size=10)
    tok = _own_tokenizer(tmp_path, index)
    assert tok.vocab_size == tok.item_offset + index.num_tokens
    ids, ww = tok.encode_input("user_3 item_5 item_6")
    code5, code6 = (tok.item_target(i)[:-1] for i in (5, 6))
    assert len(code5) == len(index.codes[5]) >= 2
    n_user = len(tok.pieces("user_3"))
    assert ids == ids[:n_user] + code5 + code6 + [EOS_ID]
    assert ww == [1] * n_user + [2] * len(code5) + [3] * len(code6) + [0]


@pytest.mark.parametrize("mode", ["digits", "token", "collaborative"])
def test_tokenizer_save_and_load_keep_the_item_mode(tmp_path, small_synth, mode):
    from pod.dataset import PreparedData

    data = PreparedData.load(small_synth)
    index = {
        "digits": ItemIndex.digits(),
        "token": ItemIndex.token(data.items),
        "collaborative": ItemIndex.collaborative([data.train_items(u) for u in data.users], data.items),
    }[mode]
    tok = _own_tokenizer(tmp_path, index)
    tok.save(tmp_path / "saved")
    assert (tmp_path / "saved" / "items.json").exists() == (mode != "digits")
    back = Tokenizer.load(tmp_path / "saved", whole_word_size=64)
    assert back.item_mode == mode and back.vocab_size == tok.vocab_size and back.whole_word_size == 64
    assert all(back.item_target(i) == tok.item_target(i) for i in data.items)
    text = templates.fill("topn", 2, 4, data.items[:7])
    assert back.encode_input(text) == tok.encode_input(text)


def test_t5_vocabulary_puts_item_tokens_after_the_sentinels(t5_spiece):
    tok = Tokenizer(t5_spiece, items=ItemIndex.token([1, 2, 3]))
    assert tok.item_offset == 32100 and tok.vocab_size == 32103
    assert Tokenizer(t5_spiece).vocab_size == 32000  # digits: as before (the model adds the sentinels)
    assert tok.item_target(3) == [32102, EOS_ID]


@pytest.mark.parametrize("vocab", ["t5", "own"])
@pytest.mark.parametrize("mode", ["digits", "token"])
def test_word_cache_encodes_exactly_as_the_whole_text(tmp_path, t5_spiece, vocab, mode):
    """`encode_input` goes word by word through a cache; it must equal encoding the text at once, for every
    template of every task, punctuation glued to IDs, repeated words, and past the whole-word table's end.
    (Only below ~3,800 characters: beyond that, SentencePiece's whole-text segmentation with T5's vocabulary
    drifts by itself, e.g. `item_433` as 4|33 instead of 43|3; the word path is the consistent one.)"""
    items = ItemIndex.token(range(1, 400)) if mode == "token" else None
    tok = Tokenizer(t5_spiece, 64, items) if vocab == "t5" else _own_tokenizer(tmp_path, items)
    tok.whole_word_size = 64  # a small table, so the cap is reached within a short text
    rng = random.Random(0)
    texts = []
    for task, options in templates.TEMPLATES.items():
        for t in range(len(options)):
            for _ in range(6):
                user, picks = rng.randrange(1, 900), rng.sample(range(1, 500), rng.randrange(1, 30))
                texts.append(templates.fill(task, t, user, picks, picks[:5]))
    texts += ["item_12, item_7. (item_3)", "user_5 item_5item_6 item_5", " ".join(f"item_{n}" for n in range(300))]
    texts += ["tabs\tand  double  spaces item_4", "caf\u00e9 item_9", ""]
    for text in texts:
        assert tok.encode_input(text) == tok.encode_input_whole(text), text
        assert tok.encode_input(text) == tok.encode_input_whole(text), text  # again, from the cache
