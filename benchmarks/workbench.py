"""What the benchmark scripts set up the same way: the device they run on and the data they read."""

from __future__ import annotations

from pathlib import Path

import torch

from pod.dataset import PreparedData
from training.data.synth import write_synthetic


def resolve_device(name: str) -> str:
    """`auto`: CUDA when a card is there, else the CPU; any other name as given."""
    if name != "auto":
        return name
    return "cuda" if torch.cuda.is_available() else "cpu"


def bench_data(path: str | None, tmp: Path, **synth) -> tuple[Path, PreparedData]:
    """The prepared data at `path`, or a fresh synthetic shop written under `tmp` (`synth`: write_synthetic's
    arguments), so every script runs without downloads."""
    data_dir = Path(path) if path else tmp / "synth"
    if not path:
        write_synthetic(data_dir, **synth)
    return data_dir, PreparedData.load(data_dir)
