"""Explanation decoding settings reach the served model: the n-gram ban (`POD_NO_REPEAT_NGRAM`) and the search.

The ban itself is checked against Hugging Face's `no_repeat_ngram_size` in tests/test_decoding.py and on the
device shortlist in tests/test_device_search.py; here it runs end to end on the ONNX bundle the server loads.
"""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from pod.dataset import PreparedData
from pod.decoding import beam_search
from pod.recommender import ExplainJob
from pod.tokenization import EOS_ID
from service.loading import load_recommender
from service.settings import ServeSettings


def _repeated_word(text: str) -> bool:
    words = text.split()
    return len(set(words)) < len(words)


def test_the_ban_reaches_the_served_model_and_no_word_comes_twice(exported_bundle, default_synth):
    data = PreparedData.load(default_synth)
    jobs = [ExplainJob(r["user"], r["item"], 20) for r in data.explanations["test"][:24]]
    plain, _ = load_recommender(ServeSettings(bundle=str(exported_bundle), threads=1, warmup=False))
    assert plain.config.no_repeat_ngram == 0  # the paper's decoding unless asked
    settings = ServeSettings(
        bundle=str(exported_bundle),
        threads=1,
        warmup=False,
        no_repeat_ngram=1,
        explanation_beams=4,
        explanation_groups=1,
    )
    banned, _ = load_recommender(settings)
    assert (banned.config.no_repeat_ngram, banned.config.explanation_beams) == (1, 4)
    assert all(e.text and not _repeated_word(e.text) for e in banned.explain(jobs))  # no piece twice: no word twice

    # The trained shop's short sentences rarely repeat a word; forced to 16 pieces on the ONNX session, they do,
    # and the same search with the ban does not.
    texts = [banned.job_text("explanation", j) for j in jobs]
    kw = dict(num_return=1, min_new_tokens=16)
    free = beam_search(banned.runtime.start("explanation", texts), len(jobs), 4, 16, EOS_ID, **kw)
    held = beam_search(banned.runtime.start("explanation", texts), len(jobs), 4, 16, EOS_ID, no_repeat_ngram=1, **kw)
    assert any(len(set(row[0].tokens)) < len(row[0].tokens) for row in free)
    assert all(len(set(row[0].tokens)) == len(row[0].tokens) for row in held)


def test_the_setting_comes_from_the_environment_and_refuses_a_negative_size(monkeypatch):
    monkeypatch.setenv("POD_NO_REPEAT_NGRAM", "3")
    assert ServeSettings().no_repeat_ngram == 3
    with pytest.raises(ValidationError, match="no_repeat_ngram"):
        ServeSettings(no_repeat_ngram=-1)
