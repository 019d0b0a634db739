"""Beam search: exact parity with Hugging Face `generate`, trie constraints (property test), group search."""

from __future__ import annotations

import hashlib
import inspect

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import T5Config, T5ForConditionalGeneration
from transformers.cache_utils import DynamicCache, EncoderDecoderCache

from pod.decoding import Trie, beam_search, log_softmax

EOS = 1
# transformers 5.2x renamed the decoder's `past_key_values` argument to `cache`; accept both releases
_FORWARD_ARGS = inspect.signature(T5ForConditionalGeneration.forward).parameters
_CACHE_ARG = "cache" if "cache" in _FORWARD_ARGS else "past_key_values"


class HFStep:
    """A plain T5 behind the decoder-step interface (what the PyTorch runtime does, minus the prompts)."""

    def __init__(self, model, input_ids, beams):
        self.model = model
        self.hidden = model.get_encoder()(input_ids=input_ids).last_hidden_state
        self.cache = EncoderDecoderCache(DynamicCache(), DynamicCache())

    @torch.no_grad()
    def step(self, tokens, parents):
        if parents is not None:
            self.cache.reorder_cache(torch.as_tensor(parents))
        per_request = len(tokens) // len(self.hidden)  # the search sends only live beams: any count per request
        out = self.model(
            encoder_outputs=(self.hidden.repeat_interleave(per_request, 0),),
            decoder_input_ids=torch.as_tensor(tokens)[:, None],
            use_cache=True,
            **{_CACHE_ARG: self.cache},
        )
        return out.logits[:, -1].numpy()


@pytest.fixture(scope="module")
def tiny_t5():
    torch.manual_seed(0)
    cfg = T5Config(
        vocab_size=64,
        d_model=32,
        d_ff=64,
        num_layers=2,
        num_decoder_layers=2,
        num_heads=2,
        d_kv=16,
        decoder_start_token_id=0,
        eos_token_id=EOS,
        pad_token_id=0,
        tie_word_embeddings=False,
    )
    model = T5ForConditionalGeneration(cfg).eval()
    with torch.no_grad():  # make EOS likely so hypotheses finish at different lengths
        ids = torch.randint(2, 64, (8, 9))
        dec = torch.randint(2, 64, (8, 5))
        h = model(input_ids=ids, decoder_input_ids=dec, output_hidden_states=True).decoder_hidden_states[-1]
        h = h * (model.config.d_model**-0.5) if model.config.tie_word_embeddings else h
        mean = h.reshape(-1, h.shape[-1]).mean(0)
        logits = model.lm_head(h).reshape(-1, 64)
        model.lm_head.weight[EOS] = mean / mean.norm() ** 2 * (logits.max(-1).values.mean() - 0.3)
    return model


@pytest.mark.parametrize(
    "beams,length_penalty,no_repeat", [(4, 1.0, 0), (6, 1.0, 0), (5, 0.0, 0), (4, 1.0, 1), (6, 1.0, 2)]
)
def test_unconstrained_matches_hugging_face_generate(tiny_t5, beams, length_penalty, no_repeat):
    torch.manual_seed(1)
    ids = torch.randint(2, 64, (3, 9))
    hf = tiny_t5.generate(
        input_ids=ids,
        num_beams=beams,
        num_return_sequences=beams,
        max_new_tokens=7,
        length_penalty=length_penalty,
        no_repeat_ngram_size=no_repeat,
        output_scores=True,
        return_dict_in_generate=True,
        do_sample=False,
    )
    step = HFStep(tiny_t5, ids, beams)
    ours = beam_search(step, 3, beams, 7, eos_id=EOS, length_penalty=length_penalty, no_repeat_ngram=no_repeat)
    finished_early = 0
    for b in range(3):
        for k in range(beams):
            seq = hf.sequences[b * beams + k].tolist()[1:]
            if EOS in seq:  # HF pads a sequence that finished early; ours stops at its EOS
                seq = seq[: seq.index(EOS) + 1]
            finished_early += EOS in seq and len(seq) < 7
            assert list(ours[b][k].tokens) == seq
            assert ours[b][k].score == pytest.approx(hf.sequences_scores[b * beams + k].item(), abs=1e-4)
    assert finished_early > 0  # the comparison covered EOS handling, not only max-length cut-offs
    if no_repeat:  # the ban changed what the search found, so the parity covered it
        free = beam_search(HFStep(tiny_t5, ids, beams), 3, beams, 7, eos_id=EOS, length_penalty=length_penalty)
        assert any(h.tokens != f.tokens for row, frow in zip(ours, free) for h, f in zip(row, frow))


