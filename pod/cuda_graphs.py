"""CUDA graphs of the static encoder and decoder step (`pod.static_graphs`): one launch per encoder pass and per
decoder step at batch 1, where the eager path dispatches a few hundred operations from Python (t5-small shape,
counted on the CPU: about 350 aten calls per encoder pass and 480 per decoder step, views included),
most of them a kernel launch on a GPU (issue 15, item 2).

`CudaGraphRunner` is `StaticRunner` plus capture: when a shape's module is first created (an encoder per task,
batch bucket and length bucket; a decoder step per batch, source, rows-per-request and slots bucket, twice: one
graph per cache half it reads), it is warmed up on a side stream and captured with `torch.cuda.graph`, before
its buffers hold any session's data (warm-up writes them; the position is reset before each warm-up run, so it
stays within the slots). Later runs copy inputs into the static buffers (`StaticEncoder.load`,
`StaticDecoderStep.load`, eager) and replay. Elsewhere (CPU, meta), or for batches above `max_graph_batch`
(large batches are not launch-bound, and a graph per big shape costs memory), it runs the same modules eagerly.

Why capture is possible here: the static modules read no device value on the host (tests/test_static_graphs.py
checks that on the CPU: no `.item()`, no data-dependent shape), and every tensor they use is a buffer of fixed
address. One host read remains inside transformers: for a model with full attention, its mask helper tests
`padding_mask.all()` to drop an all-ones mask, and skips that test while a CUDA stream is capturing
(`transformers.utils.import_utils.is_tracing`), so the captured encoder always applies the mask; the warm-up
runs (not capturing) do read it, which is harmless. Causal-history models pass a prepared 4-D mask and never
reach it. Autocast (bf16) runs with its weight-cast cache off, so a graph recomputes the casts it captured.

What has run: nothing on CUDA yet (no GPU in the session that wrote this). On the CPU, this class falls back to
the eager static modules, which the tests prove equal to `EncoderGraph` / `DecoderStepGraph` (fp32, 1e-5)
and which the recommender tests run end to end. What waits for a GPU: that capture succeeds (the transformers
encoder under capture in particular) and that replays equal eager runs (the CUDA case of
tests/test_static_graphs.py, skipped without a GPU), and the batch-1 latency (`benchmarks/runtime_latency.py
--static`, first in the `speed` stage of `benchmarks/gpu_session.sh`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from pod.model import PODModel
from pod.static_graphs import StaticDecoderStep, StaticEncoder, StaticRunner


class CudaGraphRunner(StaticRunner):
    def __init__(self, model: PODModel, bf16: bool = False, warmup: int = 2, max_graph_batch: int = 16) -> None:
        super().__init__(model, bf16)
        self.capturing = self.device.type == "cuda"
        self.warmup, self.max_graph_batch = warmup, max_graph_batch
        self.graphs: dict[tuple[int, int], torch.cuda.CUDAGraph] = {}  # (id of the module, cache half) -> graph
        self.stream = torch.cuda.Stream(self.device) if self.capturing else None  # warm-up and capture

    def _graphed(self, batch: int) -> bool:
        return self.capturing and batch <= self.max_graph_batch

    def _capture(self, run: Callable[[], None], reset: Callable[[], None] | None = None) -> torch.cuda.CUDAGraph:
        """Warm `run` up on the side stream (cuBLAS handles and workspaces are made there, outside capture),
        then capture it on the same stream."""
        side = self.stream
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(self.warmup):
                if reset is not None:
                    reset()
                run()
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=side):
            run()
        return graph

    @torch.inference_mode()
    def prepare_encoder(self, enc: StaticEncoder) -> None:
        if self._graphed(enc.source.batch):
            self.graphs[(id(enc), 0)] = self._capture(lambda: StaticRunner.run_encoder(self, enc))

    @torch.inference_mode()
    def prepare_step(self, step: StaticDecoderStep) -> None:
        if self._graphed(step.batch):
            for src in (0, 1):
                self.graphs[(id(step), src)] = self._capture(
                    lambda src=src: StaticRunner.run_step(self, step, src), step.pos.zero_
                )

    def run_encoder(self, enc: StaticEncoder) -> None:
        graph = self.graphs.get((id(enc), 0))
        if graph is None:
            super().run_encoder(enc)
        else:
            graph.replay()

    def run_step(self, step: StaticDecoderStep, src: int) -> None:
        graph = self.graphs.get((id(step), src))
        if graph is None:
            super().run_step(step, src)
        else:
            graph.replay()
