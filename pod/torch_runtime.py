"""The PyTorch runtime: the same encoder and decoder-step graphs the ONNX export writes, run eagerly.

It knows the model and tensors, nothing of HTTP or of how beams are chosen: `start()` encodes a batch once
(cross-attention keys/values included, one copy per request) and returns a session whose `advance()` and
`project()` the beam search drives with NumPy arrays. Logits of only the requested columns, and the
log-normalizer, are computed on the model's device, so a GPU never ships a full vocabulary row to the host.
"""

from __future__ import annotations

import numpy as np
import torch

from pod.decoding import ProjectedSession
from pod.graphs import DecoderStepGraph, EncoderGraph
from pod.model import PODModel
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

    @torch.inference_mode()
    def project(
        self, hidden: torch.Tensor, columns: np.ndarray | None, normalizer: bool
    ) -> tuple[np.ndarray, np.ndarray | None]:
        weight = self.rt.model.t5.lm_head.weight
        if columns is not None and not normalizer:
            cols = torch.as_tensor(columns, device=hidden.device)
            return (hidden.to(weight.dtype) @ weight.index_select(0, cols).t()).float().cpu().numpy(), None
        full = (hidden.to(weight.dtype) @ weight.t()).float()
        lse = torch.logsumexp(full, dim=-1).cpu().numpy() if normalizer else None
        if columns is not None:
            full = full.index_select(1, torch.as_tensor(columns, device=full.device))
        return full.cpu().numpy(), lse


class TorchRuntime:
    def __init__(
        self, model: PODModel, tokenizer: Tokenizer, device: str | torch.device = "cpu", bf16: bool = False
    ) -> None:
        self.model = model.to(device).eval()
        self.tokenizer = tokenizer
        self.topn_history = model.config.topn_history
        self.user_ids = model.config.user_ids
        self.device = torch.device(device)
        self.bf16 = bf16 and self.device.type == "cuda"
        self.decoder = DecoderStepGraph(self.model).eval()
        self._encoders: dict[tuple[str, bool], EncoderGraph] = {}

    def autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16)

    @torch.inference_mode()
    def start(self, task: str, texts: list[str], use_prompts: bool = True) -> TorchSession:
        """Encode once per request; every beam of a request shares its cross-attention keys/values (the
        session serves any number of rows per request)."""
        key = (task, use_prompts)
        if key not in self._encoders:
            self._encoders[key] = EncoderGraph(self.model, task, use_prompts).eval()
        batch = {k: v.to(self.device) for k, v in encode_batch(self.tokenizer, texts).items()}
        with self.autocast():
            cross_kv, mask = self._encoders[key](batch["input_ids"], batch["whole_word_ids"], batch["attention_mask"])
        return TorchSession(self, cross_kv, mask)
