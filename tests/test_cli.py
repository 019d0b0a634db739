"""The `pod` command: entry point outside the core, lazy stage registration, one-line errors, help, version."""

from __future__ import annotations

import argparse
import ast
import dataclasses
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from cli.main import build_parser, main
from pod import cli as core_cli
from tests.conftest import ROOT

STAGES = {"training", "export", "service", "loadtests", "cli", "benchmarks", "reliability", "tests"}
HEAVY = {"torch", "transformers", "fastapi", "starlette", "uvicorn", "pydantic", "onnx", "onnxruntime", "locust"}
SUBCOMMANDS = [["data"], ["data", "synth"], ["data", "prepare"], ["train"], ["evaluate"], ["export"], ["serve"]]
SUBCOMMANDS += [["loadtest"]]


def pod(*argv: str, timeout: float = 180, **env: str) -> subprocess.CompletedProcess:
    """`pod ARGV` in a fresh process, as a user runs it (`python -m cli.main` is what `pod` runs)."""
    full = {k: v for k, v in os.environ.items() if not k.startswith("POD_")}
    full.update(PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", **env)
    cmd = [sys.executable, "-m", "cli.main", *argv]
    return subprocess.run(cmd, env=full, cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def assert_one_error_line(done: subprocess.CompletedProcess, code: int, *words: str) -> str:
    lines = done.stderr.splitlines()
    assert done.returncode == code, done.stdout[-2000:] + done.stderr[-4000:]
    assert len(lines) == 1 and lines[0].startswith("pod: error: "), done.stderr[-4000:]
    assert "Traceback" not in done.stdout + done.stderr
    for word in words:
        assert word in lines[0], lines[0]
    return lines[0]


def parsers(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()):
    """(argv path, parser) for the command and every subcommand, depth first."""
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from parsers(sub, (*path, name))


# ---------------------------------------------------------------------------------------------------- layout


def test_no_module_of_the_core_imports_a_stage():
    offenders = []
    for path in sorted((ROOT / "pod").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            elif isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", "")) in (
                "import_module",
                "__import__",
            ):
                names = [a.value for a in node.args[:1] if isinstance(a, ast.Constant) and isinstance(a.value, str)]
            offenders += [f"{path.relative_to(ROOT)}:{node.lineno}: {n}" for n in names if n.split(".")[0] in STAGES]
    assert not offenders, offenders


def test_building_the_parser_imports_no_torch_fastapi_or_locust():
    code = (
        "import sys\n"
        "from cli.main import build_parser\n"
        "build_parser().parse_args(['serve'])\n"
        f"print(sorted({{m.split('.')[0] for m in sys.modules}} & set({sorted(HEAVY)!r})))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stdout.strip() == "[]", done.stdout + done.stderr


def test_pod_serve_runs_without_torch():
    """A slim serving install (no torch, no Locust): `pod serve` gets as far as asking for its bundle."""
    code = (
        "import sys\n"
        "class NoTorch:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in ('torch', 'transformers', 'locust'):\n"
        "            raise ModuleNotFoundError(f'No module named {name!r} (slim install)')\n"
        "sys.meta_path.insert(0, NoTorch())\n"
        "from cli.main import main\n"
        "sys.exit(main(['serve']))\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("POD_")}
    env.update(PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert_one_error_line(done, 2, "--bundle")


# ---------------------------------------------------------------------------------------------------- version, help


def test_version_prints_the_distribution_version():
    done = pod("--version")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"pod {core_cli.version()}"
    from importlib.metadata import PackageNotFoundError, version

    try:
        expected = version("pod-rec")
    except PackageNotFoundError:
        from pod import __version__ as expected
    assert core_cli.version() == expected


def test_the_installed_pod_script_is_this_command():
    script = Path(sys.executable).parent / "pod"
    if not script.is_file():
        pytest.skip("no `pod` script beside this Python (not installed with pip install -e .)")
    done = subprocess.run([str(script), "--version"], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert done.returncode == 0 and done.stdout.strip() == f"pod {core_cli.version()}", done.stderr
    assert "cli.main" in script.read_text()


def test_python_dash_m_cli_runs_the_command():
    """What `torchrun ... -m cli.main train ...` relies on; `python -m cli` too."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    for module in ("cli", "cli.main"):
        done = subprocess.run(
            [sys.executable, "-m", module, "train", "--help"], env=env, cwd=ROOT, capture_output=True, text=True
        )
        assert done.returncode == 0 and done.stdout.startswith("usage: pod train"), done.stderr


@pytest.mark.parametrize("argv", [[], *SUBCOMMANDS], ids=lambda a: " ".join(a) or "pod")
def test_help_of_the_command_and_every_subcommand(argv, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([*argv, "--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: {' '.join(['pod', *argv])}") and "--debug" in out


def test_every_flag_has_a_help_string_and_shows_its_default(capsys):
    missing = []
    for path, parser in parsers(build_parser()):
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                missing += [f"{' '.join(path)} {c.dest}" for c in action._choices_actions if not c.help]
            elif not action.help:
                missing.append(f"{' '.join(path)} {action.option_strings or action.dest}")
            elif action.option_strings and all(action.default is not v for v in (None, False, argparse.SUPPRESS)):
                assert "%(default)" in core_cli.HelpFormatter("pod")._get_help_string(action), (path, action)
    assert not missing, missing
    with pytest.raises(SystemExit):
        main(["evaluate", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "(default: 20)" in out and "(default: every user)" in out and "--seed SEED seed of the --limit" in out


def test_train_help_shows_train_configs_defaults():
    """`pod train` flags default to None so TrainConfig decides; the help states TrainConfig's defaults by hand
    (no torch when the parser is built), and this keeps the two equal."""
    pytest.importorskip("torch")
    from training.cli import TRAIN_DEFAULTS, _default
    from training.train import TrainConfig

    defaults = {}
    for f in dataclasses.fields(TrainConfig):
        if f.default is not dataclasses.MISSING:
            defaults[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            defaults[f.name] = f.default_factory()
    for name, value in TRAIN_DEFAULTS.items():
        assert name in defaults and defaults[name] == value, (name, value, defaults.get(name))
    (train,) = [p for path, p in parsers(build_parser()) if path == ("train",)]
    for action in train._actions:
        if action.dest not in defaults or action.default is not None:
            continue
        if action.dest in TRAIN_DEFAULTS:
            assert _default(action.dest) in action.help, action.dest
        else:  # None in TrainConfig too: the help says what that means
            assert defaults[action.dest] is None and "(default: " in action.help, action.dest
    flags = {a.dest for a in train._actions}
    assert set(TRAIN_DEFAULTS) == {n for n, v in defaults.items() if v is not None and n in flags}


def test_preset_choices_are_the_models_presets():
    """The parser lists the presets by hand (no torch when it is built); this keeps them equal to the model's."""
    pytest.importorskip("torch")
    from benchmarks.reproduce import build_parser as reproduce_parser
    from pod.model import PRESETS

    (train,) = [p for path, p in parsers(build_parser()) if path == ("train",)]
    for parser in (train, reproduce_parser()):
        (preset,) = [a for a in parser._actions if a.dest == "preset"]
        assert list(preset.choices) == list(PRESETS)


def test_a_recipe_fills_the_flags_left_out_and_explicit_flags_win():
    pytest.importorskip("torch")
    from training.cli import RECIPES, train_config

    args = build_parser().parse_args(["train", "--data", "d", "--out", "o", "--recipe", "catalog", "--lr", "1e-3"])
    cfg = train_config(args)
    assert cfg.lr == 1e-3 and cfg.tasks == ["sequential"]  # the flag won; the recipe's tasks became a list
    for name, value in RECIPES["catalog"].items():
        if name not in ("lr", "tasks"):
            assert getattr(cfg, name) == value, name
    plain = train_config(build_parser().parse_args(["train", "--data", "d", "--out", "o"]))
    assert plain.preset == "tiny" and plain.label_smoothing == 0.0 and plain.tasks is None


def test_serve_help_shows_serve_settings_defaults():
    pytest.importorskip("pydantic_settings")
    from service.cli import SERVE_DEFAULTS, _default
    from service.settings import ServeSettings

    (serve,) = [p for path, p in parsers(build_parser()) if path == ("serve",)]
    flags = {a.dest: a for a in serve._actions}
    for name, value in SERVE_DEFAULTS.items():
        assert ServeSettings.model_fields[name].default == value, name
        assert _default(name) in flags[name].help, name


# ---------------------------------------------------------------------------------------------------- failures


@pytest.mark.parametrize(
    "argv, code, words",
    [
        (["evaluate", "--checkpoint", "/nonexistent", "--data", "/nonexistent"], 2, ["/nonexistent"]),
        (["export", "--checkpoint", "/nonexistent", "--out", "{tmp}/bundle"], 2, ["/nonexistent"]),
        (["serve"], 2, ["--bundle"]),
        (["serve", "--bundle", "/nonexistent"], 2, ["/nonexistent/bundle.json"]),
        (["data", "prepare", "--format", "pod", "/nonexistent", "--out", "{tmp}/p"], 2, ["/nonexistent"]),
        (["evaluate", "--checkpoint", "x"], 2, ["--data", "pod evaluate --help"]),
        (["nonsense"], 2, ["nonsense"]),
        (["train", "--data", "d", "--out", "o", "--lr", "fast"], 2, ["--lr"]),
    ],
    ids=["evaluate", "export", "serve", "serve-bad-bundle", "prepare", "missing-flag", "unknown", "bad-value"],
)
def test_a_failure_is_one_error_line_without_traceback(argv, code, words, tmp_path):
    done = pod(*[a.replace("{tmp}", str(tmp_path)) for a in argv])
    assert_one_error_line(done, code, *words)
    assert not (tmp_path / "bundle").exists()


def test_debug_adds_the_traceback():
    done = pod("evaluate", "--checkpoint", "/nonexistent", "--data", "/nonexistent", "--debug")
    assert done.returncode == 2
    assert "Traceback (most recent call last)" in done.stderr
    assert done.stderr.splitlines()[-1].startswith("pod: error: ")


def _toy(exc: BaseException | None = None, status: int | None = None) -> argparse.ArgumentParser:
    def fail(args):
        if exc is not None:
            raise exc
        return status

    parser = core_cli.new_parser()
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("go", help="run").set_defaults(func=fail)
    return parser


class ParityLikeError(RuntimeError):
    pass


@pytest.mark.parametrize(
    "exc, code, line",
    [
        (ValueError("bad\nvalue"), 2, "pod: error: bad value"),
        (FileNotFoundError("no such file: x"), 2, "pod: error: no such file: x"),
        (KeyError("unknown user 7"), 2, "pod: error: unknown user 7"),
        (core_cli.UsageError("--a needs --b"), 2, "pod: error: --a needs --b"),
        (ParityLikeError("logits differ by 3e-3"), 1, "pod: error: ParityLikeError: logits differ by 3e-3"),
        (RuntimeError(), 1, "pod: error: RuntimeError"),
        (ZeroDivisionError("division by zero"), 1, "pod: error: ZeroDivisionError: division by zero"),
    ],
)
def test_every_exception_becomes_one_line_and_an_exit_status(exc, code, line, capsys):
    assert core_cli.run(_toy(exc), ["go"]) == code
    captured = capsys.readouterr()
    assert captured.err == line + "\n" and "Traceback" not in captured.out


@pytest.mark.parametrize("argv", [["--debug", "go"], ["go", "--debug"]])
def test_debug_before_or_after_the_subcommand_prints_the_traceback(argv, capsys):
    assert core_cli.run(_toy(ParityLikeError("boom")), argv) == 1
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and err.splitlines()[-1] == "pod: error: ParityLikeError: boom"


def test_ctrl_c_exits_130_quietly(capsys):
    assert core_cli.run(_toy(KeyboardInterrupt()), ["go"]) == 130
    captured = capsys.readouterr()
    assert captured.err == "" and captured.out == ""


def test_a_command_returns_its_exit_status():
    assert core_cli.run(_toy(status=1), ["go"]) == 1
    assert core_cli.run(_toy(status=None), ["go"]) == 0


# ---------------------------------------------------------------------------------------------------- commands


def test_evaluate_passes_limit_and_seed(monkeypatch, capsys):
    pytest.importorskip("torch")
    import training.evaluate as ev

    calls = []
    monkeypatch.setattr(ev, "evaluate", lambda *a, **kw: calls.append((a, kw)) or {})
    monkeypatch.setattr(ev, "markdown", lambda report: "report")
    assert main(["evaluate", "--checkpoint", "c", "--data", "d"]) == 0
    assert main(["evaluate", "--checkpoint", "c", "--data", "d", "--limit", "50", "--seed", "3"]) == 0
    (args0, kw0), (args1, kw1) = calls
    assert args0 == ("c", "d") and kw0["limit"] is None and kw0["seed"] == 0
    assert kw1["limit"] == 50 and kw1["seed"] == 3


def test_make_demo_reuses_what_exists(tmp_path):
    """`make demo` runs a stage only when its output is missing or stale (dry run: nothing executes)."""
    if not shutil.which("make"):
        pytest.skip("no make")
    data, run = tmp_path / "data", tmp_path / "run"

    def planned() -> str:
        done = subprocess.run(
            ["make", "-n", "demo", f"DATA={data}", f"RUN={run}"], cwd=ROOT, capture_output=True, text=True, timeout=60
        )
        assert done.returncode == 0, done.stderr
        return done.stdout

    plan = planned()
    for stage in ("pod data synth", "pod train", "pod evaluate", "pod export", "pod serve"):
        assert stage in plan, plan
    assert "--limit" not in plan  # the demo evaluates every user
    (run / "last").mkdir(parents=True)
    (run / "bundle").mkdir()
    data.mkdir()
    (run / "last" / "training_state.json").write_text("{}")  # a run stopped before its end: it resumes
    plan = planned()
    assert "pod train" in plan and "--resume" in plan
    for i, path in enumerate(
        [data / "manifest.json", run / ".trained", run / "eval.json", run / "bundle" / "bundle.json"]
    ):
        path.write_text("{}")
        os.utime(path, (1_000_000 + i, 1_000_000 + i))
    plan = planned()
    assert "pod serve" in plan and not any(s in plan for s in ("data synth", "pod train", "pod evaluate", "pod export"))
    (run / "eval.json").unlink()
    plan = planned()
    assert "pod evaluate" in plan and "pod train" not in plan and "pod export" not in plan
