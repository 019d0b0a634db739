"""Batched (group) beam search over an abstract decoder step, with prefix-trie constraints.

Written once, in NumPy, so evaluation, the PyTorch runtime and the ONNX runtime share it (and the ONNX
serving path imports no torch). A runtime supplies a `DecoderSession`: given the last token of every beam
and, from the second step on, the row each beam came from (to reorder its KV cache), it returns next-token
logits for all `batch x beams` rows. The encoder runs once per request, before the first step.

Semantics follow Hugging Face's beam search (transformers 5.x `_beam_search`): 2 x beams candidates per
step, an EOS candidate is kept only when it ranks within the first `beams`, finished hypotheses are scored
`sum log p / generated_length ** length_penalty`, and the search stops when no running beam can beat the
worst finished one. With `num_groups > 1` it is group (diverse) beam search: groups decode in turn and a
token chosen by an earlier group at the same step costs `diversity_penalty` per use (Hamming diversity);
each group keeps its own `beams / groups` hypotheses, as in the classic implementation that transformers
5.x no longer ships.

Constraints: a `Trie` of token sequences (each ending with EOS) restricts every beam to prefixes of
allowed sequences; masking happens after the log-softmax, so a finished item's score is its exact model
log-probability. Per-row exclusions remove whole sequences from a shared trie without rebuilding it.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from pod.tracing import span

NEG_INF = -np.inf
_INIT = -1.0e9  # score of the not-yet-used beams before the first step (as Hugging Face)


class DecoderSession(Protocol):
    def step(self, tokens: np.ndarray, parents: np.ndarray | None) -> np.ndarray:
        """Logits `(rows, vocab)` for `tokens` (rows,), after reordering state by `parents` (rows,).

        `rows` is `batch x w` for any `w` the search picks at that step (only live beams are sent), and
        `parents[r]` is the row of the previous call that row `r` continues. A session may also offer
        `step_columns(tokens, parents, columns, normalizer) -> (logits (rows, len(columns)), logsumexp
        (rows,) or None)`, so a constrained search pays only for the tokens the trie allows, and
        `step_top(tokens, parents, k) -> (log-probabilities (rows, k), token ids (rows, k))`, each row's `k`
        best tokens, so an unconstrained search reads `k` numbers a row instead of the whole vocabulary.
        """
        ...


class ProjectedSession:
    """A decoder session split in two: `advance` (the decoder, returns final hidden states) and `project`
    (hidden -> logits of some token columns, plus the whole-vocabulary log-normalizer when asked).

    The split is what lets a constrained search pay for a few hundred output columns instead of the full
    vocabulary; runtimes (ONNX, PyTorch) implement the two halves on their own arrays.
    """

    def advance(self, tokens: np.ndarray, parents: np.ndarray | None):
        raise NotImplementedError

    def project(self, hidden, columns: np.ndarray | None, normalizer: bool) -> tuple[np.ndarray, np.ndarray | None]:
        raise NotImplementedError

    def step(self, tokens: np.ndarray, parents: np.ndarray | None) -> np.ndarray:
        return self.project(self.advance(tokens, parents), None, False)[0]

    def step_columns(
        self, tokens: np.ndarray, parents: np.ndarray | None, columns: np.ndarray | None, normalizer: bool
    ) -> tuple[np.ndarray, np.ndarray | None]:
        return self.project(self.advance(tokens, parents), columns, normalizer)


def logsumexp(x: np.ndarray) -> np.ndarray:
    m = x.max(axis=-1)
    return m + np.log(np.exp(x - m[:, None]).sum(axis=-1))


class Trie:
    """A prefix tree of token sequences; the node reached after a sequence's last token holds its value."""

    def __init__(self, sequences: Iterable[tuple[Sequence[int], Hashable]] = ()) -> None:
        self.children: list[dict[int, int]] = [{}]
        self.leaves: list[int] = [0]  # number of complete sequences under each node
        self.value: dict[int, Hashable] = {}
        self.paths: dict[Hashable, list[int]] = {}  # value -> nodes on its path (root excluded)
        for seq, value in sequences:
            self.add(seq, value)

    def add(self, sequence: Sequence[int], value: Hashable) -> None:
        if value in self.paths:
            return
        node, path = 0, []
        for tok in sequence:
            nxt = self.children[node].get(tok)
            if nxt is None:
                nxt = len(self.children)
                self.children[node][tok] = nxt
                self.children.append({})
                self.leaves.append(0)
            node = nxt
            path.append(node)
        self.value[node] = value
        self.paths[value] = path
        self.leaves[0] += 1
        for n in path:
            self.leaves[n] += 1

    def __len__(self) -> int:
        return self.leaves[0]

    def restrict(self, excluded: Iterable[Hashable] = ()) -> Constraint:
        """A per-row view of the trie without the `excluded` values (unknown values are ignored)."""
        removed: dict[int, int] = {}
        for value in excluded:
            for n in self.paths.get(value, ()):
                removed[n] = removed.get(n, 0) + 1
        blocked = {n for n, k in removed.items() if k >= self.leaves[n]}
        return Constraint(self, blocked, len(self) - len({v for v in excluded if v in self.paths}))


