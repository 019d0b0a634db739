"""The ONNX Runtime path: bundle encoders and the decoder step behind `pod.decoding`'s session interface.

No torch import: a slim serving install needs only onnxruntime, numpy and sentencepiece. The CUDA provider
is used when onnxruntime-gpu offers it, the CPU provider otherwise (or as configured); the choice is logged.
"""

from __future__ import annotations

import logging

import numpy as np
import onnxruntime as ort

from pod.bundle import Bundle
from pod.tokenization import Tokenizer

log = logging.getLogger("pod.onnx")


def pick_providers(requested: str = "auto") -> list[str]:
    available = ort.get_available_providers()
    if requested == "auto":
        return [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]
    names = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}
    want = names.get(requested, requested)
    if want not in available:
        raise ValueError(f"ONNX Runtime provider {want} is not available here (available: {', '.join(available)})")
    return [want]


class OnnxSession:
    def __init__(self, runtime: OnnxRuntime, cross_kv: np.ndarray, mask: np.ndarray, num_beams: int) -> None:
        self.rt = runtime
        self.cross_kv, self.mask = cross_kv, mask
        b = mask.shape[0]
        self.request_index = np.repeat(np.arange(b, dtype=np.int64), num_beams)
        layers, _, _, heads, _, d_kv = cross_kv.shape
        self.past = np.zeros((layers, 2, b * num_beams, heads, 0, d_kv), dtype=cross_kv.dtype)

    def step(self, tokens: np.ndarray, parents: np.ndarray | None) -> np.ndarray:
        if parents is not None:
            self.past = self.past[:, :, parents]
        logits, self.past = self.rt.decoder.run(
            None,
            {
                "tokens": tokens.astype(np.int64),
                "request_index": self.request_index,
                "encoder_mask": self.mask,
                "cross_kv": self.cross_kv,
                "past_kv": self.past,
            },
        )
        return logits


class OnnxRuntime:
    def __init__(self, bundle: Bundle, provider: str = "auto", threads: int = 0) -> None:
        self.bundle = bundle
        self.tokenizer = Tokenizer(bundle.path("spiece.model"), bundle.manifest["model"]["whole_word_size"])
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads:
            opts.intra_op_num_threads = threads
        self.providers = pick_providers(provider)
        log.info("ONNX Runtime providers: %s", ", ".join(self.providers))

        def session(name: str) -> ort.InferenceSession:
            return ort.InferenceSession(str(bundle.path(name)), opts, providers=self.providers)

        self.encoders = {t: session(f"encoder_{t}.onnx") for t in bundle.manifest["tasks"]}
        self.decoder = session("decoder_step.onnx")

    def start(self, task: str, texts: list[str], num_beams: int) -> OnnxSession:
        """Encode once per request (cross-attention keys/values included); beams share them."""
        if task not in self.encoders:
            raise ValueError(f"this bundle has no {task!r} encoder (tasks: {', '.join(self.encoders)})")
        cross_kv, mask = self.encoders[task].run(None, self.tokenizer.encode_batch(texts))
        return OnnxSession(self, cross_kv, mask, num_beams)
