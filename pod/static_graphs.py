"""The encoder and the decoder step of `pod.graphs` on fixed shapes and preallocated buffers (issue 15, item 2).

Why: at batch 1 the GPU path is launch-bound (on an H200, t5-small shape: encode 7.4 ms + one decoder step 6.2 ms,
for microseconds of arithmetic). A CUDA graph replays a whole encoder or decoder step as one launch, but only
over fixed shapes and fixed addresses: every input and output must live in a buffer that is allocated once and
written in place, and nothing may read a device value on the host. This module is that rewrite, device-agnostic
and runnable eagerly (CPU tests prove it equal to `EncoderGraph` / `DecoderStepGraph`); `pod.cuda_graphs`
captures and replays it on CUDA.

Buckets (powers of two, so few shapes are ever captured):
- batch: requests padded up to 1, 2, 4, 8, ... (padded requests: all-zero input, their rows never read);
- source length: the tokenized input padded up to 16, 32, 64, ... tokens (`bucket(n, LENGTH_BUCKET_MIN)`), the
  task's prompts in front; padded positions are masked (the encoder's mask, and the cross-attention mask the
  decoder reads), so a real position's state is the unpadded one up to float rounding. This holds for causal-
  history models too: `PODModel.encode` builds their mask from the padded `attention_mask` (a padded position
  is neither visible nor an item), so padding at the end changes no real position;
- rows per request (`w`, the live beams a search sends): padded up to 1, 2, 4, ...; a request's rows stay
  contiguous (request-major), so cross-attention keeps its one copy of keys/values per request;
- decoder steps: the self-attention cache holds 8, 16, ... `MAX_STEPS` slots; a decode that outgrows its
  bucket (or its rows bucket) moves once into the next one (one copy), so a session walks through a few keys.

Self-attention cache: `[2, layers, 2, rows, heads, steps, d_kv]`, two halves (ping-pong). Step t reads half
`src`, gathers it by `parents` into half `1 - src` (`index_select(..., out=)`: the beam reorder, one kernel),
writes the new key/value there at position `pos` (a 0-d device tensor, `index_copy_`, so a captured graph is
valid at every step), attends over all slots with the slots after `pos` masked, and advances `pos` in place.
The relative position bias is looked up from `pos` too. Why a gather into a second buffer and not a per-row
index indirection (each row keeping, per position, which physical row holds its key): the gather moves the
whole cache once per step (t5-small, 8 slots: 0.2 MB in fp32 for batch 1's one row; 6 MB for 32 rows of 20
beams, read and written in a few microseconds at an H200's ~4.8 TB/s) and leaves a contiguous cache for the
attention matmuls; the indirection would save that copy only with an attention kernel that gathers as it
reads (paged attention), and in plain PyTorch it is the same gather plus an index bookkeeping per step. Two
halves rather than gather-then-copy-back: one memory pass instead of two, at the price of two captured graphs
per shape (one per direction).

Garbage in padded or not-yet-written slots is harmless only if it is finite (0 x NaN is NaN): every buffer
starts zeroed, and every later write is a model output or a valid index, so stale values are finite; masked
slots then carry exactly zero attention weight.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext

import numpy as np
import torch

from pod.graphs import MAX_STEPS, DecoderStepGraph, EncoderGraph, _rms
from pod.model import PODModel

LENGTH_BUCKET_MIN = 16  # shortest padded input (tokens, prompts excluded)
STEP_BUCKET_MIN = 8  # fewest self-attention cache slots: an item ID in any mode fits, an explanation grows twice


def bucket(n: int, smallest: int = 1) -> int:
    """The smallest power of two that is >= n and >= `smallest`."""
    return max(smallest, 1 << max(0, n - 1).bit_length())


def steps_bucket(n: int) -> int:
    """Cache slots for a decode of `n` tokens: a power of two from STEP_BUCKET_MIN, at most MAX_STEPS."""
    if n > MAX_STEPS:
        raise ValueError(f"a decode of {n} tokens is longer than the position table ({MAX_STEPS})")
    return min(MAX_STEPS, bucket(n, STEP_BUCKET_MIN))


class SourceBuffers:
    """What the decoder reads of one encoder pass, for one (batch bucket, source bucket): every decoder layer's
    cross-attention keys/values `[layers, 2, batch, heads, source, d_kv]` and the mask `[batch, source]` (int64,
    0 at padding). Shared by every task's encoder of that shape and by the decoder steps that read it."""

    def __init__(self, model: PODModel, batch: int, source: int, dtype: torch.dtype) -> None:
        cfg = model.t5.config
        device = model.t5.get_input_embeddings().weight.device
        shape = (cfg.num_decoder_layers, 2, batch, cfg.num_heads, source, cfg.d_kv)
        self.cross_kv = torch.zeros(shape, dtype=dtype, device=device)
        self.mask = torch.zeros(batch, source, dtype=torch.long, device=device)

    @property
    def batch(self) -> int:
        return self.mask.shape[0]


