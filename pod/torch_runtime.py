"""The PyTorch runtime: encoder once per request, then decoder steps with a KV cache, for `pod.decoding`.

It knows the model and tensors, nothing of HTTP or of how beams are chosen: `start()` encodes a batch and
returns a session whose `step()` the beam search calls with NumPy arrays.
"""

from __future__ import annotations

import inspect

import numpy as np
import torch
from transformers import T5ForConditionalGeneration
from transformers.cache_utils import DynamicCache, EncoderDecoderCache

from pod.model import PODModel
from pod.tokenization import Tokenizer

# transformers 5.2x renamed the decoder's `past_key_values` argument to `cache`; accept both releases
_CACHE_ARG = (
    "cache" if "cache" in inspect.signature(T5ForConditionalGeneration.forward).parameters else ("past_key_values")
)


def encode_batch(tokenizer: Tokenizer, texts: list[str]) -> dict[str, torch.Tensor]:
    """Padded encoder inputs (ids, whole-word ids, mask) as tensors."""
    return {k: torch.from_numpy(v) for k, v in tokenizer.encode_batch(texts).items()}


class TorchSession:
    def __init__(self, model: PODModel, hidden: torch.Tensor, mask: torch.Tensor, autocast) -> None:
        self.model, self.hidden, self.mask, self.autocast = model, hidden, mask, autocast
        self.cache = EncoderDecoderCache(DynamicCache(), DynamicCache())

    @torch.inference_mode()
    def step(self, tokens: np.ndarray, parents: np.ndarray | None) -> np.ndarray:
        device = self.hidden.device
        if parents is not None:
            self.cache.reorder_cache(torch.as_tensor(parents, device=device))
        dec = torch.as_tensor(tokens, device=device).view(-1, 1)
        with self.autocast():
            out = self.model.t5(
                encoder_outputs=(self.hidden,),
                attention_mask=self.mask,
                decoder_input_ids=dec,
                use_cache=True,
                **{_CACHE_ARG: self.cache},
            )
        return out.logits[:, -1].float().cpu().numpy()


class TorchRuntime:
    def __init__(
        self, model: PODModel, tokenizer: Tokenizer, device: str | torch.device = "cpu", bf16: bool = False
    ) -> None:
        self.model = model.to(device).eval()
        self.tokenizer = tokenizer
        self.device = torch.device(device)
        self.bf16 = bf16 and self.device.type == "cuda"

    def autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.bf16)

    @torch.inference_mode()
    def start(self, task: str, texts: list[str], num_beams: int, use_prompts: bool = True) -> TorchSession:
        """Encode once per request; every beam of a row shares its encoder output."""
        batch = {k: v.to(self.device) for k, v in encode_batch(self.tokenizer, texts).items()}
        task_index = torch.full((len(texts),), self.model.config.task_index(task), device=self.device)
        with self.autocast():
            embeds, mask = self.model.embed(task_index, **batch, use_prompts=use_prompts)
            hidden = self.model.t5.get_encoder()(inputs_embeds=embeds, attention_mask=mask).last_hidden_state
        index = torch.arange(len(texts), device=self.device).repeat_interleave(num_beams)
        return TorchSession(self.model, hidden[index], mask[index], self.autocast)
