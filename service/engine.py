"""The model runner: turns jobs (user, history, candidates...) into ranked items or sentences.

It knows the runtime interface (`start(task, texts, beams)` -> a decoder session) and the beam search, and
nothing of HTTP or of how jobs were batched. The same code drives the ONNX and the PyTorch runtimes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from pod import templates
from pod.dataset import MAX_HISTORY
from pod.decoding import Trie, beam_search, log_softmax
from pod.tokenization import EOS_ID, PAD_ID, Tokenizer


@dataclass
class Catalog:
    """Who and what the model knows: raw <-> internal IDs, item token sequences, known histories."""

    id2user: dict[int, str]
    id2item: dict[int, str]
    item_tokens: dict[int, list[int]]
    histories: dict[int, list[int]]
    user_index: dict[str, int] = field(init=False)
    item_index: dict[str, int] = field(init=False)
    trie: Trie = field(init=False)

    def __post_init__(self) -> None:
        self.user_index = {raw: i for i, raw in self.id2user.items()}
        self.item_index = {raw: i for i, raw in self.id2item.items()}
        self.trie = Trie((tokens, item) for item, tokens in self.item_tokens.items())

    @classmethod
    def from_bundle(cls, bundle) -> Catalog:
        return cls(bundle.id2user, bundle.id2item, bundle.item_tokens, bundle.histories)

    @classmethod
    def from_prepared(cls, data, tokenizer: Tokenizer) -> Catalog:
        from pod.ids import item_target

        tokens = {i: tokenizer.encode_target(item_target(i)) for i in data.items}
        return cls(data.id2user, data.id2item, tokens, data.sequences)


@dataclass
class SequentialJob:
    user: int
    history: list[int]
    k: int
    exclude: frozenset[int] = frozenset()


@dataclass
class TopNJob:
    user: int
    candidates: list[int]
    k: int
    mode: str = "beam"


@dataclass
class ExplainJob:
    user: int
    item: int
    max_tokens: int = 32


@dataclass
class Ranked:
    items: list[tuple[int, float]]
    tokens: int  # decoder tokens generated for this job


class Engine:
    def __init__(
        self,
        runtime,
        catalog: Catalog,
        beams: int = 20,
        explanation_beams: int = 21,
        explanation_groups: int = 3,
        diversity_penalty: float = 0.0,
        normalizer: str = "exact",
    ) -> None:
        self.runtime = runtime
        self.catalog = catalog
        self.beams = beams
        self.explanation_beams = explanation_beams
        self.explanation_groups = explanation_groups
        self.diversity_penalty = diversity_penalty
        self.normalizer = normalizer
        self.max_item_tokens = max(len(t) for t in catalog.item_tokens.values())

    @property
    def tokenizer(self) -> Tokenizer:
        return self.runtime.tokenizer

    def input_length(self, task: str, user: int, items: Sequence[int]) -> int:
        """Token count of a job's input, for bucketing similar jobs into one batch."""
        return len(self.tokenizer.pieces(templates.fill(task, templates.BARE, user, list(items)[-MAX_HISTORY:])))

    def _rank(self, task: str, texts: list[str], cons: list, ks: list[int]) -> list[Ranked]:
        """One constrained beam search over a batch: each job's best `k` items with their scores."""
        session = self.runtime.start(task, texts, self.beams)
        hyps = beam_search(
            session,
            len(texts),
            self.beams,
            self.max_item_tokens,
            EOS_ID,
            constraints=cons,
            length_penalty=0.0,
            normalize=self.normalizer,
        )
        return [
            Ranked([(h.value, h.logprob) for h in row][:k], sum(len(h.tokens) for h in row)) for k, row in zip(ks, hyps)
        ]

    def sequential(self, jobs: Sequence[SequentialJob]) -> list[Ranked]:
        texts = [templates.fill("sequential", templates.BARE, j.user, j.history[-MAX_HISTORY:]) for j in jobs]
        cons = [self.catalog.trie.restrict(set(j.history) | set(j.exclude)) for j in jobs]
        return self._rank("sequential", texts, cons, [j.k for j in jobs])

    def topn(self, jobs: Sequence[TopNJob]) -> list[Ranked]:
        out: list[Ranked | None] = [None] * len(jobs)
        beam_jobs = [n for n, j in enumerate(jobs) if j.mode == "beam"]
        if beam_jobs:
            texts = [templates.fill("topn", templates.BARE, jobs[n].user, jobs[n].candidates) for n in beam_jobs]
            cons = [Trie((self.catalog.item_tokens[i], i) for i in jobs[n].candidates).restrict() for n in beam_jobs]
            for n, ranked in zip(beam_jobs, self._rank("topn", texts, cons, [jobs[n].k for n in beam_jobs])):
                out[n] = ranked
        for n, job in enumerate(jobs):
            if job.mode == "score":
                out[n] = self._score(job)
        return out  # type: ignore[return-value]

    def _score(self, job: TopNJob) -> Ranked:
        """Exact: every candidate's full log-likelihood, one row per candidate sharing one encoder pass."""
        seqs = [self.catalog.item_tokens[i] for i in job.candidates]
        text = templates.fill("topn", templates.BARE, job.user, job.candidates)
        session = self.runtime.start("topn", [text], len(seqs))
        rows = np.arange(len(seqs))
        total = np.zeros(len(seqs), dtype=np.float64)
        tokens = np.zeros(len(seqs), dtype=np.int64)  # decoder start
        for t in range(max(len(s) for s in seqs)):
            logp = log_softmax(session.step(tokens, None if t == 0 else rows))
            nxt = np.array([s[t] if t < len(s) else PAD_ID for s in seqs], dtype=np.int64)
            live = np.array([t < len(s) for s in seqs])
            total += np.where(live, logp[rows, nxt], 0.0)
            tokens = nxt
        order = np.argsort(-total, kind="stable")[: job.k]
        return Ranked([(job.candidates[i], float(total[i])) for i in order], int(sum(len(s) for s in seqs)))

    def explain(self, jobs: Sequence[ExplainJob]) -> list[tuple[str, float, int]]:
        texts = [templates.fill("explanation", templates.BARE, j.user, [j.item]) for j in jobs]
        session = self.runtime.start("explanation", texts, self.explanation_beams)
        hyps = beam_search(
            session,
            len(jobs),
            self.explanation_beams,
            max(j.max_tokens for j in jobs),
            EOS_ID,
            num_groups=self.explanation_groups,
            diversity_penalty=self.diversity_penalty,
            length_penalty=1.0,
            num_return=1,
        )
        out = []
        for j, row in zip(jobs, hyps):
            best = row[0]
            tokens = list(best.tokens[: j.max_tokens])
            out.append((self.tokenizer.decode(tokens), float(best.score), len(best.tokens)))
        return out

    def warmup(self) -> None:
        """One job per task so the first real request does not pay for lazy initialisation."""
        user = next(iter(self.catalog.histories))
        items = list(self.catalog.item_tokens)
        self.sequential([SequentialJob(user, self.catalog.histories[user][-MAX_HISTORY:], 5)])
        self.topn([TopNJob(user, items[:20], 5, "beam"), TopNJob(user, items[:20], 5, "score")])
        self.explain([ExplainJob(user, items[0], 8)])