class StaticEncoder:
    """`EncoderGraph` on inputs padded into a static buffer `[3, batch, length]` (ids, whole-word ids, mask),
    writing its outputs into a `SourceBuffers`. `load` fills the inputs (one host -> device copy from NumPy),
    `__call__` runs the encoder (what a CUDA graph captures: no argument, no host read of device values)."""

    def __init__(self, model: PODModel, task: str, use_prompts: bool, source: SourceBuffers) -> None:
        self.graph = EncoderGraph(model, task, use_prompts)
        self.source = source
        prompts = model.config.num_prompts if use_prompts else 0
        batch, width = source.mask.shape
        self.length = width - prompts
        self.inputs = torch.zeros(3, batch, self.length, dtype=torch.long, device=source.mask.device)

    def load(
        self,
        input_ids: np.ndarray | torch.Tensor,
        whole_word_ids: np.ndarray | torch.Tensor,
        attention_mask: np.ndarray | torch.Tensor,
    ) -> None:
        """Copy `[b, l]` inputs (b <= batch bucket, l <= length bucket) in, zero-padded (the mask 0 there)."""
        b, n = input_ids.shape
        batch = self.inputs.shape[1]
        if b > batch or n > self.length:
            raise ValueError(f"inputs {b} x {n} do not fit the buffer {batch} x {self.length}")
        if isinstance(input_ids, np.ndarray):  # padded on the host: one copy to the device
            packed = np.zeros(self.inputs.shape, dtype=np.int64)
            for k, a in enumerate((input_ids, whole_word_ids, attention_mask)):
                packed[k, :b, :n] = a
            self.inputs.copy_(torch.from_numpy(packed))
            return
        self.inputs.zero_()
        for k, a in enumerate((input_ids, whole_word_ids, attention_mask)):
            self.inputs[k, :b, :n].copy_(a)

    def __call__(self) -> None:
        cross_kv, mask = self.graph(self.inputs[0], self.inputs[1], self.inputs[2])
        self.source.cross_kv.copy_(cross_kv)
        self.source.mask.copy_(mask)


