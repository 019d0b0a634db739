"""The machinery of the `pod` command, shared by every stage and importing none of them.

The command itself is `cli.main` (outside the core): it builds the parser here and lets each stage add its
subcommands with `register(subparsers)` from its own `cli.py` (`training/cli.py`, `export/cli.py`,
`service/cli.py`, `loadtests/cli.py`). A subcommand's `func(args)` imports its stage's heavy modules (torch,
FastAPI, Locust) only when it runs, so a slim serving install (no torch) still runs `pod serve`.

Failures: every one prints a single line `pod: error: <message>` on stderr, and the command exits 2 for a
usage or user error (a wrong flag, a missing or malformed file or directory, a bad value), 1 otherwise; the
traceback too only with `--debug`. Ctrl-C exits 130 quietly.
"""

from __future__ import annotations

import argparse
import sys
import traceback
from collections.abc import Sequence

DISTRIBUTION = "pod-rec"


class UsageError(Exception):
    """A mistake in how a command was called that its parser could not see (exit 2, no class name shown)."""


USER_ERRORS: tuple[type[BaseException], ...] = (
    UsageError,
    ValueError,  # bad values and malformed inputs (BundleError, pydantic's ValidationError, ...)
    KeyError,
    FileNotFoundError,
    NotADirectoryError,
    IsADirectoryError,
    FileExistsError,
)
"""Exceptions that mean the user asked for something wrong or missing: exit 2. Anything else: exit 1."""


def version() -> str:
    """The installed `pod-rec` distribution's version, else the source tree's `pod.__version__`."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as dist_version

    try:
        return dist_version(DISTRIBUTION)
    except PackageNotFoundError:
        from pod import __version__

        return __version__


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """argparse's defaults formatter, without the noise: no "(default: None)" (the help says what happens
    then) and no "(default: False)" for on/off switches."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or action.default is False:
            return action.help
        return super()._get_help_string(action)


class Parser(argparse.ArgumentParser):
    """Every parser of the `pod` command (argparse gives subcommands their parent's class): help shows
    defaults, usage errors are one `pod: error:` line, and every (sub)command accepts `--debug`."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)
        # SUPPRESS: absent unless given, so a subcommand's flag does not overwrite the top-level one
        self.add_argument(
            "--debug", action="store_true", default=argparse.SUPPRESS, help="on failure, print the traceback too"
        )

    def error(self, message: str):
        self.exit(2, f"pod: error: {one_line(message)} (see `{self.prog} --help`)\n")


class _Version(argparse.Action):
    """`--version`: the distribution's version is looked up only when asked for."""

    def __init__(self, option_strings: Sequence[str], dest: str = argparse.SUPPRESS, **kwargs) -> None:
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        print(f"pod {version()}")
        parser.exit()


def new_parser() -> Parser:
    """The top-level `pod` parser, before any stage has added its subcommands."""
    parser = Parser(prog="pod", description="POD: prompt-distilled LLM recommendation")
    parser.add_argument("--version", action=_Version, help="print `pod <version>` and exit")
    return parser


def one_line(text: str) -> str:
    return " ".join(line.strip() for line in str(text).splitlines() if line.strip())


def describe(exc: BaseException) -> str:
    """The error line's message: the exception's text on one line, after its class name unless that is a
    built-in user error (whose text says it all) or ours."""
    if isinstance(exc, KeyError) and len(exc.args) == 1 and isinstance(exc.args[0], str):
        text = exc.args[0]  # str(KeyError("x")) quotes it
    else:
        text = str(exc)
    text = one_line(text)
    cls = type(exc)
    plain = cls is UsageError or (cls.__module__ == "builtins" and isinstance(exc, USER_ERRORS))
    if plain and text:
        return text
    return f"{cls.__name__}: {text}" if text else cls.__name__


def exit_code(exc: BaseException) -> int:
    return 2 if isinstance(exc, USER_ERRORS) else 1


def run(parser: argparse.ArgumentParser, argv: Sequence[str] | None = None) -> int:
    """Parse `argv` (default: sys.argv), run the chosen subcommand, and return its exit status. Usage errors,
    `--help` and `--version` exit from the parser (SystemExit), as argparse does."""
    args = parser.parse_args(argv)
    debug = getattr(args, "debug", False)
    try:
        status = args.func(args)
    except KeyboardInterrupt:
        if debug:
            traceback.print_exc()
        return 130
    except Exception as exc:
        sys.stdout.flush()
        if debug:
            traceback.print_exc()
        print(f"pod: error: {describe(exc)}", file=sys.stderr, flush=True)
        return exit_code(exc)
    return int(status or 0)
