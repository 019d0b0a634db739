"""Shared fixtures: the real data in ../shared (read in place, never copied) and a small synthetic shop."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _find_shared() -> Path:
    """`$POD_SHARED_DIR`, else the nearest `shared/` beside the checkout or one of its parents."""
    if os.environ.get("POD_SHARED_DIR"):
        return Path(os.environ["POD_SHARED_DIR"])
    for parent in ROOT.parents:
        if (parent / "shared" / "REFERENCE.md").is_file():
            return parent / "shared"
    return ROOT.parent / "shared"


SHARED = _find_shared()


def shared_path(*parts: str) -> Path:
    path = SHARED.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"shared file {path} is absent")
    return path


@pytest.fixture(scope="session")
def t5_spiece() -> Path:
    return shared_path("tokenizers", "t5", "spiece.model")


@pytest.fixture(scope="session")
def small_synth(tmp_path_factory) -> Path:
    """A small synthetic shop (200 users, 120 items) for fast training tests."""
    from training.data.synth import write_synthetic

    out = tmp_path_factory.mktemp("data") / "synth-small"
    write_synthetic(out, users=200, items=120, seed=3)
    return out


@pytest.fixture(scope="session")
def default_synth(tmp_path_factory) -> Path:
    """The embedded default shop, exactly as `make demo` writes it."""
    from training.data.synth import write_synthetic

    out = tmp_path_factory.mktemp("data") / "synthetic"
    write_synthetic(out)
    return out


@pytest.fixture(scope="session")
def trained_sequential(default_synth, tmp_path_factory) -> Path:
    """A tiny model trained on the default shop's sequential task for about a minute on 2 cores."""
    from training.train import quick_sequential_config, train

    out = tmp_path_factory.mktemp("runs") / "seq"
    train(quick_sequential_config(default_synth, out))
    return out


@pytest.fixture(scope="session")
def exported_bundle(trained_sequential, default_synth, tmp_path_factory) -> Path:
    """The trained tiny model exported to an fp32 ONNX bundle (parity checked by the export itself)."""
    from export.export import export_bundle

    out = tmp_path_factory.mktemp("bundles") / "fp32"
    export_bundle(trained_sequential, out, data=default_synth, log=lambda *_: None)
    return out
