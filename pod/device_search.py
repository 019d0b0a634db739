"""The constrained beam search of `pod.decoding.beam_search` as torch tensor operations on the model's device.

Why: for multi-token item IDs (`digits`, `collaborative`) the NumPy search copies every decoder step's logits to
the host and walks the trie in Python, so a GPU waits on the host at every step. Here the trie is a set of dense
tensors (built once per trie and device, then cached) and the masking, the normalization, the top-k, the score
bookkeeping, the finished-hypothesis buffer and the beam reordering (an index into the KV cache, handed to the
session's `advance(tokens, parents)`) are tensor operations; the host reads the result once, at the end.

Semantics are those of `pod.decoding.beam_search` for what `Recommender._rank` asks: one group,
`length_penalty=0`, every row constrained, `normalize` "exact" (log-softmax over the whole vocabulary) or
"allowed" (renormalized over the tokens the row's trie allows: a token with no alternative is free), EOS ends
an item, 2 x beams candidates per step with an EOS kept only within the first `beams`, and a row stops adding
finished items once no running beam can beat its worst finished one. Lists agree with the NumPy reference up to
ties (equal scores may come out in another order) and float rounding.

Two things the reference decides from data are decided here from the trie alone, so no step needs the host:
- how many beams a step sends: at most the trie's number of nodes at that depth that a running beam can sit
  on (`TrieLayout.width`), and never more than `beams` (the reference sends the live count, data-dependent);
- which output columns a step projects: every token at that depth of the trie (the reference: the union over
  live beams); with "allowed", a depth where every token is EOS is free and is not computed (as the reference).
The reference's early stop (break when every row is closed) is not taken: deciding it would cost a host sync
per step, the search ends at the trie's depth anyway, and with `length_penalty=0` (scores only fall) a closed
row could not gain an item, so stopping saves work but never changes a list. A row's close is still tracked
(its finished list is frozen, as there).

Where the host and the device meet: once at the start (the rows' constraints go to the device: one index
array and one flag per row; a copy from pageable host memory, so it waits for the encoder already queued), and
once at the end (`hypotheses`: the finished items come back in one copy, which waits for the search). Every
decision in between (how many rows, which columns, how many steps) is made from the trie's layout on the host
without reading the device.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from pod.decoding import Constraint, Hypothesis, Trie
from pod.tracing import span

NEG_INF = float("-inf")


# What the search needs of a runtime session (`pod.torch_runtime.TorchSession` has both):
# advance(tokens (rows,), parents (rows,) or None) -> final decoder hidden states (rows, d), after reordering the
# KV cache so that row r continues row parents[r] of the previous call (None: the first step);
Advance = Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor]
# logits(hidden, columns, normalizer) -> (float32 logits (rows, len(columns)), whole-vocabulary logsumexp or None).
Logits = Callable[[torch.Tensor, torch.Tensor, bool], tuple[torch.Tensor, torch.Tensor | None]]


@dataclass
class TrieLayout:
    """A `Trie` as padded per-node child tables (host arrays), and what the search needs per depth.

    Node `dummy = len(trie.children)` is an extra row with no children: padding slots point at it, and so do
    beams that are not running, so one gather serves every beam without a branch.
    """

    child_token: np.ndarray  # (nodes + 1, C) the token of each child, sorted by token; padding 0
    child_node: np.ndarray  # (nodes + 1, C) the child's node; padding `dummy`
    child_column: np.ndarray  # (nodes + 1, C) where the child's token sits in its depth's `columns`; padding 0
    columns: list[np.ndarray]  # per depth: the sorted tokens that follow a node a running beam can sit on
    width: list[int]  # per depth: how many nodes a running beam can sit on (root: 1)
    node_depth: np.ndarray  # (nodes,) tokens from the root (a finished item's length)
    node_parent: np.ndarray  # (nodes,) for reading a finished item's tokens back
    node_token: np.ndarray  # (nodes,) the token that leads into the node
    eos_id: int
    dummy: int
    tensors: dict[torch.device, TrieTensors] = field(default_factory=dict, repr=False)

    @classmethod
    def build(cls, trie: Trie, eos_id: int) -> TrieLayout:
        n = len(trie.children)
        fanout = max(1, max(len(c) for c in trie.children))
        child_token = np.zeros((n + 1, fanout), dtype=np.int64)
        child_node = np.full((n + 1, fanout), n, dtype=np.int64)
        node_depth = np.zeros(n, dtype=np.int64)
        node_parent = np.full(n, -1, dtype=np.int64)
        node_token = np.full(n, -1, dtype=np.int64)
        for node, children in enumerate(trie.children):
            for slot, (tok, child) in enumerate(sorted(children.items())):
                child_token[node, slot], child_node[node, slot] = tok, child
                node_parent[child], node_token[child] = node, tok
        order = [0]  # breadth first: a parent's depth is known before its children's
        for node in order:
            for child in trie.children[node].values():
                node_depth[child] = node_depth[node] + 1
                order.append(child)
        # a running beam sits on the root or on a node not reached by EOS (EOS ends an item)
        runs = np.ones(n, dtype=bool)
        runs[1:] = node_token[1:] != eos_id
        depth = int(node_depth.max()) + 1 if n else 1
        columns, width = [], []
        child_column = np.zeros((n + 1, fanout), dtype=np.int64)
        for d in range(depth):
            at = np.flatnonzero(runs & (node_depth == d))
            width.append(len(at))
            real = child_node[at] < n
            cols = np.unique(child_token[at][real])
            columns.append(cols)
            child_column[at] = np.where(real, np.searchsorted(cols, child_token[at]), 0)
        return cls(
            child_token, child_node, child_column, columns, width, node_depth, node_parent, node_token, eos_id, n
        )

    def on(self, device: torch.device) -> TrieTensors:
        """The tables on `device`, copied there once and kept."""
        device = torch.device(device)
        if device not in self.tensors:
            self.tensors[device] = TrieTensors(
                child_token=torch.as_tensor(self.child_token, device=device),
                child_node=torch.as_tensor(self.child_node, device=device),
                child_column=torch.as_tensor(self.child_column, device=device),
                columns=[torch.as_tensor(c, device=device) for c in self.columns],
            )
        return self.tensors[device]

    def tokens(self, node: int) -> tuple[int, ...]:
        """The token sequence that leads from the root to `node`."""
        out = []
        while node > 0:
            out.append(int(self.node_token[node]))
            node = int(self.node_parent[node])
        return tuple(reversed(out))


@dataclass
class TrieTensors:
    child_token: torch.Tensor
    child_node: torch.Tensor
    child_column: torch.Tensor
    columns: list[torch.Tensor]


_LAYOUTS: weakref.WeakKeyDictionary[Trie, dict[int, TrieLayout]] = weakref.WeakKeyDictionary()


def trie_layout(trie: Trie, eos_id: int) -> TrieLayout:
    """The layout of `trie`, built on first use and cached for the trie's lifetime (a catalog's trie is built
    once and never changed; a trie changed after its first search would need a new `Trie`)."""
    per_eos = _LAYOUTS.setdefault(trie, {})
    if eos_id not in per_eos:
        per_eos[eos_id] = TrieLayout.build(trie, eos_id)
    return per_eos[eos_id]


def trie_tensors(trie: Trie, eos_id: int, device: torch.device | str) -> TrieTensors:
    """The trie's child tables on `device` (cached per trie and device)."""
    return trie_layout(trie, eos_id).on(torch.device(device))


