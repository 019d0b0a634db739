"""The model being served, as one value that a request reads once: a swap or an availability change replaces
the value, never mutates it, so a request sees one consistent model from its first line to its answer.

`generation` goes into every batch key (see `service.batcher`), so a batch never mixes two models: jobs queued
before a swap run on the model they were resolved against (its catalog gave them their internal IDs), later
ones on the new model, and the old one is freed when its last batch ends.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from pod.recommender import Recommender, SequentialJob, TopNJob
from service import tracing

SMOKE_USERS = 8  # users a candidate model must rank before it may serve


@dataclass(frozen=True)
class Served:
    recommender: Recommender
    label: str  # runtime, precision and checkpoint hash: named by /readyz, every answer and the metrics
    generation: int = 0
    unavailable: frozenset[int] = field(default_factory=frozenset)  # internal item IDs never recommended

    def with_unavailable(self, raw_ids: Iterable[str]) -> Served:
        """This model with the given raw item IDs marked unavailable (IDs its catalog lacks are ignored)."""
        catalog = self.recommender.catalog
        items = frozenset(catalog.item_index[r] for r in raw_ids if r in catalog.item_index)
        return replace(self, unavailable=items)


Payload = tuple[Served, Any, tracing.JobTrace | None]  # what a route submits: the model, the job, its trace


def run_batch(method: str, task: str | None = None) -> Callable[[Sequence[Payload]], list]:
    """The batcher's call for one task: a batch's jobs share one model (its generation is in the batch key).
    With tracing on, the batch is a `batch` span linked to its requests' spans."""

    def run(batch: Sequence[Payload]) -> list:
        model = batch[0][0]
        with tracing.batch_span(task or method, model.label, model.generation, [trace for _, _, trace in batch]):
            return getattr(model.recommender, method)([job for _, job, _ in batch])

    return run


def batch_formed(task: str, batch: Sequence[Payload]) -> None:
    """The batcher's `on_formed` while tracing: marks each job's queue wait where its batch closed."""
    tracing.formed([trace for _, _, trace in batch])


class SmokeTestFailed(Exception):
    pass


def smoke_test(recommender: Recommender) -> None:
    """What a new model must do before it serves: rank known users' histories and candidates into known items
    with finite scores. It catches a bundle that loads but cannot answer (a wrong catalog, NaN weights)."""
    catalog = recommender.catalog
    users = [u for u, h in sorted(catalog.histories.items()) if h][:SMOKE_USERS]
    if not users:
        raise SmokeTestFailed("the catalog holds no user with a history to test the model on")
    items = sorted(catalog.item_tokens)
    checks = []
    if recommender.serves("sequential"):
        jobs = [SequentialJob(u, catalog.histories[u], 10) for u in users]
        checks.append(("sequential", recommender.sequential(jobs)))
    if recommender.serves("topn"):
        top = [TopNJob(u, items[:20], 5, "score", catalog.histories[u]) for u in users]
        checks.append(("top-N", recommender.topn(top)))
    if not checks:
        raise SmokeTestFailed("the model was taught neither sequential recommendation nor top-N")
    for name, results in checks:
        for user, ranked in zip(users, results):
            if not ranked.items:
                raise SmokeTestFailed(f"{name}: no items for user {user}")
            for item, score in ranked.items:
                if item not in catalog.item_tokens or not math.isfinite(score):
                    raise SmokeTestFailed(f"{name}: user {user} got item {item} with score {score}")
