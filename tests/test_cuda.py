"""The GPU path, run where a GPU is (skipped elsewhere): train on CUDA, then rank on CUDA as on the CPU.

The meta-device tests (`test_devices.py`) catch device mix-ups on a CPU-only machine; this file is the proof
that the real thing runs: `benchmarks/gpu_session.sh` runs it on the lent GPU machine. Every item-id mode
trains a few steps on CUDA (fp32, as `pod train` does by default; the digits run in the opt-in bf16 autocast),
and the same weights then rank the same users through the PyTorch runtime on the CPU (fp32, the reference) and
on CUDA, fp32 and bf16. fp32 lists must agree up to float ties; bf16 rounds scores to ~3 significant digits, so
only its top item is compared.
"""

from __future__ import annotations

import os

import pytest
import torch

from export.export import parity_jobs, ranked_lists, same_up_to_ties
from pod.dataset import PreparedData
from pod.model import load_checkpoint
from pod.recommender import Catalog, ExplainJob, Recommender
from pod.torch_runtime import TorchRuntime
from training.train import TrainConfig, train

# POD_TEST_DEVICE=cpu proves this file's logic on a CPU-only machine (CPU against itself)
DEVICE = os.environ.get("POD_TEST_DEVICE", "cuda")
pytestmark = pytest.mark.skipif(DEVICE == "cuda" and not torch.cuda.is_available(), reason="needs a CUDA GPU")

TOL = 1e-3  # the export's SCORE_TOLERANCE: fp32 on two devices differs by float rounding only


@pytest.fixture(scope="module", params=["token", "digits", "collaborative", "semantic"])
def cuda_run(request, tmp_path_factory):
    from training.data.synth import write_synthetic

    root = tmp_path_factory.mktemp(request.param)
    write_synthetic(root / "data", users=200, items=120, seed=3, item_ids=request.param)
    cfg = TrainConfig(
        data=str(root / "data"),
        out=str(root / "run"),
        item_ids=request.param,
        epochs=1,
        max_steps=30,
        batch_size=32,
        lr=1e-3,
        val_limit=20,
        device=DEVICE,
        precision="bf16" if request.param == "digits" else "auto",
        progress=False,
    )
    train(cfg)
    return root


def recommender(run, data, device: str, bf16: bool = False) -> Recommender:
    model, tokenizer, _ = load_checkpoint(run / "run", device)
    return Recommender(TorchRuntime(model, tokenizer, device, bf16=bf16), Catalog.from_prepared(data, tokenizer))


@pytest.mark.parametrize("task", ["sequential", "topn"])
def test_cuda_ranks_like_the_cpu(cuda_run, task):
    data = PreparedData.load(cuda_run / "data")
    users = data.users[:24]
    jobs = parity_jobs(data, users, task, 10)
    cpu = ranked_lists(recommender(cuda_run, data, "cpu"), task, jobs)
    gpu = ranked_lists(recommender(cuda_run, data, DEVICE), task, jobs)
    problems = [why for a, b in zip(cpu, gpu) if (why := same_up_to_ties(a, b, TOL))]
    assert not problems, problems[:3]
    bf16 = ranked_lists(recommender(cuda_run, data, DEVICE, bf16=True), task, jobs)
    same_top = sum(a[0][0] == b[0][0] for a, b in zip(cpu, bf16) if a and b) / len(jobs)
    assert same_top >= 0.5, f"bf16 agrees with fp32 on the top item for only {same_top:.0%} of users"


def test_cuda_explains(cuda_run):
    data = PreparedData.load(cuda_run / "data")
    records = data.explanations["test"][:4]
    if not records:
        pytest.skip("no explanation records")
    jobs = [ExplainJob(r["user"], r["item"], 12) for r in records]
    out = recommender(cuda_run, data, DEVICE).explain(jobs)
    assert len(out) == len(jobs) and all(e.tokens > 0 for e in out)
