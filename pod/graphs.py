"""Export-friendly graphs of a POD model: one encoder per task and one decoder step with a KV cache.

The encoder graph folds the task's continuous prompts and the whole-word embedding table in as constants
and returns, besides the prompt-extended mask, every decoder layer's cross-attention keys and values, so
they are computed once per request. The decoder step is T5's decoder written out for a single new token:
self-attention over the cached keys/values, cross-attention over the request's cached projections (beams
of a request share them through `request_index`), and the relative position bias looked up from a table.

Layouts: `cross_kv` is `[layers, 2, batch, heads, source_len, d_kv]`, `past_kv` and `present_kv` are
`[layers, 2, rows, heads, steps, d_kv]` with rows = batch x w, request-major (w = the live beams the search
sends at that step, any number). Cross-attention treats a request's w beams as w queries against its one
copy of the keys/values (a batched matmul), so nothing is gathered or copied per beam.

The decoder step returns the final hidden state, not logits: `OutputGraph` projects it onto just the tokens
a constrained search asks for (the trie allows a few hundred of 32k), or onto all of them when an exact
normalizer is needed.
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
    def __init__(self, model: PODModel, task: str, use_prompts: bool = True) -> None:
        super().__init__()
        self.model = model
        self.task = model.config.task_index(task)
        self.use_prompts = use_prompts

    def forward(self, input_ids, whole_word_ids, attention_mask):
        task_index = torch.full_like(input_ids[:, 0], self.task)
        hidden, mask = self.model.encode(task_index, input_ids, whole_word_ids, attention_mask, self.use_prompts)
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
        buckets = _bucket(  # on the weights' device: a CPU index beside GPU weights crashed the first CUDA run
            torch.arange(MAX_STEPS, device=rel.weight.device),
            cfg.relative_attention_num_buckets,
            cfg.relative_attention_max_distance,
        )
        self.register_buffer("position_bias", rel(buckets).detach().clone(), persistent=False)  # [MAX_STEPS, H]

    def forward(self, tokens, encoder_mask, cross_kv, past_kv):
        n = tokens.shape[0]
        b = cross_kv.shape[2]
        w = n // b  # rows per request
        steps = past_kv.shape[4]  # tokens already decoded
        x = self.t5.get_decoder().embed_tokens(tokens).unsqueeze(1)  # [N, 1, d]
        distance = steps - torch.arange(steps + 1, device=tokens.device)  # query position minus key positions
        self_bias = self.position_bias[distance].transpose(0, 1).unsqueeze(0).unsqueeze(2)  # [1, H, 1, T+1]
        cross_bias = ((1.0 - encoder_mask.to(x.dtype)) * torch.finfo(x.dtype).min)[:, None, None, :]  # [B,1,1,S]
        present = []
        for i, block in enumerate(self.t5.get_decoder().block):
            sa = block.layer[0].SelfAttention
            h = _rms(block.layer[0].layer_norm, x)
            q = sa.q(h).view(n, 1, self.heads, self.d_kv).transpose(1, 2)
            k = torch.cat([past_kv[i, 0], sa.k(h).view(n, 1, self.heads, self.d_kv).transpose(1, 2)], dim=2)
            v = torch.cat([past_kv[i, 1], sa.v(h).view(n, 1, self.heads, self.d_kv).transpose(1, 2)], dim=2)
            present.append(torch.stack([k, v]))
            a = torch.softmax((q @ k.transpose(-1, -2) + self_bias).float(), dim=-1).to(q.dtype)
            x = x + sa.o((a @ v).transpose(1, 2).reshape(n, 1, -1))
            ca = block.layer[1].EncDecAttention
            h = _rms(block.layer[1].layer_norm, x)
            q = ca.q(h).view(b, w, self.heads, self.d_kv).transpose(1, 2)  # a request's beams are its queries
            a = torch.softmax((q @ cross_kv[i, 0].transpose(-1, -2) + cross_bias).float(), dim=-1).to(q.dtype)
            x = x + ca.o((a @ cross_kv[i, 1]).transpose(1, 2).reshape(n, 1, -1))
            ff = block.layer[2]
            x = x + ff.DenseReluDense(_rms(ff.layer_norm, x))
        x = _rms(self.t5.get_decoder().final_layer_norm, x)[:, 0]
        if self.scale_output:
            x = x * self.d_model**-0.5
        return x.float(), torch.stack(present)


class OutputGraph(nn.Module):
    """Logits of the requested token columns (`hidden @ W[columns].T`), or of the whole vocabulary.

    Two graphs, not one with a switch: ONNX Runtime runs every node of a graph whatever outputs are asked
    for, and gathering all 32k rows to emulate the full product costs three times the product itself.
    """

    def __init__(self, model: PODModel, full: bool = False) -> None:
        super().__init__()
        self.weight = model.t5.lm_head.weight
        self.full = full

    def forward(self, hidden, columns=None):
        if self.full:
            return hidden.to(self.weight.dtype) @ self.weight.t()
        return hidden.to(self.weight.dtype) @ self.weight.index_select(0, columns).t()
