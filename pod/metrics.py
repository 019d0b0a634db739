"""Metrics with the paper's definitions (REFERENCE.md).

- HR@k and NDCG@k with one ground-truth item: NDCG@k = 1 / log2(rank + 1) when the item is in the top k.
- BLEU-4: corpus BLEU, unsmoothed, on whitespace tokens (sacrebleu with `tokenize="none"`), x100.
- ROUGE-1/2/L: F1 averaged over sentences (rouge-score, no stemming), x100.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Sequence

HR_KS = (1, 5, 10)
NDCG_KS = (5, 10)


def ranking_metrics(ranked: Sequence[Sequence[Hashable]], targets: Sequence[Hashable]) -> dict[str, float]:
    """Mean HR@1/5/10 and NDCG@5/10 over users; `ranked[u]` is user u's list, best first."""
    if len(ranked) != len(targets):
        raise ValueError("one ranked list per target")
    n = max(1, len(targets))
    hits = {k: 0.0 for k in HR_KS}
    ndcg = {k: 0.0 for k in NDCG_KS}
    for items, target in zip(ranked, targets):
        items = list(items)
        rank = items.index(target) if target in items else None
        if rank is None:
            continue
        for k in HR_KS:
            hits[k] += rank < k
        for k in NDCG_KS:
            ndcg[k] += 1.0 / math.log2(rank + 2) if rank < k else 0.0
    out = {f"HR@{k}": v / n for k, v in hits.items()}
    out.update({f"NDCG@{k}": v / n for k, v in ndcg.items()})
    return out


def text_metrics(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
    """BLEU-4 and ROUGE-1/2/L F1 (x100)."""
    import sacrebleu
    from rouge_score import rouge_scorer

    bleu = sacrebleu.corpus_bleu(
        list(predictions), [list(references)], tokenize="none", smooth_method="none", force=True
    )
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=False)
    sums = {"rouge1": 0.0, "rouge2": 0.0, "rougeL": 0.0}
    for pred, ref in zip(predictions, references):
        scores = scorer.score(ref, pred)
        for key in sums:
            sums[key] += scores[key].fmeasure
    n = max(1, len(predictions))
    return {
        "BLEU-4": bleu.score,
        "ROUGE-1": 100 * sums["rouge1"] / n,
        "ROUGE-2": 100 * sums["rouge2"] / n,
        "ROUGE-L": 100 * sums["rougeL"] / n,
    }
