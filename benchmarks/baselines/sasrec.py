"""SASRec (Kang & McAuley, ICDM 2018), compact, trained on a POD prepared split and scored with POD's protocol.

Why it is here: the paper compares POD with SASRec, and a number from another paper's pipeline is not a
baseline for *our* split. This trains SASRec on exactly the prepared directory POD trains on and evaluates
it the way `pod evaluate` scores the sequential task, so the two rows can sit side by side honestly.

- Model: item embedding (scaled by sqrt(d)) + learned positions, `--blocks` pre-LayerNorm self-attention
  blocks with a causal mask and a point-wise feed-forward, padding positions zeroed after every block.
- Training data: each user's training part `s[:-2]` (`PreparedData.train_items`), the last `--max-len`
  items; every position predicts the next item; binary cross-entropy against that item and one sampled
  negative the user never touched (as in the original).
- Evaluation (same as POD's sequential task): validation predicts `s[-2]` from `s[:-2]`, test `s[-1]` from
  `s[:-1]`; full ranking over all items, items in the user's history excluded; HR@1/5/10 and NDCG@5/10 from
  `pod.metrics.ranking_metrics`. (POD's input keeps the last 20 history items; SASRec reads up to 50, as in
  its paper. Amazon 5-core sequences have no repeated items, so excluding the whole history or its last 20
  items ranks the same.)
- Stopping: the `--minutes` time box, `--epochs`, or early stopping when validation NDCG@10 has not improved
  for `--patience` evaluations; the best-validation weights are scored on test.

    python benchmarks/baselines/sasrec.py --data runs/data/beauty-keep --minutes 10 --out runs/sasrec.json
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from pod.dataset import PreparedData  # noqa: E402
from pod.metrics import ranking_metrics  # noqa: E402

TOP = 10


@dataclass
class SASRecConfig:
    max_len: int = 50
    hidden: int = 64
    blocks: int = 2
    heads: int = 1
    dropout: float = 0.5
    lr: float = 1e-3
    batch_size: int = 128
    epochs: int = 400
    minutes: float | None = 10.0
    eval_every: int = 2  # epochs between validation passes
    patience: int = 10  # validation passes without a better NDCG@10
    seed: int = 0
    device: str = "cpu"


class SASRec(nn.Module):
    """Self-attentive sequential recommender; item 0 is padding."""

    def __init__(self, num_items: int, cfg: SASRecConfig) -> None:
        super().__init__()
        d = cfg.hidden
        self.item = nn.Embedding(num_items + 1, d, padding_idx=0)
        self.pos = nn.Embedding(cfg.max_len, d)
        self.drop = nn.Dropout(cfg.dropout)
        self.attn_norm = nn.ModuleList(nn.LayerNorm(d, eps=1e-8) for _ in range(cfg.blocks))
        self.attn = nn.ModuleList(
            nn.MultiheadAttention(d, cfg.heads, dropout=cfg.dropout, batch_first=True) for _ in range(cfg.blocks)
        )
        self.ffn_norm = nn.ModuleList(nn.LayerNorm(d, eps=1e-8) for _ in range(cfg.blocks))
        self.ffn = nn.ModuleList(
            nn.Sequential(nn.Linear(d, d), nn.ReLU(), nn.Dropout(cfg.dropout), nn.Linear(d, d), nn.Dropout(cfg.dropout))
            for _ in range(cfg.blocks)
        )
        self.last_norm = nn.LayerNorm(d, eps=1e-8)
        causal = torch.triu(torch.ones(cfg.max_len, cfg.max_len, dtype=torch.bool), diagonal=1)
        self.register_buffer("causal", causal, persistent=False)
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_normal_(p)

    def forward(self, seqs: torch.Tensor) -> torch.Tensor:
        """Hidden state per position, `(batch, max_len, d)`; `seqs` is left-padded with 0."""
        length = seqs.size(1)  # may be shorter than max_len: batches are trimmed to their longest sequence
        keep = (seqs > 0).unsqueeze(-1)
        x = self.item(seqs) * math.sqrt(self.item.embedding_dim)
        # left padding: the latest item always sits at the last position, whatever the trimmed length
        x = self.drop(x + self.pos.weight[None, self.pos.num_embeddings - length :]) * keep
        causal = self.causal[:length, :length]
        for norm, attn, fnorm, ffn in zip(self.attn_norm, self.attn, self.ffn_norm, self.ffn):
            q = norm(x)
            a, _ = attn(q, x, x, attn_mask=causal, need_weights=False)
            x = q + a  # the original adds the attention output to the normalised query
            x = (x + ffn(fnorm(x))) * keep
        return self.last_norm(x)


def left_pad(seq: list[int], length: int) -> list[int]:
    seq = seq[-length:]
    return [0] * (length - len(seq)) + seq


class Trainer:
    """Holds the split as tensors so that an epoch is a few hundred vectorised steps."""

    def __init__(self, data: PreparedData, cfg: SASRecConfig) -> None:
        self.data, self.cfg = data, cfg
        self.device = torch.device(cfg.device)
        self.num_items = max(data.items)
        self.users = [u for u in data.users if len(data.train_items(u)) >= 2]
        train = [data.train_items(u) for u in self.users]
        self.lengths = np.array([min(len(s) - 1, cfg.max_len) for s in train])
        self.inputs = torch.tensor([left_pad(s[:-1], cfg.max_len) for s in train])
        self.targets = torch.tensor([left_pad(s[1:], cfg.max_len) for s in train])
        # a user's negatives must avoid the whole sequence; a boolean row per user is 22k x 12k bytes on
        # Beauty (270 MB) -- too much, so resample the few collisions instead
        self.seen = [set(data.sequences[u]) for u in self.users]
        self.rng = np.random.default_rng(cfg.seed)

    def negatives(self, rows: np.ndarray, width: int) -> torch.Tensor:
        """One random item per position that the user never touched (the original's sampler)."""
        neg = self.rng.integers(1, self.num_items + 1, size=(len(rows), width))
        for r, row in enumerate(rows):
            seen = self.seen[row]
            for c in range(width):
                while neg[r, c] in seen:
                    neg[r, c] = self.rng.integers(1, self.num_items + 1)
        return torch.from_numpy(neg)

    def batches(self) -> list[np.ndarray]:
        """Every user once, in random batches of similar length (sorted within random pools of 50 batches).

        Why: padding every sequence to 50 made 85% of a Beauty batch padding; this changes only which users
        share a batch, not what is learned from each."""
        order = self.rng.permutation(len(self.users))
        size = self.cfg.batch_size
        out = []
        for i in range(0, len(order), 50 * size):
            pool = order[i : i + 50 * size]
            pool = pool[np.argsort(self.lengths[pool], kind="stable")]
            out += [pool[j : j + size] for j in range(0, len(pool), size)]
        return [out[k] for k in self.rng.permutation(len(out))]

    def epoch(self, model: SASRec, opt: torch.optim.Optimizer) -> float:
        model.train()
        total, steps = 0.0, 0
        for rows in self.batches():
            width = int(self.lengths[rows].max())  # drop all-padding columns: most Amazon sequences are short
            seqs = self.inputs[rows, -width:].to(self.device)
            pos = self.targets[rows, -width:].to(self.device)
            neg = self.negatives(rows, width).to(self.device)
            h = model(seqs)
            pos_logit = (h * model.item(pos)).sum(-1)
            neg_logit = (h * model.item(neg)).sum(-1)
            mask = pos > 0
            bce = nn.functional.binary_cross_entropy_with_logits
            loss = bce(pos_logit[mask], torch.ones_like(pos_logit[mask])) + bce(
                neg_logit[mask], torch.zeros_like(neg_logit[mask])
            )
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total, steps = total + loss.item(), steps + 1
        return total / max(1, steps)


@torch.no_grad()
def rank(
    model: SASRec, data: PreparedData, users: list[int], split: str, cfg: SASRecConfig, batch: int = 512
) -> tuple[list[list[int]], list[int]]:
    """Top-10 over all items per user (history excluded) and the targets, for `split` (val or test)."""
    model.eval()
    device = torch.device(cfg.device)
    lists: dict[int, list[int]] = {}
    cut = {u: len(data.sequences[u]) - (2 if split == "val" else 1) for u in users}
    order = sorted(users, key=lambda u: cut[u])  # similar lengths per batch, as in training
    for i in range(0, len(order), batch):
        chunk = order[i : i + batch]
        hist = [data.sequences[u][: cut[u]] for u in chunk]
        width = min(cfg.max_len, max(len(h) for h in hist))
        seqs = torch.tensor([left_pad(h, width) for h in hist], device=device)
        scores = model(seqs)[:, -1] @ model.item.weight.T  # (batch, items + 1)
        scores[:, 0] = -torch.inf
        for r, h in enumerate(hist):
            scores[r, torch.tensor(h, device=device)] = -torch.inf
        for u, top in zip(chunk, scores.topk(TOP, dim=1).indices.cpu().tolist()):
            lists[u] = top
    return [lists[u] for u in users], [data.sequences[u][cut[u]] for u in users]


def evaluate(model: SASRec, data: PreparedData, split: str, cfg: SASRecConfig, limit: int | None = None) -> dict:
    users = data.users[:limit] if limit else data.users
    lists, targets = rank(model, data, users, split, cfg)
    return ranking_metrics(lists, targets)


def train_sasrec(
    data: PreparedData, cfg: SASRecConfig, log=print, val_limit: int | None = None, test_limit: int | None = None
) -> dict:
    """Train with early stopping on validation NDCG@10; score the best weights on test. Returns a report."""
    torch.manual_seed(cfg.seed)
    trainer = Trainer(data, cfg)
    model = SASRec(trainer.num_items, cfg).to(trainer.device)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, betas=(0.9, 0.98))
    best, best_state, best_epoch, bad = -1.0, None, 0, 0
    start = time.monotonic()
    history = []
    stop = "epochs"
    epoch = 0
    for epoch in range(1, cfg.epochs + 1):
        loss = trainer.epoch(model, opt)
        elapsed = time.monotonic() - start
        timed_out = cfg.minutes is not None and elapsed > 60 * cfg.minutes
        if epoch % cfg.eval_every == 0 or timed_out or epoch == cfg.epochs:
            val = evaluate(model, data, "val", cfg, val_limit)
            history.append({"epoch": epoch, "loss": loss, "val": val, "elapsed_s": elapsed})
            log(
                f"epoch {epoch}: loss {loss:.4f} val NDCG@10 {val['NDCG@10']:.4f} HR@10 {val['HR@10']:.4f} "
                f"({elapsed:.0f} s)"
            )
            if val["NDCG@10"] > best:
                best, best_epoch, bad = val["NDCG@10"], epoch, 0
                best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
            else:
                bad += 1
            if bad >= cfg.patience:
                stop = f"early stop: no better validation NDCG@10 for {cfg.patience} evaluations"
                break
        if timed_out:
            stop = f"time box of {cfg.minutes} min reached"
            break
    train_seconds = time.monotonic() - start
    if best_state is not None:
        model.load_state_dict(best_state)
    t0 = time.monotonic()
    test = evaluate(model, data, "test", cfg, test_limit)
    return {
        "method": "SASRec",
        "config": asdict(cfg),
        "data": str(data.root),
        "item_index": data.manifest.get("item_index"),
        "users": len(data.users[:test_limit] if test_limit else data.users),
        "epochs": epoch,
        "best_epoch": best_epoch,
        "stop_reason": stop,
        "train_seconds": train_seconds,
        "test_seconds": time.monotonic() - t0,
        "val": history[-1]["val"] if history else None,
        "best_val_NDCG@10": best,
        "test": test,
        "history": history,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True, help="a prepared data directory (`pod data prepare`)")
    defaults = SASRecConfig()
    for name, value in asdict(defaults).items():
        flag = "--" + name.replace("_", "-")
        ap.add_argument(flag, type=type(value) if value is not None else float, default=value, dest=name)
    ap.add_argument("--threads", type=int, help="torch CPU threads")
    ap.add_argument("--out", help="write the JSON report here")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = SASRecConfig(**{k: getattr(args, k) for k in asdict(defaults)})
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from efficiency import environment  # hardware, date, commit: a number is worth little without them

    report = {
        **environment(cfg.device),
        "command": "python benchmarks/baselines/sasrec.py " + " ".join(sys.argv[1:] if argv is None else argv),
        **train_sasrec(PreparedData.load(args.data), cfg, log=lambda m: print(m, flush=True)),
    }
    t = report["test"]
    print(
        f"SASRec test ({report['users']} users, {report['item_index']} ids, best epoch {report['best_epoch']}, "
        f"{report['train_seconds'] / 60:.1f} min): " + " ".join(f"{k} {v:.4f}" for k, v in t.items())
    )
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
