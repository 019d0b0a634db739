"""What the Hugging Face baseline needs to search our item trie: the callback, the new-token budget, the reading.

`eval_throughput.py` (batches) and `runtime_latency.py` (one request) both run stock `generate` with
`prefix_allowed_tokens_fn`; both read its beams back into item lists the same way.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from transformers.modeling_outputs import BaseModelOutput

from pod.model import PODModel
from pod.tokenization import EOS_ID

MAX_NEW_TOKENS = 16


def new_tokens(longest_item: int) -> int:
    """HF's budget of new tokens for an item list; `longest_item` counts the `</s>` that ends an item's target.

    With one token per item (targets of 2), one step scores an item exactly as our one-step top-k does (its
    log-probability, disallowed tokens masked), so HF gets one step and the two lists agree up to ties. A longer
    budget would make HF score the item *and* the `</s>` after it: a different ranking, and a second decoder step.
    Multi-token items keep the generous budget: the search stops at `</s>` anyway.
    """
    return 1 if longest_item <= 2 else MAX_NEW_TOKENS


def generate_inputs(model: PODModel, task_index: torch.Tensor, enc: dict[str, torch.Tensor]) -> dict:
    """What `generate` reads for POD inputs: the prompt-extended embeddings, or for a causal-history model the
    encoder's states (HF's own encoder would read the history in both directions, a different model)."""
    if model.causal():
        hidden, mask = model.encode(task_index, **enc)
        return {"encoder_outputs": BaseModelOutput(hidden), "attention_mask": mask}
    embeds, mask = model.embed(task_index, **enc)
    return {"inputs_embeds": embeds, "attention_mask": mask}


def allowed_tokens(trie, constraint_of: Callable[[int], object]) -> Callable[[int, torch.Tensor], list[int]]:
    """`prefix_allowed_tokens_fn` over the trie: the tokens the batch row's constraint allows after its prefix."""

    def allowed(batch_id: int, prefix: torch.Tensor) -> list[int]:
        node = 0
        for t in prefix.tolist()[1:]:
            node = trie.children[node].get(t, -1)
            if node < 0:
                return [EOS_ID]
        return [t for t, _ in constraint_of(batch_id).allowed(node)] or [EOS_ID]

    return allowed


def item_list(trie, beams: list[list[int]], top: int) -> list[int]:
    """The distinct items that HF's beams (token sequences, decoder start first) spell, best first."""
    items: list[int] = []
    for seq in beams:
        node = 0
        for t in seq[1:]:
            node = trie.children[node].get(t, -1)
            if node < 0 or t == EOS_ID:
                break
        value = trie.value.get(node)
        if value is None and node >= 0:  # stopped before the `</s>` that ends the item (a one-step budget)
            value = trie.value.get(trie.children[node].get(EOS_ID, -1))
        if value is not None and value not in items:
            items.append(value)
    return items[:top]
