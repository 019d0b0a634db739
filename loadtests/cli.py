"""The load-test stage's subcommand: `pod loadtest`. Its flags come from `loadtests.run` (argparse and the
standard library only); Locust runs in a child process when the command runs."""

from __future__ import annotations

import argparse


def _loadtest(args: argparse.Namespace) -> int:
    from loadtests.run import run

    return run(args)  # 0: every SLO holds; 1: one is missed; 2: the run could not happen (said on stderr)


def register(sub: argparse._SubParsersAction) -> None:
    """Add `loadtest` to the `pod` command's subparsers."""
    from loadtests.run import add_arguments

    lt = sub.add_parser(
        "loadtest",
        help="headless Locust run against a server: CSV, HTML, Markdown, SLO verdict",
        description="A headless Locust run against a running server: Locust's CSV and HTML reports, summary.md, "
        "and exit 1 when an SLO (--max-failure-rate, --max-p99-ms) is missed.",
    )
    add_arguments(lt)
    lt.set_defaults(func=_loadtest)
