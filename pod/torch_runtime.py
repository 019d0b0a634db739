"""The PyTorch runtime: the same encoder and decoder-step graphs the ONNX export writes, run eagerly.

It knows the model and tensors, nothing of HTTP or of how beams are chosen: `start()` encodes a batch once
(cross-attention keys/values included, one copy per request) and returns a session whose `advance()` and
`project()` the beam search drives with NumPy arrays. Logits of only the requested columns, and the
log-normalizer, are computed on the model's device, so a GPU never ships a full vocabulary row to the host.

`TorchRuntime(..., static=True)` (off by default) runs the same computation on fixed shapes and preallocated
buffers (`pod.static_graphs`: inputs padded to length / batch / rows buckets, a static KV cache updated in place)
and, on CUDA, replays it as CUDA graphs (`pod.cuda_graphs`), for batch-1 latency; its sessions
(`StaticSession`) offer the same interface.
"""

from __future__ import annotations

import numpy as np
import torch

from pod import device_search
from pod.cuda_graphs import CudaGraphRunner
from pod.decoding import Constraint, Hypothesis, ProjectedSession, Trie
from pod.graphs import DecoderStepGraph, EncoderGraph
from pod.model import PODModel
from pod.static_graphs import StaticDecode, StaticRunner
from pod.tokenization import Tokenizer


def encode_batch(tokenizer: Tokenizer, texts: list[str]) -> dict[str, torch.Tensor]:
    """Padded encoder inputs (ids, whole-word ids, mask) as tensors."""
    return {k: torch.from_numpy(v) for k, v in tokenizer.encode_batch(texts).items()}