class HashStep:
    """Deterministic pseudo-random logits that depend on each beam's whole prefix (tracks parents)."""

    def __init__(self, rows, vocab, seed):
        self.prefixes = [()] * rows
        self.vocab, self.seed = vocab, seed

    def step(self, tokens, parents):
        if parents is None:
            self.prefixes = [()] * len(tokens)
        else:
            self.prefixes = [self.prefixes[p] + (int(t),) for p, t in zip(parents, tokens)]
        return np.stack([self.logits(p) for p in self.prefixes])

    def logits(self, prefix):
        h = int(hashlib.sha256(repr((self.seed, prefix)).encode()).hexdigest()[:8], 16)
        return np.random.default_rng(h).normal(0, 2, self.vocab).astype(np.float32)


sequences = st.lists(st.lists(st.integers(2, 11), min_size=1, max_size=4), min_size=1, max_size=25)


@settings(max_examples=60, deadline=None)
@given(seqs=sequences, beams=st.integers(1, 8), seed=st.integers(0, 10**6), n_excl=st.integers(0, 5))
def test_constrained_search_never_leaves_the_trie(seqs, beams, seed, n_excl):
    items = {tuple(s) + (EOS,): n for n, s in enumerate(seqs)}  # distinct sequences, one value each
    trie = Trie((list(s), v) for s, v in items.items())
    excluded = list(range(min(n_excl, len(trie))))
    con = trie.restrict(excluded)
    step = HashStep(2 * beams, 12, seed)
    hyps = beam_search(step, 2, beams, 6, eos_id=EOS, constraints=[con, trie.restrict()], length_penalty=0.0)
    for row, allowed in ((0, set(items.values()) - set(excluded)), (1, set(items.values()))):
        got = [h.value for h in hyps[row]]
        assert len(got) == len(set(got)) == min(beams, len(allowed))
        assert set(got) <= allowed
        for h in hyps[row]:
            assert items[h.tokens] == h.value
            # the score is the exact log-probability of the sequence under the step's distributions
            exact = sum(float(log_softmax(step.logits(h.tokens[:i]))[h.tokens[i]]) for i in range(len(h.tokens)))
            assert h.logprob == pytest.approx(exact, abs=1e-4)
        assert [h.score for h in hyps[row]] == sorted((h.score for h in hyps[row]), reverse=True)


def test_enough_beams_rank_every_candidate_exactly():
    items = {(3, 4, EOS): "a", (3, 5, EOS): "b", (6, EOS): "c", (7, 8, 9, EOS): "d"}
    trie = Trie((list(s), v) for s, v in items.items())
    step = HashStep(8, 12, 7)
    hyps = beam_search(step, 1, 8, 6, eos_id=EOS, constraints=[trie.restrict()], length_penalty=0.0)[0]
    exact = {v: sum(float(log_softmax(step.logits(s[:i]))[s[i]]) for i in range(len(s))) for s, v in items.items()}
    assert [h.value for h in hyps] == sorted(exact, key=lambda v: -exact[v])


def test_group_search_without_penalty_repeats_the_plain_search():
    plain = beam_search(HashStep(4, 12, 3), 1, 4, 5, eos_id=EOS, length_penalty=1.0)[0]
    grouped = beam_search(HashStep(12, 12, 3), 1, 12, 5, eos_id=EOS, num_groups=3, length_penalty=1.0)[0]
    # with diversity 0 every group is the same 4-beam search (the reference code's setting)
    assert [h.tokens for h in grouped[::3]] == [h.tokens for h in plain]


