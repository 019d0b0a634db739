"""The in-memory form every input format is read into, before indexing and splitting.

Readers (one per input format) only parse; `training.data.prepare` turns a `RawData` into the
prepared directory (indexing, splits, negatives, manifest). Keeping the two apart means a new format
is one reader function and nothing else.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


class DataFormatError(ValueError):
    """A malformed input file. The message names the file and (where there is one) the line."""

    def __init__(self, path: Path | str, line: int | None, message: str) -> None:
        where = f"{path}:{line}" if line is not None else str(path)
        super().__init__(f"{where}: {message}")
        self.path = str(path)
        self.line = line


@dataclass
class RawExplanation:
    """One (user, item, sentence) record; `user`/`item` are keys as in `RawData.sequences`."""

    user: str
    item: str
    explanation: str
    feature: str | None = None
    split: str | None = None  # "train" / "val" / "test" when the source already splits them


@dataclass
class RawData:
    """Chronological user sequences and optional explanations, keyed by the source's own keys.

    `sequences` maps a user key to its items in time order. For the POD and P5 formats the keys are the
    files' 1-based integer indices (as strings) and `user_names`/`item_names` map them to raw IDs from
    `datamaps.json`; for CSV and raw reviews the keys are the raw IDs themselves and the name maps are
    empty. `integer_keys` says whether item keys are the source's own integer numbering (required by
    `--item-index keep`).
    """

    sequences: dict[str, list[str]]
    explanations: list[RawExplanation] = field(default_factory=list)
    user_names: dict[str, str] = field(default_factory=dict)
    item_names: dict[str, str] = field(default_factory=dict)
    integer_keys: bool = False
    sources: list[Path] = field(default_factory=list)
    notes: dict[str, object] = field(default_factory=dict)  # reader statistics for the manifest
