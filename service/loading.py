"""Start-up: the settings' runtime (ONNX bundle or PyTorch checkpoint) behind one `Recommender`.

Each runtime's imports happen inside its branch, so the ONNX image (no torch installed) never imports torch;
a damaged bundle fails here, in the lifespan, before the server reports ready.
"""

from __future__ import annotations

from pod.recommender import Catalog, DecodingConfig, Recommender
from service.settings import ServeSettings


def load_recommender(settings: ServeSettings) -> tuple[Recommender, str]:
    """The recommender the settings ask for, and the model label every response carries (runtime, precision,
    and for a bundle the checkpoint's hash, so an answer can be traced to the weights that gave it)."""
    if settings.runtime == "torch":
        if not settings.checkpoint:
            raise ValueError("--runtime torch needs --checkpoint")
        import torch

        from pod.dataset import PreparedData
        from pod.model import load_checkpoint
        from pod.torch_runtime import TorchRuntime

        device = (
            "cuda"
            if settings.device == "auto" and torch.cuda.is_available()
            else ("cpu" if settings.device == "auto" else settings.device)
        )
        model, tokenizer, meta = load_checkpoint(settings.checkpoint, device)
        data = PreparedData.load(meta["train_config"]["data"])
        runtime = TorchRuntime(model, tokenizer, device, bf16=device == "cuda")
        catalog = Catalog.from_prepared(data, tokenizer)
        label = f"pod-torch-{device}"
    else:
        if not settings.bundle:
            raise ValueError("the ONNX runtime needs --bundle (a directory written by `pod export`)")
        from pod.bundle import Bundle
        from pod.onnx_runtime import OnnxRuntime

        bundle = Bundle.load(settings.bundle)
        runtime = OnnxRuntime(bundle, settings.provider, settings.threads)
        catalog = Catalog.from_bundle(bundle)
        m = bundle.manifest
        label = f"pod-onnx-{m['quantization'] if m['quantization'] != 'none' else m['dtype']}"
        label += f"@{m['source_checkpoint']['sha256'][:12]}"
    config = DecodingConfig.of(settings)
    return Recommender(runtime, catalog, config), label
