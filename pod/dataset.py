"""The prepared data directory: the contract between `pod data` and every later stage.

Layout (format `pod-prepared`, version 1; see docs/DATA.md):
- `manifest.json`: format, version, counts, seed, item indexing (`item_index`: how items are numbered) and
  the default item writing for training (`item_ids`: digits, token, collaborative or semantic; absent = digits),
  source files with SHA-256.
- `sequences.txt`: `user item item ...` with internal 1-based indices, chronological, whole sequence.
  Leave-one-out is implied: last item = test, the one before = validation, the rest = training.
- `negatives.txt`: `user n_1 ... n_99`, the fixed candidate negatives (never items of that user).
- `id_map.json`: `{"id2user": {"1": raw}, "id2item": {"1": raw}}` internal index -> raw ID.
- `explanations.json` (optional): `{"train"|"val"|"test": [{"user", "item", "explanation", "feature"}]}`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

PREPARED_FORMAT = "pod-prepared"
PREPARED_VERSION = 1
MAX_HISTORY = 20  # the most recent items kept in a sequential input (REFERENCE.md)


class PreparedDataError(ValueError):
    pass


def _read_int_lines(path: Path) -> dict[int, list[int]]:
    out: dict[int, list[int]] = {}
    with open(path) as fh:
        for n, line in enumerate(fh, 1):
            parts = line.split()
            if not parts:
                continue
            try:
                nums = [int(p) for p in parts]
            except ValueError:
                raise PreparedDataError(f"{path}:{n}: expected integers, got {line.strip()[:80]!r}") from None
            out[nums[0]] = nums[1:]
    return out


@dataclass
class PreparedData:
    root: Path
    manifest: dict
    sequences: dict[int, list[int]]
    negatives: dict[int, list[int]]
    id2user: dict[int, str]
    id2item: dict[int, str]
    explanations: dict[str, list[dict]]

    @classmethod
    def load(cls, root: str | Path) -> PreparedData:
        root = Path(root)
        manifest_file = root / "manifest.json"
        if not manifest_file.is_file():
            raise PreparedDataError(f"{root}: not a prepared data directory (no manifest.json); run `pod data`")
        manifest = json.loads(manifest_file.read_text())
        if manifest.get("format") != PREPARED_FORMAT or manifest.get("version", 0) > PREPARED_VERSION:
            raise PreparedDataError(
                f"{manifest_file}: unsupported format {manifest.get('format')!r} version {manifest.get('version')!r}"
            )
        maps = json.loads((root / "id_map.json").read_text())
        expl_file = root / "explanations.json"
        explanations = json.loads(expl_file.read_text()) if expl_file.is_file() else {}
        data = cls(
            root=root,
            manifest=manifest,
            sequences=_read_int_lines(root / "sequences.txt"),
            negatives=_read_int_lines(root / "negatives.txt"),
            id2user={int(k): v for k, v in maps["id2user"].items()},
            id2item={int(k): v for k, v in maps["id2item"].items()},
            explanations={k: explanations.get(k, []) for k in ("train", "val", "test")},
        )
        counts = manifest.get("counts", {})
        if counts.get("users") is not None and counts["users"] != len(data.sequences):
            raise PreparedDataError(
                f"{root / 'sequences.txt'}: {len(data.sequences)} users, manifest says "
                f"{counts['users']} (truncated or edited?)"
            )
        return data

    @property
    def users(self) -> list[int]:
        return sorted(self.sequences)

    @property
    def items(self) -> list[int]:
        return sorted(self.id2item)

    @property
    def item_ids(self) -> str:
        """How `pod train` writes items unless told otherwise; the split is the same in every mode."""
        return self.manifest.get("item_ids", "digits")

    @property
    def tasks(self) -> list[str]:
        """Tasks this data supports, in the canonical order of `pod.TASKS`."""
        return (["explanation"] if self.explanations["train"] else []) + ["sequential", "topn"]

    def train_items(self, user: int) -> list[int]:
        return self.sequences[user][:-2]

    def eval_example(self, user: int, split: str) -> tuple[list[int], int]:
        """(history, target) for leave-one-out: val predicts the penultimate item, test the last."""
        seq = self.sequences[user]
        cut = len(seq) - (2 if split == "val" else 1)
        return seq[:cut][-MAX_HISTORY:], seq[cut]

    def history_before(self, user: int, split: str) -> list[int]:
        """Everything the user bought before the split's target, untruncated (what a recommender excludes;
        what it reads is truncated where the input is built)."""
        seq = self.sequences[user]
        return seq[: len(seq) - (2 if split == "val" else 1)]

    def candidates(self, user: int, split: str) -> tuple[list[int], int]:
        """Top-N candidates (target + fixed negatives, in a fixed shuffled order) and the target."""
        _, target = self.eval_example(user, split)
        cands = [target, *self.negatives[user]]
        # a fixed, user-dependent rotation: the target's position must not give it away
        shift = (user * 7919) % len(cands)
        return cands[shift:] + cands[:shift], target

    def item_popularity(self) -> dict[int, int]:
        """Interaction counts over the training part of every sequence (for the popularity baseline)."""
        counts: dict[int, int] = {}
        for user in self.sequences:
            for item in self.train_items(user):
                counts[item] = counts.get(item, 0) + 1
        return counts
