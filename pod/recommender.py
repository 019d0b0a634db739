"""The one recommender: turns jobs (user, history or candidates, k, exclusions) into ranked items or sentences.

Offline evaluation (`pod evaluate`), the export's parity checks, the service and the benchmarks all call this
file, so a number in RESULTS.md and an answer of the server come from the same code. It knows the runtime
seam (`Runtime.start(task, texts)` -> a decoder session, see `pod.decoding`) and the beam search, and nothing
of HTTP, of how jobs were batched, or of which runtime (PyTorch, ONNX) sits behind the seam.

Three homes live here:
- `DecodingConfig`: every decoding default (beams, explanation beams/groups, penalties, normalizer, history
  truncation), declared once;
- `Catalog`: who and what the model knows, and the one place item tries are built;
- `Recommender`: the ranking itself.

With tracing on (`pod.tracing`), a batch shows as an `encoder` span (tokenization and the encoder), then a
`search` span (beam search, one-step top-k, or exact scoring) holding one `decoder.step` span per decoder call.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field, fields
from typing import Protocol

import numpy as np

from pod import templates
from pod.dataset import MAX_HISTORY
from pod.decoding import Constraint, DecoderSession, Trie, beam_search, log_softmax, step_logits, top_columns
from pod.ids import ANONYMOUS_USER
from pod.tokenization import EOS_ID, PAD_ID, Tokenizer
from pod.tracing import span

TOPN_PROMPTS = ("auto", "topn", "sequential")
TOPN_PROMPT_HELP = (
    "the prompt that ranks top-N candidates: the top-N task's (the candidates in the input, the paper's) or the "
    "sequential task's (the history in, each candidate's next-item log-probability out); auto: sequential for "
    "one-token item IDs (measured far better), else top-N"
)  # the one wording of the choice, for `pod evaluate`, `pod serve` and POD_TOPN_PROMPT


@dataclass(frozen=True)
class DecodingConfig:
    """How the recommender decodes; the defaults are the paper's (and the reference code's)."""

    beams: int = 20  # sequential and top-N beam search
    explanation_beams: int = 21
    explanation_groups: int = 3
    diversity_penalty: float = 0.0  # group beam search diversity (reference code: 0)
    no_repeat_ngram: int = 0  # explanations: no n-gram twice in a sentence (0: off, as the paper's decoding)
    max_explanation_tokens: int = 32
    normalizer: str = "exact"  # item scores: "exact" log-probabilities or "allowed" (renormalized over valid IDs)
    history: int = MAX_HISTORY  # most recent items kept in a sequential input
    # Which prompt ranks top-N candidates: "topn" (the paper's: the candidates are the input) or "sequential" (the
    # user's history is the input and the next-item distribution is read at the candidates); "auto": see
    # `Recommender.topn_task`.
    topn_prompt: str = "auto"

    @classmethod
    def of(cls, source: object) -> DecodingConfig:
        """The settings `source` names (CLI arguments, the server's settings); the defaults for the rest."""
        return cls(**{f.name: getattr(source, f.name) for f in fields(cls) if hasattr(source, f.name)})

    def __post_init__(self) -> None:
        if self.normalizer not in ("exact", "allowed"):
            raise ValueError(f"normalizer must be 'exact' or 'allowed', not {self.normalizer!r}")
        if self.topn_prompt not in TOPN_PROMPTS:
            raise ValueError(f"topn_prompt must be one of {', '.join(TOPN_PROMPTS)}, not {self.topn_prompt!r}")
        if self.no_repeat_ngram < 0:
            raise ValueError(f"no_repeat_ngram must be 0 (off) or positive, not {self.no_repeat_ngram}")
        if self.beams < 1 or self.explanation_beams < 1 or self.explanation_beams % self.explanation_groups:
            raise ValueError(
                f"beams must be positive and explanation_beams ({self.explanation_beams}) a multiple of "
                f"explanation_groups ({self.explanation_groups})"
            )


SCORE_ROWS = 2048  # decoder rows per exact-scoring session: bounds the full-vocabulary logits it holds


class Runtime(Protocol):
    """The seam between the recommender and a model runtime (PyTorch eager, ONNX Runtime)."""

    tokenizer: Tokenizer
    topn_history: bool  # the model's top-N inputs start with the user's recent history
    user_ids: bool  # the model's sequential/top-N inputs name the user (else `user_0`: the history alone)
    tasks: list[str]  # the tasks the model has prompts (and, exported, encoders) for

    def start(self, task: str, texts: list[str]) -> DecoderSession:
        """Encode a batch once and return a decoder session over it."""
        ...


@dataclass
class Catalog:
    """Who and what the model knows: raw <-> internal IDs, item token sequences, known histories."""

    id2user: dict[int, str]
    id2item: dict[int, str]
    item_tokens: dict[int, list[int]]
    histories: dict[int, list[int]]
    item_ids: str = "digits"  # how items are written (see pod.items): "token" ranks in one decoder step
    user_index: dict[str, int] = field(init=False)
    item_index: dict[str, int] = field(init=False)
    trie: Trie = field(init=False)

    def __post_init__(self) -> None:
        self.user_index = {raw: i for i, raw in self.id2user.items()}
        self.item_index = {raw: i for i, raw in self.id2item.items()}
        self.trie = Trie((tokens, item) for item, tokens in self.item_tokens.items())
        if self.item_ids == "token":
            order = sorted(self.item_tokens)
            self.token_items = np.array(order, dtype=np.int64)  # column n of a one-step ranking is item ...
            self.item_columns = np.array([self.item_tokens[i][0] for i in order], dtype=np.int64)  # ... its token
            self.column_of = {item: n for n, item in enumerate(order)}
            # the same map as an array (item -> column, -1 where no column), for a batch's lookups at once
            self.column_array = np.full(max(order, default=-1) + 1, -1, dtype=np.int64)
            self.column_array[self.token_items] = np.arange(len(order))

    @classmethod
    def from_bundle(cls, bundle) -> Catalog:
        return cls(
            bundle.id2user,
            bundle.id2item,
            bundle.item_tokens,
            bundle.histories,
            bundle.manifest.get("item_ids", "digits"),
        )

    @classmethod
    def from_prepared(cls, data, tokenizer: Tokenizer) -> Catalog:
        """From a prepared data directory; histories are the whole known sequences (as a bundle ships them)."""
        tokens = {i: tokenizer.item_target(i) for i in data.items}
        return cls(data.id2user, data.id2item, tokens, data.sequences, getattr(tokenizer, "item_mode", "digits"))

    def subtrie(self, items: Sequence[int]) -> Trie:
        """The trie of a candidate list (top-N)."""
        return Trie((self.item_tokens[i], i) for i in items)

    @property
    def longest_item(self) -> int:
        return max(len(t) for t in self.item_tokens.values())

    # An ID from outside is an int (an internal index, as in the training files) or a str (a raw ID as in the
    # data, e.g. an ASIN); callers answer in the form they were asked in, so the client never has to map IDs.

    def resolve_users(self, values: Sequence[int | str]) -> tuple[list[int], list[int | str]]:
        """Internal indices of the known users among `values` (in order), and the values that name no known
        user (in order, repeats kept): the caller decides what an unknown user means (a 422, a skipped row)."""
        return self._resolve(values, self.id2user, self.user_index)

    def resolve_items(self, values: Sequence[int | str]) -> tuple[list[int], list[int | str]]:
        """Internal indices of the known items among `values` (in order), and the unknown values (in order)."""
        return self._resolve(values, self.id2item, self.item_index)

    def show_item(self, item: int, form: type[int] | type[str]) -> int | str:
        """An internal item index in the form a request used: the index itself, or the raw ID."""
        return item if form is int else self.id2item[item]

    @staticmethod
    def _resolve(
        values: Sequence[int | str], internal: dict[int, str], raw: dict[str, int]
    ) -> tuple[list[int], list[int | str]]:
        known: list[int] = []
        unknown: list[int | str] = []
        for value in values:
            if isinstance(value, bool):  # JSON true is no ID, though Python counts it as the int 1
                index = None
            elif isinstance(value, int):
                index = value if value in internal else None
            else:
                index = raw.get(value)
            if index is None:
                unknown.append(value)
            else:
                known.append(index)
        return known, unknown


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
    mode: str = "beam"  # "beam": constrained beam search; "score": every candidate's exact log-likelihood
    history: list[int] = field(default_factory=list)  # read only by models trained with top-N history


@dataclass
class ExplainJob:
    user: int
    item: int
    max_tokens: int = 32


@dataclass
class Ranked:
    items: list[tuple[int, float]]  # (item, log-probability), best first
    tokens: int  # decoder tokens generated for this job


@dataclass
class Explanation:
    text: str
    score: float
    tokens: int


class Recommender:
    def __init__(
        self,
        runtime: Runtime,
        catalog: Catalog,
        config: DecodingConfig | None = None,
        template: int = templates.BARE,
    ) -> None:
        self.runtime = runtime
        self.catalog = catalog
        self.config = config or DecodingConfig()
        self.template = template  # BARE in serving; WORDY for the paper's continuous+discrete ablation
        asked = self.config.topn_prompt
        if asked != "auto" and not self.serves("topn"):
            raise ValueError(
                f"topn_prompt {asked!r}: the model has no {asked} prompt (it was trained on {', '.join(runtime.tasks)})"
            )

    @property
    def tokenizer(self) -> Tokenizer:
        return self.runtime.tokenizer

    # Inputs -----------------------------------------------------------------------------------------------

    def text(self, task: str, user: int, items: Sequence[int], history: Sequence[int] = ()) -> str:
        """The encoder input of a job; the one place a history is truncated (and dropped for a top-N model
        trained without one)."""
        if task == "sequential":
            items = list(items)[-self.config.history :]
        recent = list(history)[-self.config.history :] if task == "topn" and self.runtime.topn_history else []
        if task != "explanation" and not self.runtime.user_ids:
            user = ANONYMOUS_USER
        return templates.fill(task, self.template, user, list(items), recent)

    def job_text(self, task: str, job: SequentialJob | TopNJob | ExplainJob) -> str:
        if task == "sequential":
            return self.text(task, job.user, job.history)
        if task == "topn":
            return self.text(task, job.user, job.candidates, job.history)
        return self.text(task, job.user, [job.item])

    def input_text(self, task: str, job: SequentialJob | TopNJob | ExplainJob) -> str:
        """What the encoder reads for a job: a top-N job under the sequential prompt reads its history only."""
        return self._topn_text(self.topn_task, job) if task == "topn" else self.job_text(task, job)

    def input_length(self, task: str, user: int, items: Sequence[int], history: Sequence[int] = ()) -> int:
        """Token count of a job's input, for bucketing similar jobs into one batch."""
        return len(self.tokenizer.encode_input(self.text(task, user, items, history))[0])

    # Ranking ------------------------------------------------------------------------------------------------

    def _start(self, task: str, texts: list[str], prompt: str | None = None) -> DecoderSession:
        """The runtime's encoder pass over a batch (tokenization included)."""
        prompt = prompt or task  # top-N may be read under the sequential prompt (`topn_task`)
        with span("encoder", task=task, prompt=prompt, rows=len(texts)):
            return self.runtime.start(prompt, texts)

    def _rank(
        self, task: str, texts: list[str], cons: list[Constraint], ks: list[int], prompt: str | None = None
    ) -> list[Ranked]:
        """One constrained beam search over a batch: each job's best `k` items with their scores.

        A session that can search on its device (`constrained_search`, see `pod.device_search`) does, so no
        decoder step waits on the host; otherwise the NumPy search (`pod.decoding.beam_search`, the reference
        and the ONNX path) drives the session step by step. Both return the same lists up to ties.
        """
        session = self._start(task, texts, prompt)
        cfg, longest = self.config, self.catalog.longest_item
        on_device = hasattr(session, "constrained_search")
        with span("search", task=task, mode="beam", rows=len(texts), beams=cfg.beams, on_device=on_device):
            if on_device:
                hyps = session.constrained_search(self.catalog.trie, cons, cfg.beams, longest, EOS_ID, cfg.normalizer)
            else:
                hyps = beam_search(
                    session,
                    len(texts),
                    cfg.beams,
                    longest,
                    EOS_ID,
                    constraints=cons,
                    length_penalty=0.0,
                    normalize=cfg.normalizer,
                )
        return [
            Ranked([(h.value, h.logprob) for h in row][:k], sum(len(h.tokens) for h in row)) for k, row in zip(ks, hyps)
        ]

    def _one_step(
        self, task: str, texts: list[str], sets: list[np.ndarray], keep: bool, ks: list[int], prompt: str | None = None
    ) -> list[Ranked]:
        """Token item IDs: one decoder step, then an exact top-k over each row's allowed item columns (`sets`:
        the only columns allowed, or the excluded ones; see `pod.decoding.top_columns`).

        An item is one token, so its score is the log-probability of that token (the `</s>` that follows it is
        certain for a trained model and is not computed); no beam can prune a good item. A session that can
        rank on its device (`top_columns`) does, and only `rows x k` numbers come back to the host.
        """
        cat = self.catalog
        session = self._start(task, texts, prompt)
        exact = self.config.normalizer == "exact"
        start = np.full(len(texts), PAD_ID, dtype=np.int64)
        k = max(ks, default=0)
        on_device = hasattr(session, "top_columns")  # the step and the top-k, fused on the device
        with span("search", task=task, mode="one_step", rows=len(texts), k=k):
            with span("decoder.step", step=0, rows=len(texts)):
                if on_device:
                    idx, scores = session.top_columns(start, cat.item_columns, sets, keep, k, exact)
                else:
                    logits, lse = step_logits(session, start, None, cat.item_columns, exact)
            if not on_device:
                idx, scores = top_columns(logits.astype(np.float32, copy=False), lse, sets, keep, k)
        out = []
        for row, k_row in enumerate(ks):
            n = int((idx[row, :k_row] >= 0).sum())
            items = cat.token_items[idx[row, :n]]
            out.append(Ranked([(int(i), float(v)) for i, v in zip(items, scores[row, :n])], 1))
        return out

    def _columns(self, items: Iterable[int], known_only: bool = False) -> np.ndarray:
        """Sorted, distinct one-step columns of `items`; an item without one is skipped (`known_only`) or an
        error (a top-N candidate must be in the catalog)."""
        table = self.catalog.column_array
        arr = np.fromiter(items, dtype=np.int64)
        inside = (arr >= 0) & (arr < len(table))
        cols = np.full(arr.shape, -1, dtype=np.int64)
        cols[inside] = table[arr[inside]]
        if not known_only and (cols < 0).any():
            raise KeyError(f"items with no column in the catalog: {sorted(set(arr[cols < 0].tolist()))[:5]}")
        return np.unique(cols[cols >= 0])

    def sequential(self, jobs: Sequence[SequentialJob]) -> list[Ranked]:
        texts = [self.job_text("sequential", j) for j in jobs]
        if self.catalog.item_ids == "token":
            banned = [self._columns([*j.history, *j.exclude], known_only=True) for j in jobs]
            return self._one_step("sequential", texts, banned, False, [j.k for j in jobs])
        cons = [self.catalog.trie.restrict(set(j.history) | set(j.exclude)) for j in jobs]
        return self._rank("sequential", texts, cons, [j.k for j in jobs])

    @property
    def topn_task(self) -> str:
        """The prompt that ranks top-N candidates.

        `auto` reads the candidates under the sequential prompt (the history in, the next item's log-probability
        at each candidate out) whenever the model has one and writes an item as one token, and under the top-N
        prompt otherwise. Measured on Beauty (RESULTS.md, "top-N through the sequential prompt"): the 30-minute
        CPU model, trained on the sequential task alone, ranks the 100 candidates at HR@1 0.127 / HR@10 0.422
        that way, where the top-N task's own prompt stayed at popularity's level (0.051 / 0.293) in every run.
        The sequential task sees every prefix of every history (131k targets an epoch on Beauty) and reads a
        short input; the top-N task sees one ~500-token input per target."""
        choice = self.config.topn_prompt
        if choice != "auto":
            return choice
        one_token = self.catalog.item_ids == "token"
        has = self.runtime.tasks
        return "sequential" if "sequential" in has and (one_token or "topn" not in has) else "topn"

    def serves(self, task: str) -> bool:
        """Whether the model was taught what `task` needs (top-N: the prompt that ranks its candidates)."""
        return (self.topn_task if task == "topn" else task) in self.runtime.tasks

    def _topn_text(self, prompt: str, job: TopNJob) -> str:
        return self.text(prompt, job.user, job.history) if prompt == "sequential" else self.job_text("topn", job)

    def topn(self, jobs: Sequence[TopNJob]) -> list[Ranked]:
        out: list[Ranked | None] = [None] * len(jobs)
        prompt = self.topn_task
        if self.catalog.item_ids == "token":  # one step ranks every candidate exactly: both modes agree
            texts = [self._topn_text(prompt, j) for j in jobs]
            sets = [self._columns(j.candidates) for j in jobs]
            return self._one_step("topn", texts, sets, True, [j.k for j in jobs], prompt)
        beam = [n for n, j in enumerate(jobs) if j.mode == "beam"]
        if beam:
            texts = [self._topn_text(prompt, jobs[n]) for n in beam]
            cons = [self.catalog.subtrie(jobs[n].candidates).restrict() for n in beam]
            for n, ranked in zip(beam, self._rank("topn", texts, cons, [jobs[n].k for n in beam], prompt)):
                out[n] = ranked
        by_size: dict[int, list[int]] = {}
        for n, job in enumerate(jobs):
            if job.mode == "score":
                by_size.setdefault(len(job.candidates), []).append(n)
            elif job.mode != "beam":
                raise ValueError(f"top-N mode must be 'beam' or 'score', not {job.mode!r}")
        for group in by_size.values():  # requests with as many candidates share one session
            per_session = max(1, SCORE_ROWS // len(jobs[group[0]].candidates))
            for start in range(0, len(group), per_session):
                part = group[start : start + per_session]
                for n, ranked in zip(part, self._score(prompt, [jobs[n] for n in part])):
                    out[n] = ranked
        return out  # type: ignore[return-value]

    def _score(self, prompt: str, jobs: Sequence[TopNJob]) -> list[Ranked]:
        """Exact: every candidate's full log-likelihood; a request's candidates are the rows of its one
        encoder pass (teacher forcing through the same decoder step the beam search uses)."""
        width = len(jobs[0].candidates)
        seqs = [self.catalog.item_tokens[i] for j in jobs for i in j.candidates]
        session = self._start("topn", [self._topn_text(prompt, j) for j in jobs], prompt)
        rows = np.arange(len(seqs))
        total = np.zeros(len(seqs), dtype=np.float64)
        tokens = np.full(len(seqs), PAD_ID, dtype=np.int64)  # the decoder start token
        with span("search", task="topn", mode="score", rows=len(jobs), candidates=len(seqs)):
            for t in range(max(len(s) for s in seqs)):
                with span("decoder.step", step=t, rows=len(seqs)):
                    logits = session.step(tokens, None if t == 0 else rows)
                logp = log_softmax(logits)
                nxt = np.array([s[t] if t < len(s) else PAD_ID for s in seqs], dtype=np.int64)
                live = np.array([t < len(s) for s in seqs])
                total += np.where(live, logp[rows, nxt], 0.0)
                tokens = nxt
        out = []
        for n, job in enumerate(jobs):
            mine = total[n * width : (n + 1) * width]
            order = np.argsort(-mine, kind="stable")[: job.k]
            spent = sum(len(s) for s in seqs[n * width : (n + 1) * width])
            out.append(Ranked([(job.candidates[i], float(mine[i])) for i in order], spent))
        return out

    def explain(self, jobs: Sequence[ExplainJob]) -> list[Explanation]:
        cfg = self.config
        session = self._start("explanation", [self.job_text("explanation", j) for j in jobs])
        with span("search", task="explanation", mode="beam", rows=len(jobs), beams=cfg.explanation_beams):
            hyps = beam_search(
                session,
                len(jobs),
                cfg.explanation_beams,
                max(j.max_tokens for j in jobs),
                EOS_ID,
                num_groups=cfg.explanation_groups,
                diversity_penalty=cfg.diversity_penalty,
                length_penalty=1.0,
                num_return=1,
                no_repeat_ngram=cfg.no_repeat_ngram,
            )
        out = []
        for j, row in zip(jobs, hyps):
            if not row:
                out.append(Explanation("", float("-inf"), 0))
                continue
            best = row[0]
            out.append(
                Explanation(self.tokenizer.decode(best.tokens[: j.max_tokens]), float(best.score), len(best.tokens))
            )
        return out

    def warmup(self) -> None:
        """One job per task so the first real request does not pay for lazy initialisation."""
        user = next(iter(self.catalog.histories))
        items = list(self.catalog.item_tokens)
        history = self.catalog.histories[user]
        if self.serves("sequential"):
            self.sequential([SequentialJob(user, history, 5)])
        if self.serves("topn"):
            self.topn([TopNJob(user, items[:20], 5, "beam", history), TopNJob(user, items[:20], 5, "score", history)])
        if self.serves("explanation"):
            self.explain([ExplainJob(user, items[0], 8)])


def by_length(recommender: Recommender, task: str, jobs: Sequence, batch_size: int) -> Iterator[list[int]]:
    """Offline batching: job indices sorted by input length, so a batch pads little."""

    encode = recommender.tokenizer.encode_input  # kept (keep=True): the start() that follows reads it back
    order = sorted(range(len(jobs)), key=lambda n: len(encode(recommender.input_text(task, jobs[n]), keep=True)[0]))
    for start in range(0, len(order), batch_size):
        yield order[start : start + batch_size]


def sample_users(users: Sequence[int], limit: int | None, seed: int = 0) -> list[int]:
    """All users, or a seeded random sample of `limit` (sorted): the first users of a file are not a fair
    sample (they were numbered first, and with kept ids the next-ids rule scores 7x higher on them)."""
    users = sorted(users)
    if not limit or limit >= len(users):
        return users
    return sorted(random.Random(seed).sample(users, limit))