@dataclass
class Constraint:
    trie: Trie
    blocked: set[int]
    size: int  # how many sequences remain allowed

    def allowed(self, node: int) -> list[tuple[int, int]]:
        return [(tok, child) for tok, child in self.trie.children[node].items() if child not in self.blocked]


@dataclass(order=True)
class Hypothesis:
    score: float
    tokens: tuple[int, ...] = field(compare=False)
    logprob: float = field(compare=False)
    value: Hashable | None = field(compare=False, default=None)


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float32, copy=False)
    m = x.max(axis=-1, keepdims=True)
    z = x - m
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def beam_search(
    session: DecoderSession,
    batch_size: int,
    num_beams: int,
    max_new_tokens: int,
    eos_id: int,
    start_id: int = 0,
    constraints: Sequence[Constraint | None] | None = None,
    num_groups: int = 1,
    diversity_penalty: float = 0.0,
    length_penalty: float = 1.0,
    min_new_tokens: int = 0,
    num_return: int | None = None,
    normalize: str = "exact",
    no_repeat_ngram: int = 0,
) -> list[list[Hypothesis]]:
    """Best hypotheses per batch row, best first (at most `num_return`, default `num_beams`).

    `normalize="exact"` scores tokens by the model's log-softmax over the whole vocabulary (Hugging Face's
    semantics). `normalize="allowed"` (constrained rows only) renormalizes over the tokens the trie allows:
    an item's score is its log-probability under the model conditioned on producing a valid item, a token
    with no alternative is free, and a final step where every live beam can only end is never computed.
    Either way the session computes only live beams, and only the allowed tokens' logits (when it can).
    `no_repeat_ngram=n` bans a token that would repeat an n-gram of the beam's text (the decoder start token
    counts, as in Hugging Face's `no_repeat_ngram_size`): a small model otherwise loops on its likeliest clause.
    Each session call is a `decoder.step` span (step index, rows) when tracing is on (`pod.tracing`).
    """
    if num_beams % num_groups:
        raise ValueError(f"num_beams ({num_beams}) must be a multiple of num_groups ({num_groups})")
    if normalize not in ("exact", "allowed"):
        raise ValueError(f"normalize must be 'exact' or 'allowed', not {normalize!r}")
    gs = num_beams // num_groups
    rows = batch_size * num_beams
    num_return = num_return or num_beams
    scores = np.full((batch_size, num_beams), _INIT, dtype=np.float32)
    scores[:, ::gs] = 0.0  # the first beam of each group starts live
    seqs: list[tuple[int, ...]] = [()] * rows
    nodes = np.zeros(rows, dtype=np.int64)  # trie node per beam (0 = root)
    tokens = np.full(rows, start_id, dtype=np.int64)
    parents = np.zeros(rows, dtype=np.int64)
    sent = None  # rows (in beam space) sent to the session at the previous call, in its order
    finished: list[list[list[Hypothesis]]] = [[[] for _ in range(num_groups)] for _ in range(batch_size)]
    open_rows = np.ones((batch_size, num_groups), dtype=bool)  # improvement still possible
    cons = list(constraints) if constraints is not None else [None] * batch_size
    constrained = all(c is not None for c in cons)
    renormalize = normalize == "allowed" and constrained
    # unconstrained (explanations): a session that ranks on its device sends back each row's best tokens only
    shortlist = not constrained and not diversity_penalty and hasattr(session, "step_top")

    for step in range(max_new_tokens):
        live = scores.reshape(-1) > _INIT / 2
        allowed = [
            (cons[r // num_beams].allowed(int(nodes[r])) if nodes[r] >= 0 else []) if constrained and live[r] else None
            for r in range(rows)
        ]
        columns = None
        if constrained:
            columns = np.array(sorted({t for a in allowed if a for t, _ in a}), dtype=np.int64)
            if columns.size == 0:
                break
        # Send the session only the live beams: `w` per request (the most any request has), padded by repeats.
        live_bb = live.reshape(batch_size, num_beams)
        counts = live_bb.sum(1)
        width = max(1, int(counts.max()))
        order = np.argsort(~live_bb, axis=1, kind="stable")[:, :width]
        order = np.where(np.arange(width)[None, :] < np.maximum(counts, 1)[:, None], order, order[:, :1])
        send = (order + np.arange(batch_size)[:, None] * num_beams).reshape(-1)
        banned = _repeats(seqs, live, start_id, no_repeat_ngram) if no_repeat_ngram else {}
        if renormalize and columns.size == 1 and columns[0] == eos_id:
            logp_sent = np.zeros((send.size, 1), dtype=np.float32)  # every live beam can only end: nothing to compute
        elif shortlist:
            # A group keeps its best 2 x gs continuations, and each beam adds one score to all its tokens, so none
            # can come from outside its own beam's best 2 x gs (one more while `</s>` is still masked).
            src = None if sent is None else _position(sent, parents[send])
            with span("decoder.step", step=step, rows=send.size):
                extra = (step < min_new_tokens) + max(map(len, banned.values()), default=0)
                vals, ids = session.step_top(tokens[send], src, 2 * gs + extra)
            columns = np.unique(ids)
            logp_sent = np.full((send.size, columns.size), NEG_INF, dtype=np.float32)
            np.put_along_axis(logp_sent, np.searchsorted(columns, ids), vals, axis=1)
            sent = send
        else:
            src = None if sent is None else _position(sent, parents[send])
            with span("decoder.step", step=step, rows=send.size):
                logits, lse = step_logits(session, tokens[send], src, columns, not renormalize)
            logp_sent = logits if renormalize else logits - lse[:, None]
            sent = send
        vocab = logp_sent.shape[1]
        logp = np.full((rows, vocab), NEG_INF, dtype=np.float32)
        use = live[send]
        logp[send[use]] = logp_sent[use]
        eos_col = _column(columns, eos_id)
        if step < min_new_tokens and eos_col is not None:
            logp[:, eos_col] = NEG_INF
        for r, toks in banned.items():
            cols = [c for c in (_column(columns, t) for t in toks) if c is not None]
            logp[r, cols] = NEG_INF
        if constrained:
            for r in np.flatnonzero(live):
                keep = [_column(columns, t) for t, _ in allowed[r]]
                row = np.full(vocab, NEG_INF, dtype=np.float32)
                row[keep] = logp[r, keep]
                if renormalize and keep:  # a row whose constraint allows nothing stays empty
                    row[keep] = log_softmax(row[keep][None])[0]
                logp[r] = row
        last = step + 1 == max_new_tokens
        new_tokens = np.zeros(rows, dtype=np.int64)
        new_parents = np.zeros(rows, dtype=np.int64)
        new_scores = np.full((batch_size, num_beams), NEG_INF, dtype=np.float32)
        new_seqs: list[tuple[int, ...]] = [()] * rows
        new_nodes = np.full(rows, -1, dtype=np.int64)
        any_continues = False
        for b in range(batch_size):
            chosen_this_step: list[int] = []
            for g in range(num_groups):
                lo = b * num_beams + g * gs
                group_logp = logp[lo : lo + gs]
                if diversity_penalty and chosen_this_step:
                    counts_v = np.bincount(chosen_this_step, minlength=vocab).astype(np.float32)
                    group_logp = group_logp - diversity_penalty * counts_v[None, :]
                acc = (group_logp + scores[b, g * gs : (g + 1) * gs, None]).reshape(-1)
                k = min(2 * gs, acc.size)
                top = np.argpartition(-acc, k - 1)[:k]
                top = top[np.argsort(-acc[top], kind="stable")]
                hyps = finished[b][g]
                n_live = 0
                for rank, idx in enumerate(top):
                    score = float(acc[idx])
                    if score <= _INIT / 2:  # masked, or from a beam that was never live
                        break
                    beam, col = divmod(int(idx), vocab)
                    tok = col if columns is None else int(columns[col])
                    src_row = lo + beam
                    if tok == eos_id or last:
                        if rank >= gs or not open_rows[b, g]:
                            continue
                        seq = seqs[src_row] + (tok,)
                        node = _advance(cons[b], int(nodes[src_row]), tok)
                        value = cons[b].trie.value.get(node) if cons[b] is not None and node >= 0 else None
                        if cons[b] is not None and tok != eos_id:
                            continue  # an unfinished item is no item
                        norm = score / (len(seq) ** length_penalty)
                        if len(hyps) < gs or norm > hyps[0].score:
                            hyps.append(Hypothesis(norm, seq, score, value))
                            hyps.sort()
                            if len(hyps) > gs:
                                hyps.pop(0)
                        continue
                    any_continues = True
                    if n_live < gs:
                        dst = lo + n_live
                        new_tokens[dst], new_parents[dst] = tok, src_row
                        new_scores[b, g * gs + n_live] = score
                        new_seqs[dst] = seqs[src_row] + (tok,)
                        new_nodes[dst] = _advance(cons[b], int(nodes[src_row]), tok)
                        chosen_this_step.append(col)
                        n_live += 1
                for dead in range(n_live, gs):  # fewer live continuations than beams (constraints)
                    new_parents[lo + dead] = lo
                # can a running beam still beat the worst finished one? (HF's default heuristic)
                best = new_scores[b, g * gs]
                if len(hyps) >= gs and (best == NEG_INF or best / ((step + 1) ** length_penalty) <= hyps[0].score):
                    open_rows[b, g] = False
                elif best == NEG_INF:
                    open_rows[b, g] = False
        tokens, parents, scores, seqs, nodes = new_tokens, new_parents, new_scores, new_seqs, new_nodes
        if not any_continues or not open_rows.any():
            break

    out = []
    for b in range(batch_size):
        hyps = [h for group in finished[b] for h in group]
        hyps.sort(reverse=True)
        out.append(hyps[:num_return])
    return out


def _repeats(seqs: Sequence[tuple[int, ...]], live: np.ndarray, start_id: int, n: int) -> dict[int, set[int]]:
    """Per live beam row, the tokens that would complete an n-gram its text (start token first) already holds."""
    out: dict[int, set[int]] = {}
    for r in np.flatnonzero(live):
        text = (start_id, *seqs[r])
        if len(text) < n:
            continue
        tail = text[len(text) - n + 1 :]
        toks = {text[i + n - 1] for i in range(len(text) - n + 1) if text[i : i + n - 1] == tail}
        if toks:
            out[int(r)] = toks
    return out


def step_logits(
    session: DecoderSession, tokens: np.ndarray, parents: np.ndarray | None, columns: np.ndarray | None, lse: bool
) -> tuple[np.ndarray, np.ndarray | None]:
    """Logits of `columns` (all when None) and, when asked, the log-normalizer over the whole vocabulary."""
    if hasattr(session, "step_columns"):
        return session.step_columns(tokens, parents, columns, lse)
    full = session.step(tokens, parents).astype(np.float32, copy=False)
    return (full if columns is None else full[:, columns]), (logsumexp(full) if lse else None)


def top_columns(
    logits: np.ndarray, lse: np.ndarray | None, sets: Sequence[np.ndarray], keep: bool, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """The reference one-step ranking: per row, the `k` best columns of `logits` (rows, columns) as indices and
    log-probabilities, best first, ties to the lower column; `(rows, k)` arrays padded with -1 / -inf where a
    row has fewer than `k` columns allowed.

    `sets[r]` holds column indices: the only columns row `r` may rank (`keep=True`, top-N candidates) or the
    ones it may not (`keep=False`, a history to exclude), so nobody builds an "everything but" array. Scores
    are `logits - lse` (exact log-probabilities over the whole vocabulary) or, with `lse=None`, renormalized
    over the row's allowed columns. A runtime that keeps logits on its device offers the same contract as
    `session.top_columns` (see `pod.torch_runtime`); this function is what it must agree with.
    """
    rows, n = logits.shape
    idx = np.full((rows, k), -1, dtype=np.int64)
    out = np.full((rows, k), -np.inf, dtype=np.float32)
    for r in range(rows):
        scores = np.full(n, -np.inf, dtype=np.float32)
        if keep:
            scores[sets[r]] = logits[r, sets[r]]
        else:
            scores[:] = logits[r]
            scores[sets[r]] = -np.inf
        finite = int(np.isfinite(scores).sum())
        if finite == 0:
            continue
        scores -= lse[r] if lse is not None else logsumexp(scores[np.isfinite(scores)][None])[0]
        m = min(k, finite)
        top = np.argpartition(-scores, m - 1)[:m] if m < n else np.arange(n)
        top = top[np.lexsort((top, -scores[top]))][:m]
        idx[r, :m], out[r, :m] = top, scores[top]
    return idx, out


def _position(sent: np.ndarray, wanted: np.ndarray) -> np.ndarray:
    """Where each wanted beam-space row sits in the previous call's `sent` order."""
    where = np.zeros(int(max(sent.max(), wanted.max())) + 1, dtype=np.int64)  # padding rows may point anywhere
    where[sent[::-1]] = np.arange(len(sent))[::-1]  # first occurrence wins (padding repeats come later)
    return where[wanted]


def _column(columns: np.ndarray | None, token: int) -> int | None:
    if columns is None:
        return token
    i = int(np.searchsorted(columns, token))
    return i if i < len(columns) and columns[i] == token else None


def _advance(con: Constraint | None, node: int, tok: int) -> int:
    if con is None or node < 0:
        return 0
    return con.trie.children[node].get(tok, -1)
