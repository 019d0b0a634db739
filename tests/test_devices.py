"""Device mix-ups, caught on a CPU-only machine.

A script proven on the CPU crashed on its first CUDA call: a tensor built on the CPU met GPU weights (issue
15). CPU runs cannot see that, because every tensor is on the CPU. Here the model lives on the `meta` device
and every operation is checked by a dispatch mode that refuses inputs on two devices (a 0-d CPU scalar
excepted, as PyTorch allows), so a CPU-built index beside meta weights fails the test as it would fail on CUDA.
"""

from __future__ import annotations

from unittest.mock import patch

import pytest
import torch
import torch.fx.experimental._config
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from pod.graphs import DecoderStepGraph, OutputGraph
from pod.model import PODConfig, PODModel, t5_config

META = torch.device("meta")


class OneDevice(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        devices = {
            t.device
            for t in tree_leaves((args, kwargs))
            if isinstance(t, torch.Tensor) and not (t.device.type == "cpu" and t.dim() == 0)
        }
        if len(devices) > 1:
            raise AssertionError(f"{func} mixes devices {sorted(map(str, devices))}")
        return func(*args, **kwargs)


@pytest.fixture(scope="module")
def meta_model() -> PODModel:
    with torch.device(META):
        return PODModel(PODConfig(t5=t5_config("tiny", 900)))


def test_the_checker_catches_a_cpu_index_beside_meta_weights(meta_model):
    with OneDevice(), pytest.raises(AssertionError, match="mixes devices"):
        meta_model.t5.get_input_embeddings()(torch.arange(3))


def test_decoder_step_and_output_graphs_stay_on_the_models_device(meta_model):
    cfg = meta_model.t5.config
    with OneDevice():
        step = DecoderStepGraph(meta_model)  # the relative-position table is built from the weights' device
        assert step.position_bias.device == META
        rows, batch, source = 4, 2, 7
        cross_kv = torch.zeros(cfg.num_decoder_layers, 2, batch, cfg.num_heads, source, cfg.d_kv, device=META)
        past = torch.zeros(cfg.num_decoder_layers, 2, rows, cfg.num_heads, 3, cfg.d_kv, device=META)
        mask = torch.ones(batch, source, dtype=torch.long, device=META)
        hidden, present = step(torch.ones(rows, dtype=torch.long, device=META), mask, cross_kv, past)
        assert hidden.device == META and present.shape[4] == 4
        logits = OutputGraph(meta_model)(hidden, torch.tensor([1, 5], device=META))
        assert logits.shape == (rows, 2)
        assert OutputGraph(meta_model, full=True)(hidden).shape == (rows, cfg.vocab_size)


def test_causal_history_encoder_and_next_item_loss_stay_on_the_models_device():
    """The causal masks (steps, per-row visibility, the decoder's own-row mask) are built at run time."""
    with torch.device(META):
        model = PODModel(PODConfig(t5=t5_config("tiny", 900), causal_items_from=800))
    batch, length, rows = 3, 9, 4
    x = dict(
        task_index=torch.tensor([0, 1, 0], device=META),
        input_ids=torch.zeros(batch, length, dtype=torch.long, device=META),
        whole_word_ids=torch.zeros(batch, length, dtype=torch.long, device=META),
        attention_mask=torch.ones(batch, length, dtype=torch.long, device=META),
    )
    with OneDevice():
        hidden, visible = model.encode(**x)
        assert hidden.device == META and visible.shape == (batch, length + model.config.num_prompts)
        # the loss keeps the rows with a target (a boolean index: data-dependent, so meta needs a shape rule)
        with patch.object(torch.fx.experimental._config, "meta_nonzero_assume_all_nonzero", True):
            loss = model(**x, next_items=torch.zeros(batch, rows, dtype=torch.long, device=META))
        assert loss.device == META
