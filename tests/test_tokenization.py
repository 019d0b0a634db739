from __future__ import annotations

import random

from pod import templates
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
