"""Training state (optimizer, scheduler, RNG, position) in safe formats: safetensors plus JSON.

`torch.save` would pickle; we flatten the optimizer's tensors into one safetensors file and keep every
non-tensor part as JSON, so a resumed run can be loaded without unpickling anything.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

STATE_TENSORS = "training_state.safetensors"
STATE_JSON = "training_state.json"


def _split_optimizer(sd: dict) -> tuple[dict[str, torch.Tensor], dict]:
    tensors, scalars = {}, {}
    for idx, slots in sd["state"].items():
        for key, value in slots.items():
            if torch.is_tensor(value):
                tensors[f"optimizer.{idx}.{key}"] = value.detach().contiguous().cpu()
            else:
                scalars[f"{idx}.{key}"] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def _join_optimizer(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[int, dict] = {}
    for name, value in tensors.items():
        if name.startswith("optimizer."):
            _, idx, key = name.split(".", 2)
            state.setdefault(int(idx), {})[key] = value
    for name, value in meta["scalars"].items():
        idx, key = name.split(".", 1)
        state.setdefault(int(idx), {})[key] = value
    return {"state": state, "param_groups": meta["param_groups"]}


def write_state(directory: Path, optimizer, scheduler, progress: dict) -> None:
    """Write optimizer/scheduler/RNG state and the loop position (`progress`) into a checkpoint dir."""
    tensors, opt_meta = _split_optimizer(optimizer.state_dict())
    tensors["rng.torch"] = torch.get_rng_state()
    if torch.cuda.is_available():
        for k, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{k}"] = s
    save_file(tensors, str(directory / STATE_TENSORS))
    sched = {k: v for k, v in scheduler.state_dict().items() if k != "lr_lambdas"}
    py_state = random.getstate()
    meta = {
        "optimizer": opt_meta,
        "scheduler": sched,
        "python_rng": [py_state[0], list(py_state[1]), py_state[2]],
        "progress": progress,
    }
    (directory / STATE_JSON).write_text(json.dumps(meta, indent=1))


def read_state(directory: Path, optimizer, scheduler) -> dict:
    """Restore optimizer/scheduler/RNG from a checkpoint dir; returns the saved loop position."""
    tensors = load_file(str(directory / STATE_TENSORS))
    meta = json.loads((directory / STATE_JSON).read_text())
    optimizer.load_state_dict(_join_optimizer(tensors, meta["optimizer"]))
    scheduler.load_state_dict({**meta["scheduler"], "lr_lambdas": [None] * len(optimizer.param_groups)})
    torch.set_rng_state(tensors["rng.torch"])
    cuda_states = [tensors[k] for k in sorted(t for t in tensors if t.startswith("rng.cuda."))]
    if cuda_states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda_states[: torch.cuda.device_count()])
    v, state, gauss = meta["python_rng"]
    random.setstate((v, tuple(state), gauss))
    return meta["progress"]
