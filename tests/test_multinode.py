"""Multi-node training stays on torchrun: two launchers as two "nodes" on loopback (gloo), one process each.

Each node gets its own --out, as machines without shared storage would, and the vocabulary is passed with
--tokenizer (without it, rank 0 trains one into --out and the other ranks read it from there: --out must then
be shared). The run must come out as one world of 2: checkpoints only from global rank 0, the log saying
world 2, and each rank's half of the users giving 7 steps per epoch (one process alone would take 13).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from pod.dataset import PreparedData
from pod.model import load_checkpoint
from tests.conftest import ROOT
from training.train import TrainConfig, check_config, tokenizer_for

TIMEOUT_S = 300
STEPS_PER_EPOCH = 7  # 200 users, one sequential sample each, split over 2 ranks: ceil(100 / 16)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def vocabulary(small_synth, tmp_path_factory) -> Path:
    """The vocabulary a run on small_synth would train, made once so that both nodes read the same file."""
    out, data = tmp_path_factory.mktemp("vocab"), PreparedData.load(small_synth)
    tokenizer_for(check_config(TrainConfig(data=str(small_synth), out=str(out), tasks=["sequential"]), data), data, out)
    return out / "spiece.model"


def launch(node_flags: list[list[str]], data: Path, vocabulary: Path, outs: list[Path]) -> list[str]:
    """Start one torchrun per node, wait for all of them, and return their output; any failure kills the rest."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    train = [
        "-m", "cli.main", "train",
        "--data", str(data),
        "--preset", "tiny",
        "--tokenizer", str(vocabulary),
        "--tasks", "sequential",
        "--sequential-samples", "one",
        "--epochs", "1",
        "--max-steps", "20",
        "--batch-size", "16",
        "--val-limit", "20",
        "--log-every", "1",
        "--no-progress",
        "--device", "cpu",
    ]  # fmt: skip
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "torch.distributed.run", *flags, *train, "--out", str(out)],
            env=env,
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for flags, out in zip(node_flags, outs)
    ]
    outputs = []
    try:
        for proc in procs:
            outputs.append(proc.communicate(timeout=TIMEOUT_S)[0])
    except subprocess.TimeoutExpired:
        for proc in procs:
            proc.kill()
        outputs = [proc.communicate()[0] for proc in procs]
        pytest.fail("torchrun timed out:\n" + shown(outputs))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    codes = [proc.returncode for proc in procs]
    assert codes == [0, 0], f"exit codes {codes}:\n" + shown(outputs)
    return outputs


def shown(outputs: list[str]) -> str:
    return "\n".join(f"--- node {n} ---\n{text[-4000:]}" for n, text in enumerate(outputs))


def check_one_world_of_two(outs: list[Path], outputs: list[str]) -> None:
    """Exactly one node's --out holds the run (global rank 0's), and it is the run of a world of 2."""
    written = [out for out in outs if out.exists()]
    assert len(written) == 1, f"expected one run directory (global rank 0's), got {written}:\n" + shown(outputs)
    run = written[0]
    for name in ("best", "last"):
        model, tokenizer, meta = load_checkpoint(run / name)
        assert meta["format"] and model.config.tasks
    state = json.loads((run / "last" / "training_state.json").read_text())["progress"]
    assert state["global_step"] == STEPS_PER_EPOCH and state["epoch"] == 1, shown(outputs)
    records = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    steps = [r for r in records if r["event"] == "step"]
    assert [r["step"] for r in steps] == list(range(1, STEPS_PER_EPOCH + 1))
    assert {r["world"] for r in steps} == {2}
    assert records[-1]["event"] == "epoch" and records[-1]["best"]


def test_two_nodes_static_rendezvous(small_synth, vocabulary, tmp_path):
    """--nnodes 2 --node-rank N --master-addr --master-port: node 0 hosts the store and holds global rank 0."""
    port = str(free_port())
    outs = [tmp_path / "node0", tmp_path / "node1"]
    flags = [
        ["--nnodes", "2", "--nproc-per-node", "1", "--node-rank", str(node)]
        + ["--master-addr", "127.0.0.1", "--master-port", port]
        for node in (0, 1)
    ]
    outputs = launch(flags, small_synth, vocabulary, outs)
    check_one_world_of_two(outs, outputs)
    assert outs[0].exists() and not outs[1].exists()


def test_two_nodes_c10d_rendezvous(small_synth, vocabulary, tmp_path):
    """--rdzv-backend c10d --rdzv-endpoint HOST:PORT --rdzv-id ID: same command on every node, ranks by join order."""
    endpoint = f"127.0.0.1:{free_port()}"
    outs = [tmp_path / "node0", tmp_path / "node1"]
    flags = [
        ["--nnodes", "2", "--nproc-per-node", "1", "--rdzv-backend", "c10d", "--rdzv-endpoint", endpoint]
        + ["--rdzv-id", f"pod-test-{os.getpid()}", "--local-addr", "127.0.0.1"]
        for _ in (0, 1)
    ]
    outputs = launch(flags, small_synth, vocabulary, outs)
    check_one_world_of_two(outs, outputs)
