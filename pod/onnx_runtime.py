"""The ONNX Runtime path: bundle encoders, decoder step and output projection behind `pod.decoding`'s session.

No torch import: a slim serving install needs only onnxruntime, numpy and sentencepiece. The CUDA provider
is used when onnxruntime-gpu offers it, the CPU provider otherwise (or as configured); the choice is logged.
"""

from __future__ import annotations

import logging

import numpy as np
import onnxruntime as ort

from pod.bundle import Bundle
from pod.decoding import ProjectedSession, logsumexp
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


class OnnxSession(ProjectedSession):
    def __init__(self, runtime: OnnxRuntime, cross_kv: np.ndarray, mask: np.ndarray) -> None:
        self.rt = runtime
        self.cross_kv, self.mask = cross_kv, mask
        self.past: np.ndarray | None = None

    def advance(self, tokens: np.ndarray, parents: np.ndarray | None) -> np.ndarray:
        if self.past is None or parents is None:
            layers, _, _, heads, _, d_kv = self.cross_kv.shape
            self.past = np.zeros((layers, 2, len(tokens), heads, 0, d_kv), dtype=self.cross_kv.dtype)
        else:
            self.past = self.past[:, :, parents]
        hidden, self.past = self.rt.decoder.run(
            None,
            {
                "tokens": tokens.astype(np.int64, copy=False),
                "encoder_mask": self.mask,
                "cross_kv": self.cross_kv,
                "past_kv": self.past,
            },
        )
        return hidden

    def project(
        self, hidden: np.ndarray, columns: np.ndarray | None, normalizer: bool
    ) -> tuple[np.ndarray, np.ndarray | None]:
        if columns is not None and not normalizer:
            return self.rt.output_columns.run(None, {"hidden": hidden, "columns": columns})[0], None
        full = self.rt.output_full.run(None, {"hidden": hidden})[0]
        return (full if columns is None else full[:, columns]), (logsumexp(full) if normalizer else None)


class OnnxRuntime:
    def __init__(self, bundle: Bundle, provider: str = "auto", threads: int = 0) -> None:
        self.bundle = bundle
        self.tokenizer = Tokenizer.load(bundle.root, bundle.manifest["model"]["whole_word_size"])
        self.topn_history = bool(bundle.manifest.get("topn_history", False))
        self.user_ids = bool(bundle.manifest.get("user_ids", True))
        self.tasks = list(bundle.manifest.get("trained", bundle.manifest["tasks"]))  # the tasks training taught
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads:
            opts.intra_op_num_threads = threads
        # Idle intra-op threads sleep instead of spinning: a server shares its cores with the HTTP loop, the
        # batcher and often other processes, and spinning threads then starve them (measured on 2 cores with
        # one other busy process: t5-small encoder 118 ms spinning vs 57 ms not; 54 ms on 1 thread).
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.providers = pick_providers(provider)
        log.info("ONNX Runtime providers: %s", ", ".join(self.providers))

        def session(name: str) -> ort.InferenceSession:
            return ort.InferenceSession(str(bundle.path(name)), opts, providers=self.providers)

        self.encoders = {t: session(f"encoder_{t}.onnx") for t in bundle.manifest["tasks"]}
        self.decoder = session("decoder_step.onnx")
        self.output_columns = session("output_columns.onnx")
        self.output_full = session("output_full.onnx")

    def start(self, task: str, texts: list[str]) -> OnnxSession:
        """Encode once per request (cross-attention keys/values included); beams share them (the session
        serves any number of rows per request)."""
        if task not in self.encoders:
            raise ValueError(f"this bundle has no {task!r} encoder (tasks: {', '.join(self.encoders)})")
        cross_kv, mask = self.encoders[task].run(None, self.tokenizer.encode_batch(texts))
        return OnnxSession(self, cross_kv, mask)
