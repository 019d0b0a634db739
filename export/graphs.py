"""Export-friendly graphs of a POD model: one encoder per task and one decoder step with a KV cache.

The encoder graph folds the task's continuous prompts and the whole-word embedding table in as constants
and returns, besides the prompt-extended mask, every decoder layer's cross-attention keys and values, so
they are computed once per request. The decoder step is T5's decoder written out for a single new token:
self-attention over the cached keys/values, cross-attention over the request's cached projections (beams
of a request share them through `request_index`), and the relative position bias looked up from a table.

Layouts: `cross_kv` is `[layers, 2, batch, heads, source_len, d_kv]`, `past_kv` and `present_kv` are
`[layers, 2, rows, heads, steps, d_kv]` (rows = batch x beams).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from pod.model import PODModel

MAX_STEPS = 256  # longest decoder output the position table covers


def _bucket(relative: torch.Tensor, num_buckets: int, max_distance: int) -> torch.Tensor:
    """T5's unidirectional relative-position bucket for distances `relative` >= 0 (query minus key)."""
    max_exact = num_buckets // 2
    large = (
        max_exact
        + (
            torch.log(relative.float().clamp(min=1) / max_exact)
            / math.log(max_distance / max_exact)
            * (num_buckets - max_exact)
        ).long()
    )
    large = large.clamp(max=num_buckets - 1)
    return torch.where(relative < max_exact, relative, large)


class EncoderGraph(nn.Module):
    def __init__(self, model: PODModel, task: str) -> None:
        super().__init__()
        self.model = model
        self.task = model.config.task_index(task)

    def forward(self, input_ids, whole_word_ids, attention_mask):
        task_index = torch.full_like(input_ids[:, 0], self.task)
        embeds, mask = self.model.embed(task_index, input_ids, whole_word_ids, attention_mask)
        hidden = self.model.t5.get_encoder()(inputs_embeds=embeds, attention_mask=mask).last_hidden_state
        cfg = self.model.t5.config
        b, s, _ = hidden.shape
        kv = []
        for block in self.model.t5.get_decoder().block:
            attn = block.layer[1].EncDecAttention
            k = attn.k(hidden).view(b, s, cfg.num_heads, cfg.d_kv).transpose(1, 2)
            v = attn.v(hidden).view(b, s, cfg.num_heads, cfg.d_kv).transpose(1, 2)
            kv.append(torch.stack([k, v]))
        return torch.stack(kv), mask


def _rms(norm, x):
    variance = x.float().pow(2).mean(-1, keepdim=True)
    return norm.weight * (x * torch.rsqrt(variance + norm.variance_epsilon)).to(norm.weight.dtype)


class DecoderStepGraph(nn.Module):
    def __init__(self, model: PODModel) -> None:
        super().__init__()
        t5 = model.t5
        self.t5 = t5
        cfg = t5.config
        self.heads, self.d_kv = cfg.num_heads, cfg.d_kv
        self.scale_output = cfg.tie_word_embeddings
        self.d_model = cfg.d_model
        rel = t5.get_decoder().block[0].layer[0].SelfAttention.relative_attention_bias
        buckets = _bucket(
            torch.arange(MAX_STEPS), cfg.relative_attention_num_buckets, cfg.relative_attention_max_distance
        )
        self.register_buffer("position_bias", rel(buckets).detach().clone(), persistent=False)  # [MAX_STEPS, H]

    def forward(self, tokens, request_index, encoder_mask, cross_kv, past_kv):
        n = tokens.shape[0]
        steps = past_kv.shape[4]  # tokens already decoded
        x = self.t5.get_decoder().embed_tokens(tokens).unsqueeze(1)  # [N, 1, d]
        distance = steps - torch.arange(steps + 1, device=tokens.device)  # query position minus key positions
        self_bias = self.position_bias[distance].transpose(0, 1).unsqueeze(0).unsqueeze(2)  # [1, H, 1, T+1]
        cross = cross_kv.index_select(2, request_index)  # [L, 2, N, H, S, dkv]
        mask = encoder_mask.index_select(0, request_index)
        cross_bias = ((1.0 - mask.to(x.dtype)) * torch.finfo(x.dtype).min)[:, None, None, :]
        present = []
        for i, block in enumerate(self.t5.get_decoder().block):
            sa = block.layer[0].SelfAttention
            h = _rms(block.layer[0].layer_norm, x)
            q = sa.q(h).view(n, 1, self.heads, self.d_kv).transpose(1, 2)
            k = torch.cat([past_kv[i, 0], sa.k(h).view(n, 1, self.heads, self.d_kv).transpose(1, 2)], dim=2)
            v = torch.cat([past_kv[i, 1], sa.v(h).view(n, 1, self.heads, self.d_kv).transpose(1, 2)], dim=2)
            present.append(torch.stack([k, v]))
            w = torch.softmax((q @ k.transpose(-1, -2) + self_bias).float(), dim=-1).to(q.dtype)
            x = x + sa.o((w @ v).transpose(1, 2).reshape(n, 1, -1))
            ca = block.layer[1].EncDecAttention
            h = _rms(block.layer[1].layer_norm, x)
            q = ca.q(h).view(n, 1, self.heads, self.d_kv).transpose(1, 2)
            w = torch.softmax((q @ cross[i, 0].transpose(-1, -2) + cross_bias).float(), dim=-1).to(q.dtype)
            x = x + ca.o((w @ cross[i, 1]).transpose(1, 2).reshape(n, 1, -1))
            ff = block.layer[2]
            x = x + ff.DenseReluDense(_rms(ff.layer_norm, x))
        x = _rms(self.t5.get_decoder().final_layer_norm, x)[:, 0]
        if self.scale_output:
            x = x * self.d_model**-0.5
        return self.t5.lm_head(x).float(), torch.stack(present)