def test_diversity_penalty_spreads_the_groups():
    def first_tokens(penalty):
        hyps = beam_search(
            HashStep(12, 12, 5), 1, 12, 5, eos_id=EOS, num_groups=3, diversity_penalty=penalty, min_new_tokens=2
        )[0]
        return {h.tokens[0] for h in hyps}

    assert len(first_tokens(5.0)) > len(first_tokens(0.0))


def test_min_new_tokens_and_validation():
    hyps = beam_search(HashStep(3, 12, 1), 1, 3, 6, eos_id=EOS, min_new_tokens=4)[0]
    assert all(len(h.tokens) >= 5 or EOS not in h.tokens for h in hyps)
    with pytest.raises(ValueError, match="multiple"):
        beam_search(HashStep(4, 12, 1), 1, 4, 3, eos_id=EOS, num_groups=3)


class CountingStep(HashStep):
    """HashStep that records how many rows each call computed."""

    def __init__(self, vocab, seed):
        super().__init__(0, vocab, seed)
        self.rows = []

    def step(self, tokens, parents):
        self.rows.append(len(tokens))
        return super().step(tokens, parents)


def test_only_live_beams_are_computed():
    # every item starts with the same two tokens: the search sends one row per request until it branches
    items = {(5, 6, a, b, EOS): 10 * a + b for a in range(2, 5) for b in range(7, 12)}
    trie = Trie((list(s), v) for s, v in items.items())
    step = CountingStep(12, 2)
    hyps = beam_search(step, 2, 8, 8, eos_id=EOS, constraints=[trie.restrict(), trie.restrict([27])], length_penalty=0)
    assert step.rows[:3] == [2, 2, 2]  # root, after 5, after 5 6: one live beam per request
    assert max(step.rows) <= 2 * 8
    assert len(hyps[0]) == 8 and 27 not in [h.value for h in hyps[1]]


def test_allowed_normalizer_renormalizes_over_the_trie_and_skips_forced_ends():
    items = {(5, 6, a, b, EOS): 10 * a + b for a in range(2, 5) for b in range(7, 12)}
    trie = Trie((list(s), v) for s, v in items.items())
    exact_step, allowed_step = CountingStep(12, 4), CountingStep(12, 4)
    beam_search(exact_step, 1, 20, 8, eos_id=EOS, constraints=[trie.restrict()], length_penalty=0)
    hyps = beam_search(
        allowed_step, 1, 20, 8, eos_id=EOS, constraints=[trie.restrict()], length_penalty=0, normalize="allowed"
    )[0]
    assert len(allowed_step.rows) == len(exact_step.rows) - 1  # the EOS-only last step costs nothing
    assert len(hyps) == 15 and len({h.value for h in hyps}) == 15

    def renormalized(seq):
        total, node = 0.0, 0
        for i, tok in enumerate(seq):
            allowed = sorted(trie.children[node])
            logits = allowed_step.logits(seq[:i])[allowed]
            total += float(log_softmax(logits[None])[0][allowed.index(tok)])
            node = trie.children[node][tok]
        return total

    for h in hyps:
        assert h.logprob == pytest.approx(renormalized(h.tokens), abs=1e-4)
    # with beams >= items, both normalizers rank the same 15 items; the allowed one sums to probability 1
    assert sum(np.exp(h.logprob) for h in hyps) == pytest.approx(1.0, abs=1e-4)
    with pytest.raises(ValueError, match="normalize"):
        beam_search(HashStep(4, 12, 1), 1, 4, 3, eos_id=EOS, normalize="nope")


@pytest.mark.parametrize("normalize", ["exact", "allowed"])
def test_a_row_that_excludes_every_item_gets_an_empty_list_beside_others(normalize):
    trie = Trie([([3, 4, EOS], 1), ([3, 5, EOS], 2), ([6, EOS], 3)])
    cons = [trie.restrict(), trie.restrict([1, 2, 3]), trie.restrict([3])]
    hyps = beam_search(HashStep(12, 8, 0), 3, 4, 3, eos_id=EOS, constraints=cons, length_penalty=0, normalize=normalize)
    assert sorted(h.value for h in hyps[0]) == [1, 2, 3]
    assert hyps[1] == []
    assert sorted(h.value for h in hyps[2]) == [1, 2]
