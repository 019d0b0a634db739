"""The embedded default: a deterministic synthetic shop with structure a small model can learn.

- Items live in clusters of consecutive ids (a "department"); each item has one feature word drawn from
  its department's features.
- Users are numbered in blocks, one block per home department (so a user ID alone says something about
  taste, which the top-N task needs), and each department has a fixed cyclic "next item" order (a random
  permutation). A user starts in the home department and moves along it: with probability `p_follow`
  the next purchase is the current item's successor, otherwise a popular item of the same department,
  and with probability `p_jump` the user moves to another department. Item popularity within a
  department is Zipf-like, so a popularity baseline is meaningful but far from the best achievable.
- About a third of the purchases come with an explanation sentence that names the item's feature and
  an adjective tied to the user's taste, so the sentence is predictable from (user, item).

Everything derives from the seed; the same arguments always write byte-identical files (bar the
manifest's creation time).
"""

from __future__ import annotations

import random
from pathlib import Path

from training.data.prepare import prepare
from training.data.raw import RawData, RawExplanation

FEATURES = [
    "sound",
    "strings",
    "cable",
    "battery",
    "price",
    "tone",
    "volume",
    "grip",
    "finish",
    "case",
    "pedal",
    "keys",
    "screen",
    "strap",
    "stand",
    "color",
    "weight",
    "size",
    "handle",
    "button",
    "clip",
    "fabric",
    "lens",
    "charger",
    "speaker",
    "mount",
    "lid",
    "switch",
    "knob",
    "bag",
]
ADJECTIVES = [
    "solid",
    "warm",
    "bright",
    "sturdy",
    "light",
    "smooth",
    "clear",
    "soft",
    "crisp",
    "cheap",
    "quiet",
    "strong",
]
FRAMES = [
    "the {feature} is {adj} and works well",
    "i love how {adj} the {feature} feels",
    "great {feature} , really {adj}",
    "the {feature} is surprisingly {adj} for the money",
    "{adj} {feature} , just what i needed",
    "nice {adj} {feature} on this one",
]


def synthesize(
    users: int = 1000,
    items: int = 300,
    cluster_size: int = 20,
    seed: int = 0,
    min_len: int = 5,
    max_len: int = 12,
    p_follow: float = 0.75,
    p_jump: float = 0.08,
    explanation_rate: float = 0.35,
) -> RawData:
    if items < 2 * cluster_size or items < 120:
        raise ValueError(f"--items must be at least {max(2 * cluster_size, 120)} (99 negatives per user)")
    rng = random.Random(seed)
    clusters = [list(range(start + 1, min(start + cluster_size, items) + 1)) for start in range(0, items, cluster_size)]
    cluster_of = {i: c for c, members in enumerate(clusters) for i in members}
    successor: dict[int, int] = {}
    weights: dict[int, list[float]] = {}
    for c, members in enumerate(clusters):
        order = members[:]
        rng.shuffle(order)
        for a, b in zip(order, order[1:] + order[:1]):
            successor[a] = b
        ranked = members[:]
        rng.shuffle(ranked)
        weights[c] = [1.0 / (1 + ranked.index(m)) for m in members]
    feature_of = {}
    for members in clusters:
        pool = rng.sample(FEATURES, 4)
        for m in members:
            feature_of[m] = rng.choice(pool)

    sequences: dict[str, list[str]] = {}
    explanations: list[RawExplanation] = []
    for u in range(1, users + 1):
        taste = rng.choice(ADJECTIVES)
        frame = rng.randrange(len(FRAMES))
        cluster = (u - 1) * len(clusters) // users  # users come in blocks per home department
        length = rng.randint(min_len, max_len)
        item = rng.choices(clusters[cluster], weights[cluster])[0]
        seq = [item]
        while len(seq) < length:
            if rng.random() < p_jump:
                cluster = rng.randrange(len(clusters))
                nxt = rng.choices(clusters[cluster], weights[cluster])[0]
            elif rng.random() < p_follow:
                nxt = successor[seq[-1]]
            else:
                nxt = rng.choices(clusters[cluster], weights[cluster])[0]
            tries = 0
            while nxt in seq and tries < 50:  # no repeats, like the Amazon data
                nxt = successor[nxt] if tries % 2 == 0 else rng.choice(clusters[cluster_of[nxt]])
                tries += 1
            if nxt in seq:
                break
            seq.append(nxt)
            cluster = cluster_of[nxt]
        sequences[str(u)] = [str(i) for i in seq]
        for i in seq:
            if rng.random() < explanation_rate:
                text = FRAMES[frame].format(feature=feature_of[i], adj=taste)
                explanations.append(RawExplanation(str(u), str(i), text, feature_of[i]))
    return RawData(
        sequences=sequences,
        explanations=explanations,
        user_names={str(u): f"U{u:05d}" for u in range(1, users + 1)},
        item_names={str(i): f"P{i:05d}" for i in range(1, items + 1)},
        integer_keys=True,
        notes={
            "generator": "pod synthetic shop",
            "users": users,
            "items": items,
            "cluster_size": cluster_size,
            "seed": seed,
            "p_follow": p_follow,
            "p_jump": p_jump,
            "explanation_rate": explanation_rate,
        },
    )


def write_synthetic(
    out: Path, users: int = 1000, items: int = 300, seed: int = 0, item_index: str = "keep", item_ids: str = "token"
) -> dict:
    raw = synthesize(users=users, items=items, seed=seed)
    return prepare(raw, out, source_format="synthetic", item_index=item_index, seed=seed, item_ids=item_ids)