class TorchSession(ProjectedSession):
    def __init__(self, rt: TorchRuntime, cross_kv: torch.Tensor, mask: torch.Tensor) -> None:
        self.rt, self.cross_kv, self.mask = rt, cross_kv, mask
        self.past: torch.Tensor | None = None

    @torch.inference_mode()
    def advance(self, tokens: np.ndarray, parents: np.ndarray | None) -> torch.Tensor:
        device = self.cross_kv.device
        if self.past is None or parents is None:
            layers, _, _, heads, _, d_kv = self.cross_kv.shape
            self.past = self.cross_kv.new_zeros(layers, 2, len(tokens), heads, 0, d_kv)
        else:
            self.past = self.past.index_select(2, torch.as_tensor(parents, device=device))
        with self.rt.autocast():
            hidden, self.past = self.rt.decoder(
                torch.as_tensor(tokens, device=device), self.mask, self.cross_kv, self.past
            )
        return hidden

    def _logits(
        self, hidden: torch.Tensor, columns: np.ndarray | None, normalizer: bool
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """On the device: float32 logits of `columns` (all when None) and, when asked, the whole vocabulary's
        log-normalizer (only then is the full projection computed)."""
        weight = self.rt.model.t5.lm_head.weight
        if columns is not None and not normalizer:
            cols = torch.as_tensor(columns, device=hidden.device)
            return (hidden.to(weight.dtype) @ weight.index_select(0, cols).t()).float(), None
        full = (hidden.to(weight.dtype) @ weight.t()).float()
        lse = torch.logsumexp(full, dim=-1) if normalizer else None
        if columns is not None:
            full = full.index_select(1, torch.as_tensor(columns, device=full.device))
        return full, lse

    @torch.inference_mode()
    def project(
        self, hidden: torch.Tensor, columns: np.ndarray | None, normalizer: bool
    ) -> tuple[np.ndarray, np.ndarray | None]:
        logits, lse = self._logits(hidden, columns, normalizer)
        return logits.cpu().numpy(), (lse.cpu().numpy() if lse is not None else None)

    @torch.inference_mode()
    def step_top(self, tokens: np.ndarray, parents: np.ndarray | None, k: int) -> tuple[np.ndarray, np.ndarray]:
        """One decoder step's `k` best tokens per row (log-probabilities over the whole vocabulary, token ids),
        chosen on the device: one small read-back instead of a `rows x vocabulary` one (see `beam_search`)."""
        logits, lse = self._logits(self.advance(tokens, parents), None, True)
        vals, ids = torch.topk(logits, min(k, logits.shape[1]), dim=1)
        both = torch.cat([vals - lse[:, None], ids.float()], dim=1).cpu().numpy()  # ids < 2^24: exact in fp32
        return both[:, : ids.shape[1]], both[:, ids.shape[1] :].astype(np.int64)

    @torch.inference_mode()
    def top_columns(
        self, tokens: np.ndarray, columns: np.ndarray, sets: list[np.ndarray], keep: bool, k: int, exact: bool
    ) -> tuple[np.ndarray, np.ndarray]:
        """`pod.decoding.top_columns` on the model's device, fed by one decoder step: the masking, the
        normalization and the top-k never leave it, and one `(rows, k)` pair of arrays comes back."""
        hidden = self.advance(tokens, None)
        dev = hidden.device
        logits, norm = self._logits(hidden, columns, exact)
        rows, n = logits.shape
        lens = [len(s) for s in sets]
        where_rows = torch.repeat_interleave(torch.arange(rows, device=dev), torch.as_tensor(lens, device=dev))
        where_cols = torch.as_tensor(np.concatenate(sets) if sum(lens) else np.zeros(0, np.int64), device=dev)
        if keep:
            scores = torch.full_like(logits, float("-inf"))
            scores[where_rows, where_cols] = logits[where_rows, where_cols]
        else:
            scores = logits.index_put((where_rows, where_cols), torch.tensor(float("-inf"), device=dev))
        if not exact:  # renormalized over each row's allowed columns
            norm = torch.logsumexp(scores, dim=-1)
        scores = scores - norm[:, None]
        m = min(n, k + 8)  # a few spare, so ties at the cut are ordered as the reference orders them
        top_scores, top_idx = torch.topk(scores, m, dim=1)
        top_scores, top_idx = top_scores.cpu().numpy(), top_idx.cpu().numpy()
        order = np.lexsort((top_idx, -top_scores), axis=-1)[:, :k]  # best first, ties to the lower column
        out = np.take_along_axis(top_scores, order, axis=1)
        idx = np.where(np.isfinite(out), np.take_along_axis(top_idx, order, axis=1), -1)
        if m < k:  # fewer columns than asked
            out = np.pad(out, ((0, 0), (0, k - m)), constant_values=-np.inf)
            idx = np.pad(idx, ((0, 0), (0, k - m)), constant_values=-1)
        return idx, out.astype(np.float32)

    def constrained_search(
        self,
        trie: Trie,
        constraints: list[Constraint],
        num_beams: int,
        max_new_tokens: int,
        eos_id: int,
        normalize: str = "exact",
        start_id: int = 0,
    ) -> list[list[Hypothesis]]:
        """`pod.decoding.beam_search` (one group, `length_penalty=0`, every row constrained) on the model's device
        (`pod.device_search`): the trie lives there as tensors, no decoder step waits on the host, and the
        finished items come back once at the end. `trie` is the catalog's (its tables are cached per device);
        a row's constraint may be on it or on a part of it (a top-N job's candidates)."""
        return device_search.beam_search(
            self.advance,
            self._logits,
            self.cross_kv.device,
            trie,
            constraints,
            num_beams,
            max_new_tokens,
            eos_id,
            start_id,
            normalize,
        )


class StaticSession(TorchSession):
    """A `TorchSession` whose decoder steps run on a runner's static buffers (`pod.static_graphs.StaticDecode`):
    the same `advance` contract (rows request-major, any count per call, `parents` None restarts), and what it
    returns is read before the next `advance` (it may be a view of the step's output buffer). Only the newest
    session of a runtime may advance (the buffers are shared); projection, `top_columns` and
    `constrained_search` are `TorchSession`'s."""

    def __init__(self, rt: TorchRuntime, decode: StaticDecode) -> None:
        super().__init__(rt, decode.source.cross_kv, decode.source.mask)
        self.decode = decode

    def advance(self, tokens: np.ndarray | torch.Tensor, parents: np.ndarray | torch.Tensor | None) -> torch.Tensor:
        return self.decode.advance(tokens, parents)  # in inference mode, as TorchSession.advance


class TorchRuntime:
    def __init__(
        self,
        model: PODModel,
        tokenizer: Tokenizer,
        device: str | torch.device = "cpu",
        bf16: bool = False,
        static: bool = False,
        cuda_graphs: bool = True,
    ) -> None:
        """`static`: fixed-shape buffers (`pod.static_graphs`), captured as CUDA graphs on a CUDA device unless
        `cuda_graphs` is False (static shapes alone, to tell the two effects apart); off: the eager graphs."""
        self.model = model.to(device).eval()
        self.tokenizer = tokenizer
        self.topn_history = model.config.topn_history
        self.user_ids = model.config.user_ids
        self.tasks = model.config.trained_tasks  # what it can answer: the tasks training taught
        self.device = torch.device(device)
        self.bf16 = bf16 and self.device.type == "cuda"
        self.decoder = DecoderStepGraph(self.model).eval()
        self._encoders: dict[tuple[str, bool], EncoderGraph] = {}
        self.runner: StaticRunner | None = None
        if static:
            self.runner = CudaGraphRunner(self.model, self.bf16) if cuda_graphs else StaticRunner(self.model, self.bf16)

    def autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16)

    @torch.inference_mode()
    def start(self, task: str, texts: list[str], use_prompts: bool = True) -> TorchSession:
        """Encode once per request; every beam of a request shares its cross-attention keys/values (the
        session serves any number of rows per request)."""
        if self.runner is not None:
            arrays = self.tokenizer.encode_batch(texts)
            decode = self.runner.start(
                task, use_prompts, arrays["input_ids"], arrays["whole_word_ids"], arrays["attention_mask"]
            )
            return StaticSession(self, decode)
        key = (task, use_prompts)
        if key not in self._encoders:
            self._encoders[key] = EncoderGraph(self.model, task, use_prompts).eval()
        batch = {k: v.to(self.device) for k, v in encode_batch(self.tokenizer, texts).items()}
        with self.autocast():
            cross_kv, mask = self._encoders[key](batch["input_ids"], batch["whole_word_ids"], batch["attention_mask"])
        return TorchSession(self, cross_kv, mask)


class StepOnlySession(ProjectedSession):
    """A session's decoder step and projection only (no `top_columns`, no `constrained_search`)."""

    def __init__(self, session: ProjectedSession) -> None:
        self.advance, self.project = session.advance, session.project


class HostSearch:
    """The same runtime whose sessions offer only the decoder step, so a recommender on it runs the NumPy search
    on the host (the reference, as for ONNX): what the device search is tested and timed against."""

    def __init__(self, rt: TorchRuntime) -> None:
        self.rt, self.tokenizer, self.topn_history, self.user_ids = rt, rt.tokenizer, rt.topn_history, rt.user_ids
        self.tasks = rt.tasks

    def start(self, task: str, texts: list[str]) -> StepOnlySession:
        return StepOnlySession(self.rt.start(task, texts))