def constraint_nodes(base: Trie, con: Constraint) -> tuple[list[int], bool]:
    """A row's constraint as nodes of `base`: `(nodes, False)` = these nodes are blocked, `(nodes, True)` = only
    these nodes are allowed.

    A constraint on `base` itself keeps its blocked nodes. One on another trie (a top-N job's trie of its
    candidates) is walked beside `base`: every allowed node of it must be a node of `base` with the same value,
    else `ValueError`; what it allows becomes the allowed set, so one cached layout serves every row.
    """
    if con.trie is base:
        return sorted(con.blocked), False
    allowed: list[int] = []
    stack = [(0, 0)]
    while stack:
        mine, theirs = stack.pop()
        for tok, child in con.trie.children[mine].items():
            if child in con.blocked:
                continue
            match = base.children[theirs].get(tok)
            if match is None or con.trie.value.get(child) != base.value.get(match):
                raise ValueError("the constraint's trie is not a part of the search's trie")
            allowed.append(match)
            stack.append((child, match))
    return sorted(allowed), True


@dataclass
class DeviceBeams:
    """A search's finished hypotheses, still on the device: per row the best `beams`, best first."""

    score: torch.Tensor  # (batch, beams) float32 log-probabilities; -inf where a row has fewer
    node: torch.Tensor  # (batch, beams) the trie node each item ended on