class StaticDecoderStep:
    """`DecoderStepGraph` on a preallocated self-attention cache: `batch x rows_per_request` rows (request-major)
    and `steps` slots, reading a `SourceBuffers`. Inputs `tokens` (rows,) and `parents` (rows,: the row of the
    previous step each row continues, as slot indices) and the position `pos` (0-d) are buffers written in
    place; `__call__(src)` reorders the cache from half `src` into half `1 - src`, runs one step, writes the
    final hidden states into `hidden` (rows, d_model; float32) and advances `pos`. See the module docstring."""

    def __init__(self, graph: DecoderStepGraph, source: SourceBuffers, rows_per_request: int, steps: int) -> None:
        cfg = graph.t5.config
        if steps > MAX_STEPS:
            raise ValueError(f"{steps} cache slots exceed the position table ({MAX_STEPS})")
        self.graph, self.source = graph, source
        self.batch, self.rows_per_request, self.steps = source.batch, rows_per_request, steps
        rows = self.batch * rows_per_request
        device, dtype = source.mask.device, source.cross_kv.dtype
        shape = (2, cfg.num_decoder_layers, 2, rows, cfg.num_heads, steps, cfg.d_kv)
        self.cache = torch.zeros(shape, dtype=dtype, device=device)
        self.tokens = torch.zeros(rows, dtype=torch.long, device=device)
        self.parents = torch.arange(rows, device=device)
        self.pos = torch.zeros((), dtype=torch.long, device=device)
        self.hidden = torch.zeros(rows, cfg.d_model, dtype=torch.float32, device=device)
        self.slots = torch.arange(steps, device=device)
        self._live: dict[tuple[int, int], tuple[np.ndarray, torch.Tensor]] = {}

    @property
    def rows(self) -> int:
        return self.tokens.shape[0]

    def live(self, batch: int, width: int) -> tuple[np.ndarray, torch.Tensor] | None:
        """The slots of `batch x width` live rows (row r -> request r // width, beam r % width), on the host and
        the device, cached; None when every slot is live (then rows and slots coincide)."""
        if batch == self.batch and width == self.rows_per_request:
            return None
        if (batch, width) not in self._live:
            slots = (np.arange(batch)[:, None] * self.rows_per_request + np.arange(width)[None, :]).reshape(-1)
            self._live[(batch, width)] = slots, torch.as_tensor(slots, device=self.tokens.device)
        return self._live[(batch, width)]

    def load(
        self,
        tokens: np.ndarray | torch.Tensor,
        parents: np.ndarray | torch.Tensor | None,
        batch: int,
        width: int,
        prev_width: int,
    ) -> torch.Tensor | None:
        """Write a step's inputs: `tokens` of `batch x width` live rows and `parents` (None: the first step; else
        each row's row in the previous call, of `prev_width` rows per request), mapped to slots. Slots that are
        not live get token 0 and their own slot from host arrays, and keep stale (valid) values from device
        tensors (no extra launch). Returns the live slots on the device (None: all of them)."""
        live = self.live(batch, width)
        w = self.rows_per_request
        if not isinstance(tokens, torch.Tensor):  # the host search: pad on the host, one copy each
            tok = np.zeros(self.rows, dtype=np.int64)
            tok[slice(None) if live is None else live[0]] = tokens
            self.tokens.copy_(torch.from_numpy(tok))
            if parents is not None:
                p = np.asarray(parents, dtype=np.int64)
                par = np.arange(self.rows, dtype=np.int64)
                par[slice(None) if live is None else live[0]] = (p // prev_width) * w + p % prev_width
                self.parents.copy_(torch.from_numpy(par))
            return None if live is None else live[1]
        # device tensors (pod.device_search): index arithmetic on the device, no host read
        if live is None:
            self.tokens.copy_(tokens)
        else:
            self.tokens.index_copy_(0, live[1], tokens)
        if parents is not None:
            slot = parents if prev_width == w else parents + (parents // prev_width) * (w - prev_width)
            if live is None:
                self.parents.copy_(slot)
            else:
                self.parents.index_copy_(0, live[1], slot)
        return None if live is None else live[1]

    def take(self, other: StaticDecoderStep, src: int) -> None:
        """Continue `other`'s decode here (more rows per request or more slots): copy its cache half `src` into
        half 0, each request's rows and each slot to the same (request, beam, slot), and its position."""
        layers, _, _, heads, steps, d_kv = other.cache.shape[1:]
        w = other.rows_per_request
        dst = self.cache[0].view(layers, 2, self.batch, self.rows_per_request, heads, self.steps, d_kv)
        dst[:, :, :, :w, :, :steps].copy_(other.cache[src].view(layers, 2, self.batch, w, heads, steps, d_kv))
        self.pos.copy_(other.pos)

    def __call__(self, src: int) -> None:
        g = self.graph
        dec = g.t5.get_decoder()
        heads, d_kv = g.heads, g.d_kv
        n, b, w = self.rows, self.batch, self.rows_per_request
        cache = self.cache[1 - src]
        torch.index_select(self.cache[src], 2, self.parents, out=cache)  # the beam reorder
        x = dec.embed_tokens(self.tokens).unsqueeze(1)  # [N, 1, d]
        bias = g.position_bias[(self.pos - self.slots).clamp(min=0)]  # [T, H]: query position minus key slots
        bias = bias.masked_fill((self.slots > self.pos)[:, None], torch.finfo(bias.dtype).min)  # not yet written
        self_bias = bias.t()[None, :, None, :]  # [1, H, 1, T]
        cross_bias = ((1.0 - self.source.mask.to(x.dtype)) * torch.finfo(x.dtype).min)[:, None, None, :]
        cross_kv = self.source.cross_kv
        at = self.pos.view(1)
        for i, block in enumerate(dec.block):
            sa = block.layer[0].SelfAttention
            h = _rms(block.layer[0].layer_norm, x)
            q = sa.q(h).view(n, 1, heads, d_kv).transpose(1, 2)
            k, v = cache[i, 0], cache[i, 1]  # [N, H, T, d_kv] views: written in place
            k.index_copy_(2, at, sa.k(h).view(n, 1, heads, d_kv).transpose(1, 2).to(k.dtype))
            v.index_copy_(2, at, sa.v(h).view(n, 1, heads, d_kv).transpose(1, 2).to(v.dtype))
            a = torch.softmax((q @ k.transpose(-1, -2) + self_bias).float(), dim=-1).to(q.dtype)
            x = x + sa.o((a @ v).transpose(1, 2).reshape(n, 1, -1))
            ca = block.layer[1].EncDecAttention
            h = _rms(block.layer[1].layer_norm, x)
            q = ca.q(h).view(b, w, heads, d_kv).transpose(1, 2)  # a request's beams are its queries
            a = torch.softmax((q @ cross_kv[i, 0].transpose(-1, -2) + cross_bias).float(), dim=-1).to(q.dtype)
            x = x + ca.o((a @ cross_kv[i, 1]).transpose(1, 2).reshape(n, 1, -1))
            ff = block.layer[2]
            x = x + ff.DenseReluDense(_rms(ff.layer_norm, x))
        x = _rms(dec.final_layer_norm, x)[:, 0]
        if g.scale_output:
            x = x * g.d_model**-0.5
        self.hidden.copy_(x)
        self.pos.add_(1)


class StaticDecode:
    """One session's decode through a runner's static steps: `advance(tokens, parents)` as
    `TorchSession.advance` (rows = batch x w request-major, w free to change per call; parents None restarts),
    returning the live rows' final hidden states (a view of the step's `hidden` buffer when every slot is live:
    read it before the next `advance`).

    Host bookkeeping only (ints: the step count, rows per request, the cache half): the position itself lives
    on the device, so the step never needs it from the host. A decode that outgrows its rows or slots bucket
    moves into a bigger step once (`StaticDecoderStep.take`)."""

    def __init__(self, runner: StaticRunner, source: SourceBuffers, batch: int, generation: int) -> None:
        self.runner, self.source, self.batch, self.generation = runner, source, batch, generation
        self.step: StaticDecoderStep | None = None
        self.src = 0  # the cache half that holds the decode so far
        self.t = 0  # tokens decoded so far (== the step's `pos`)
        self.width = 0  # rows per request of the last call

    @torch.inference_mode()
    def advance(self, tokens: np.ndarray | torch.Tensor, parents: np.ndarray | torch.Tensor | None) -> torch.Tensor:
        if self.generation != self.runner.generation:
            raise RuntimeError("a newer session started on this runtime's static buffers; this one is void")
        n = len(tokens)
        if n == 0 or n % self.batch:
            raise ValueError(f"{n} rows are not a multiple of the session's {self.batch} requests")
        w = n // self.batch
        if parents is None or self.step is None:
            step = self.runner.decoder_step(self.source, bucket(w), STEP_BUCKET_MIN)
            step.pos.zero_()
            self.t, self.src, parents = 0, 0, None
        else:
            step = self.step
            grown = (
                max(step.rows_per_request, bucket(w)),
                step.steps if self.t < step.steps else steps_bucket(self.t + 1),
            )
            if grown != (step.rows_per_request, step.steps):
                step = self.runner.decoder_step(self.source, *grown)
                step.take(self.step, self.src)
                self.src = 0
        live = step.load(tokens, parents, self.batch, w, self.width)
        self.runner.run_step(step, self.src)
        self.step, self.src, self.t, self.width = step, 1 - self.src, self.t + 1, w
        return step.hidden if live is None else step.hidden.index_select(0, live)


class StaticRunner:
    """The static encoders and decoder steps of one model, created per bucket on first use and kept, with their
    buffers; run eagerly (`pod.cuda_graphs.CudaGraphRunner` replays them as CUDA graphs).

    One live session at a time: the buffers are shared by every session of a shape (a captured graph reads
    fixed addresses), so `start` voids the sessions before it (their `advance` raises instead of reading another
    request's cache). `pod serve` runs every batch on one model thread (`service.batcher.Worker`), and the
    recommender finishes a session before it starts the next. `bf16`: autocast as `TorchRuntime(bf16=True)`,
    without its weight-cast cache (a graph must recompute the casts it captured, not read a cache freed after
    capture)."""

    def __init__(self, model: PODModel, bf16: bool = False) -> None:
        self.model = model
        weight = model.t5.get_input_embeddings().weight
        self.device = weight.device
        self.bf16 = bf16
        self.dtype = torch.bfloat16 if bf16 else weight.dtype
        self.step_graph = DecoderStepGraph(model).eval()
        self.num_prompts = model.config.num_prompts
        self.sources: dict[tuple[int, int], SourceBuffers] = {}
        self.encoders: dict[tuple[str, bool, int, int], StaticEncoder] = {}
        self.steps: dict[tuple[int, int, int, int], StaticDecoderStep] = {}
        self.generation = 0

    def autocast(self) -> AbstractContextManager:
        if not self.bf16:  # no context at all: torch has no autocast for some device types (meta)
            return nullcontext()
        return torch.autocast(self.device.type, dtype=torch.bfloat16, cache_enabled=False)

    def encoder(self, task: str, use_prompts: bool, batch: int, length: int) -> StaticEncoder:
        """The encoder of a (task, batch bucket, length bucket), with its buffers (created on first use)."""
        source = length + (self.num_prompts if use_prompts else 0)
        key = (task, use_prompts, batch, source)
        if key not in self.encoders:
            if (batch, source) not in self.sources:
                self.sources[(batch, source)] = SourceBuffers(self.model, batch, source, self.dtype)
            enc = StaticEncoder(self.model, task, use_prompts, self.sources[(batch, source)])
            self.encoders[key] = enc
            self.prepare_encoder(enc)
        return self.encoders[key]

    def decoder_step(self, source: SourceBuffers, rows_per_request: int, steps: int) -> StaticDecoderStep:
        """The decoder step of a (source buffers, rows bucket, slots bucket) (created on first use)."""
        key = (source.batch, source.mask.shape[1], rows_per_request, steps)
        if key not in self.steps:
            step = StaticDecoderStep(self.step_graph, source, rows_per_request, steps)
            self.steps[key] = step
            self.prepare_step(step)
        return self.steps[key]

    def prepare_encoder(self, enc: StaticEncoder) -> None:
        """Called once per new encoder, before its buffers hold anything (a CUDA runner captures here)."""

    def prepare_step(self, step: StaticDecoderStep) -> None:
        """Called once per new decoder step, before its buffers hold anything (a CUDA runner captures here)."""

    def run_encoder(self, enc: StaticEncoder) -> None:
        with self.autocast():
            enc()

    def run_step(self, step: StaticDecoderStep, src: int) -> None:
        with self.autocast():
            step(src)

    @torch.inference_mode()
    def start(
        self,
        task: str,
        use_prompts: bool,
        input_ids: np.ndarray | torch.Tensor,
        whole_word_ids: np.ndarray | torch.Tensor,
        attention_mask: np.ndarray | torch.Tensor,
    ) -> StaticDecode:
        """Encode a batch into its bucket's buffers; the returned decode reads them (and voids any earlier one)."""
        b, n = input_ids.shape
        enc = self.encoder(task, use_prompts, bucket(b), bucket(n, LENGTH_BUCKET_MIN))
        enc.load(input_ids, whole_word_ids, attention_mask)
        self.run_encoder(enc)
        self.generation += 1
        return StaticDecode(self, enc.source, b, self.generation)
