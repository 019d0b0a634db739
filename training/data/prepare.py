"""Turn a `RawData` into a prepared directory: index IDs, split, draw negatives, write a manifest.

Splits follow the paper: leave-one-out for sequential and top-N (implied by the sequence order, see
`pod.dataset`), 8:1:1 for explanations with every user and item present in training. Item indexing:
- `keep`: the source's own integer numbering (the paper's protocol on the shared Amazon data);
- `sequential`: numbered by first appearance while walking users in order (what P5/POD did; leaks,
  because a new item always gets max-so-far + 1);
- `random`: a seeded permutation, leak-free.

The manifest also records `item_ids`, how `pod train` writes items unless told otherwise (`digits`,
`token`, `collaborative`, `semantic`; see `pod.items`). It changes nothing in the files: the leave-one-out split
and the negatives are the same in every mode, so one prepared directory serves an ablation over all four.
"""

from __future__ import annotations

import json
import random
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from pod import __version__
from pod.atomic import write_dir_atomically
from pod.bundle import sha256
from pod.dataset import PREPARED_FORMAT, PREPARED_VERSION
from pod.items import ITEM_MODES
from training.data.raw import DataFormatError, RawData

ITEM_INDEXING = ("keep", "sequential", "random")


def index_items(raw: RawData, mode: str, seed: int) -> dict[str, int]:
    if mode not in ITEM_INDEXING:
        raise ValueError(f"--item-index must be one of {', '.join(ITEM_INDEXING)}, not {mode!r}")
    if mode == "keep":
        if not raw.integer_keys:
            raise DataFormatError(
                raw.sources[0] if raw.sources else "input",
                None,
                "--item-index keep needs the source's own integer item numbering (pod or p5 format); "
                "use --item-index sequential or random",
            )
        return {key: int(key) for seq in raw.sequences.values() for key in seq}
    order: dict[str, int] = {}
    for seq in raw.sequences.values():
        for key in seq:
            order.setdefault(key, len(order) + 1)
    if mode == "sequential":
        return order
    numbers = list(range(1, len(order) + 1))
    random.Random(seed).shuffle(numbers)
    return dict(zip(order, numbers))


def index_users(raw: RawData) -> dict[str, int]:
    if raw.integer_keys:
        return {key: int(key) for key in raw.sequences}
    return {key: n for n, key in enumerate(raw.sequences, 1)}


def draw_negatives(sequences: dict[int, list[int]], items: list[int], count: int, seed: int) -> dict[int, list[int]]:
    """`count` distinct items per user, none of them in the user's whole sequence; seeded, order-stable."""
    rng = np.random.default_rng(seed)
    pool = np.asarray(items)
    out: dict[int, list[int]] = {}
    for user in sorted(sequences):
        seen = set(sequences[user])
        if len(pool) - len(seen) < count:
            raise ValueError(f"only {len(pool) - len(seen)} items are left for user {user}'s {count} negatives")
        chosen: list[int] = []
        taken: set[int] = set()
        while len(chosen) < count:
            for item in rng.choice(pool, size=2 * count).tolist():
                if item not in seen and item not in taken:
                    taken.add(item)
                    chosen.append(item)
                    if len(chosen) == count:
                        break
        out[user] = chosen
    return out


def split_explanations(records: list[dict], seed: int) -> dict[str, list[dict]]:
    """8:1:1, but a record that is a user's or item's first (in a seeded order) always goes to training."""
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    users, items, train, rest = set(), set(), [], []
    for k in order:
        r = records[k]
        if r["user"] not in users or r["item"] not in items:
            users.add(r["user"])
            items.add(r["item"])
            train.append(r)
        else:
            rest.append(r)
    n_train = max(0, round(0.8 * len(records)) - len(train))
    n_val = (len(rest) - n_train) // 2
    train += rest[:n_train]
    val = rest[n_train : n_train + n_val]
    test = rest[n_train + n_val :]
    return {"train": train, "val": val, "test": test}


def prepare(
    raw: RawData,
    out: Path,
    source_format: str,
    item_index: str = "keep",
    seed: int = 0,
    num_negatives: int = 99,
    min_length: int = 3,
    item_ids: str = "token",
) -> dict:
    """Write the prepared directory atomically and return its manifest."""
    if item_ids not in ITEM_MODES:
        raise ValueError(f"--item-ids must be one of {', '.join(ITEM_MODES)}, not {item_ids!r}")
    dropped = [u for u, seq in raw.sequences.items() if len(seq) < min_length]
    kept = {u: s for u, s in raw.sequences.items() if len(s) >= min_length}
    if not kept:
        raise ValueError(f"no user has at least {min_length} interactions (needed for train/val/test)")
    raw_kept = RawData(sequences=kept, integer_keys=raw.integer_keys, sources=raw.sources)
    item_numbers = index_items(raw_kept, item_index, seed)
    user_ids = index_users(raw_kept)
    sequences = {user_ids[u]: [item_numbers[i] for i in seq] for u, seq in kept.items()}
    items = sorted(set(item_numbers.values()))
    negatives = draw_negatives(sequences, items, num_negatives, seed)

    records = []
    for r in raw.explanations:
        if r.user in user_ids and r.item in item_numbers:
            rec = {
                "user": user_ids[r.user],
                "item": item_numbers[r.item],
                "explanation": r.explanation,
                "feature": r.feature,
            }
            records.append((r.split, rec))
    if records and all(split in ("train", "val", "test") for split, _ in records):
        explanations = {s: [rec for split, rec in records if split == s] for s in ("train", "val", "test")}
    else:
        explanations = split_explanations([rec for _, rec in records], seed)

    def name(names: dict[str, str], key: str) -> str:
        return names.get(key, key)

    id2user = {str(user_ids[u]): name(raw.user_names, u) for u in kept}
    id2item = {str(n): name(raw.item_names, key) for key, n in sorted(item_numbers.items(), key=lambda kv: kv[1])}
    manifest = {
        "format": PREPARED_FORMAT,
        "version": PREPARED_VERSION,
        "created_by": f"pod {__version__}",
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "source": {
            "format": source_format,
            "files": [{"path": str(p), "sha256": sha256(p), "bytes": Path(p).stat().st_size} for p in raw.sources],
        },
        "item_index": item_index,
        "item_ids": item_ids,
        "seed": seed,
        "num_negatives": num_negatives,
        "min_length": min_length,
        "counts": {
            "users": len(sequences),
            "items": len(items),
            "interactions": sum(len(s) for s in sequences.values()),
            "dropped_short_users": len(dropped),
            "explanations": {k: len(v) for k, v in explanations.items()},
        },
        "reader": raw.notes,
    }

    def fill(tmp: Path) -> None:
        with open(tmp / "sequences.txt", "w") as fh:
            for u in sorted(sequences):
                fh.write(" ".join(map(str, [u, *sequences[u]])) + "\n")
        with open(tmp / "negatives.txt", "w") as fh:
            for u in sorted(negatives):
                fh.write(" ".join(map(str, [u, *negatives[u]])) + "\n")
        (tmp / "id_map.json").write_text(json.dumps({"id2user": id2user, "id2item": id2item}))
        if any(explanations.values()):
            (tmp / "explanations.json").write_text(json.dumps(explanations, indent=1))
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")

    write_dir_atomically(Path(out), fill)
    return manifest