@torch.inference_mode()
def search_tensors(
    advance: Advance,
    logits: Logits,
    device: torch.device,
    trie: Trie,
    constraints: Sequence[Constraint],
    num_beams: int,
    max_new_tokens: int,
    eos_id: int,
    start_id: int = 0,
    normalize: str = "exact",
) -> DeviceBeams:
    """Run the search on `device` (the model's): `advance` and `logits` are the session's decoder step and
    output projection (see `Advance`, `Logits`); every tensor made here lives on `device`.

    Host <-> device traffic: the rows' constraints go to the device once (one index array and one flag per
    row, before the first step), and nothing comes back here; `hypotheses` reads the result back. No step
    waits on the host: shapes (beams sent, columns projected, steps run) come from the trie's layout, and the
    only host-side branches test that layout, never a device value.
    """
    if normalize not in ("exact", "allowed"):
        raise ValueError(f"normalize must be 'exact' or 'allowed', not {normalize!r}")
    if any(c is None for c in constraints):
        raise ValueError("the device search needs a constraint for every row")
    layout = trie_layout(trie, eos_id)
    tt = layout.on(device)
    batch, beams, dummy = len(constraints), num_beams, layout.dummy
    exact = normalize == "exact"

    # Per-row constraints as sorted keys `row * (dummy + 1) + node` (one host -> device copy), with a flag per
    # row: blocked nodes (the catalog's trie minus a history) or allowed nodes (a top-N job's candidates).
    keys, allow = [], []
    for b, con in enumerate(constraints):
        nodes, only = constraint_nodes(trie, con)
        keys.append(np.asarray(nodes, dtype=np.int64) + b * (dummy + 1))
        allow.append(only)
    keys.append(np.array([batch * (dummy + 1)], dtype=np.int64))  # a sentinel above every query
    keys_t = torch.as_tensor(np.concatenate(keys), device=device)
    allow_t = torch.as_tensor(np.array(allow, dtype=bool), device=device)
    row_base = torch.arange(batch, device=device) * (dummy + 1)

    width = 1
    node = torch.zeros(batch, 1, dtype=torch.long, device=device)  # the root
    score = torch.zeros(batch, 1, dtype=torch.float32, device=device)
    tokens = torch.full((batch,), start_id, dtype=torch.long, device=device)
    parents: torch.Tensor | None = None
    fin_score = torch.full((batch, beams), NEG_INF, dtype=torch.float32, device=device)
    fin_node = torch.full((batch, beams), dummy, dtype=torch.long, device=device)
    open_rows = torch.ones(batch, dtype=torch.bool, device=device)
    neg_inf = torch.tensor(NEG_INF, device=device)
    fanout = tt.child_token.shape[1]
    steps = min(max_new_tokens, len(layout.width))

    for step in range(steps):
        if width == 0 or layout.columns[step].size == 0:
            break  # no running beam can go on (the reference stops here too)
        child_tok = tt.child_token[node]  # (batch, width, C)
        child_node = tt.child_node[node]
        query = row_base[:, None, None] + child_node
        hit = keys_t[torch.searchsorted(keys_t, query.reshape(batch, -1)).clamp_max(keys_t.numel() - 1)]
        member = (hit == query.reshape(batch, -1)).view(batch, width, fanout)
        valid = (child_node != dummy) & (member == allow_t[:, None, None])  # blocked rows: not a member
        if not exact and layout.columns[step].tolist() == [eos_id]:
            logp = torch.zeros(batch, width, fanout, device=device)  # every running beam can only end: free
        else:
            with span("decoder.step", step=step, rows=batch * width):
                hidden = advance(tokens, parents)
                step_logits, lse = logits(hidden, tt.columns[step], exact)
            cand = step_logits.view(batch, width, -1).gather(2, tt.child_column[node])
            if exact:
                logp = cand - lse.view(batch, width, 1)
            else:  # renormalized over the row's allowed children (one child: log 1 = 0)
                logp = cand - torch.logsumexp(torch.where(valid, cand, neg_inf), dim=2, keepdim=True)
        logp = torch.where(valid, logp, neg_inf)

        acc = (score[:, :, None] + logp).view(batch, -1)  # beam-major, then token order, as the reference
        k = min(2 * beams, acc.shape[1])
        top_score, top_idx = torch.topk(acc, k, dim=1)
        top_tok = child_tok.view(batch, -1).gather(1, top_idx)
        top_node = child_node.view(batch, -1).gather(1, top_idx)
        live = top_score > NEG_INF
        last = step + 1 == max_new_tokens
        ends = live & ((top_tok == eos_id) | last)
        going = live & ~ends

        # Finished: an EOS within the first `beams` candidates of a row still open (a non-EOS at the last step
        # is no item); the row keeps its best `beams` of old and new (the reference's insertion, up to ties).
        kk = min(k, beams)
        keep = ends[:, :kk] & (top_tok[:, :kk] == eos_id) & open_rows[:, None]
        pool_score = torch.cat([fin_score, torch.where(keep, top_score[:, :kk], neg_inf)], dim=1)
        pool_node = torch.cat([fin_node, top_node[:, :kk]], dim=1)
        fin_score, pick = torch.topk(pool_score, beams, dim=1)
        fin_node = pool_node.gather(1, pick)

        # Running: the best continuing candidates, in rank order, fill the next step's beams (at most the
        # number of nodes at the next depth, so none is lost to the cut).
        new_width = min(beams, layout.width[step + 1]) if step + 1 < len(layout.width) else 0
        order = torch.sort((~going).to(torch.int8), dim=1, stable=True)[1][:, :new_width]
        chosen = going.gather(1, order)
        score = torch.where(chosen, top_score.gather(1, order), neg_inf)
        node = torch.where(chosen, top_node.gather(1, order), dummy)
        tokens = torch.where(chosen, top_tok.gather(1, order), start_id).reshape(-1)
        beam = torch.where(chosen, top_idx.gather(1, order) // fanout, 0)
        parents = (beam + torch.arange(batch, device=device)[:, None] * width).reshape(-1)  # rows of this call
        width = new_width

        # A row closes when its best running beam cannot beat its worst finished one, or nothing runs (the
        # reference's test); fin_score is sorted, so its last column is the worst (-inf until `beams` finished).
        best = score[:, 0] if width else torch.full((batch,), NEG_INF, device=device)
        open_rows &= best > fin_score[:, -1]
    return DeviceBeams(fin_score, fin_node)


def hypotheses(trie: Trie, eos_id: int, beams: DeviceBeams) -> list[list[Hypothesis]]:
    """Read a search's result back (the one device -> host copy, which waits for the search) as the NumPy
    search returns it: per row, finished hypotheses best first."""
    layout = trie_layout(trie, eos_id)
    packed = torch.stack([beams.node.to(torch.int32), beams.score.contiguous().view(torch.int32)]).cpu().numpy()
    nodes, scores = packed[0], packed[1].view(np.float32)
    out = []
    for row_nodes, row_scores in zip(nodes, scores):
        row = []
        for n, s in zip(row_nodes.tolist(), row_scores.tolist()):
            if s == NEG_INF:
                break
            row.append(Hypothesis(s, layout.tokens(n), s, trie.value.get(n)))
        out.append(row)
    return out


def beam_search(
    advance: Advance,
    logits: Logits,
    device: torch.device,
    trie: Trie,
    constraints: Sequence[Constraint],
    num_beams: int,
    max_new_tokens: int,
    eos_id: int,
    start_id: int = 0,
    normalize: str = "exact",
) -> list[list[Hypothesis]]:
    """`pod.decoding.beam_search(..., constraints, length_penalty=0.0, normalize)` on the session's device:
    per row, the best `num_beams` finished items, best first (`Hypothesis.value` is the item)."""
    found = search_tensors(
        advance, logits, device, trie, constraints, num_beams, max_new_tokens, eos_id, start_id, normalize
    )
    return hypotheses(trie, eos_id, found)
