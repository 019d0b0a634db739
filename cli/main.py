"""The `pod` command: `pod.cli`'s parser and error handling, with the subcommands each stage registers.

The core (`pod/`) imports no stage; this package, outside it, is the one place that knows them all. Each
stage's `cli.py` declares its flags with `register(subparsers)` and imports its heavy modules (torch, FastAPI,
Locust) only when its command runs, so building the parser stays cheap and a slim serving install (no torch)
runs `pod serve`. Run it as `pod ...`, `python -m cli ...` or `python -m cli.main ...` (e.g. under torchrun).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from export import cli as export_cli
from loadtests import cli as loadtests_cli
from pod.cli import new_parser, run
from service import cli as service_cli
from training import cli as training_cli

STAGES = (training_cli, export_cli, service_cli, loadtests_cli)
"""Each has `register(subparsers)`; their order is the order of `pod --help`."""


def build_parser() -> argparse.ArgumentParser:
    parser = new_parser()
    sub = parser.add_subparsers(dest="command", required=True)
    for stage in STAGES:
        stage.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    return run(build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
