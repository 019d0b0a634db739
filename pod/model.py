"""The POD model: a T5 encoder-decoder, whole-word embeddings and K continuous prompts per task.

Input embeddings are `[p_1..p_K, x_1..x_n]` where `x_j = token_emb + whole_word_emb` and the `p_k` are the
task's continuous prompt vectors (no whole-word embedding at prompt positions; the attention mask gets K
leading ones). Everything else is plain Hugging Face T5, so any local T5 directory (e.g. `t5-small`) can
serve as the backbone.

A checkpoint is a directory: `config.json` (enough to rebuild model and tokenizer), `model.safetensors`,
`spiece.model` and, when items have tokens of their own, `items.json` (`Tokenizer.save`/`Tokenizer.load`),
so a checkpoint always says how it writes items. Only safe formats are read.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
from safetensors.torch import load_model, save_model
from torch import nn
from transformers import T5Config, T5ForConditionalGeneration
from transformers.modeling_outputs import BaseModelOutput

from pod import TASKS
from pod.atomic import write_dir_atomically
from pod.tokenization import EOS_ID, PAD_ID, Tokenizer

CHECKPOINT_FORMAT = "pod-checkpoint"
CHECKPOINT_VERSION = 1

PRESETS: dict[str, dict[str, float]] = {
    # SASRec's width (d = 64) for large catalogs on a CPU: the full softmax over the items is most of a
    # training step, so half the width is about twice the epochs in a time box.
    "mini": dict(d_model=64, d_ff=256, num_layers=2, num_decoder_layers=2, num_heads=2, d_kv=32, dropout_rate=0.0),
    # Learns the embedded synthetic shop on 2 CPU cores in minutes. No dropout: on a CPU, dropout on the
    # attention probabilities of 500-token top-N inputs costs more than the rest of the step.
    "tiny": dict(d_model=128, d_ff=512, num_layers=2, num_decoder_layers=2, num_heads=4, d_kv=32, dropout_rate=0.0),
    # Bigger, still trainable on a CPU in tens of minutes.
    "small": dict(d_model=256, d_ff=1024, num_layers=4, num_decoder_layers=4, num_heads=4, d_kv=64, dropout_rate=0.1),
    # The paper's backbone shape (random weights unless --backbone gives a pretrained directory).
    "t5-small": dict(
        d_model=512, d_ff=2048, num_layers=6, num_decoder_layers=6, num_heads=8, d_kv=64, dropout_rate=0.1
    ),
}


@dataclass
class PODConfig:
    """Everything, besides the weights, that is needed to rebuild a POD model."""

    t5: dict
    tasks: list[str] = field(default_factory=lambda: list(TASKS))
    num_prompts: int = 3
    whole_word_size: int = 512
    topn_history: bool = False  # top-N inputs start with the user's recent history (see pod.templates)
    user_ids: bool = True  # sequential and top-N inputs name the user (False: `user_0`, the history alone)
    # The tasks training taught (None: all of `tasks`, as in checkpoints written before this field). Every task
    # keeps its prompt vectors, but an untaught task's are random: runtimes report only the taught ones, so
    # nothing serves or evaluates a task the model never learned.
    trained: list[str] | None = None
    # Token ids from here up are items, and the sequential task's encoder reads them causally (None: full
    # attention, the paper's). An item attends to the input's words and to the items before it, never to later
    # ones, and the words attend to words only; so one encoder pass over a training sequence holds the state
    # after every prefix, and training predicts every next item of a sequence at once (`--sequential-samples
    # causal`, `PODModel.next_item_loss`) instead of one encoder pass per prefix. Inference builds the same mask.
    causal_items_from: int | None = None

    def task_index(self, task: str) -> int:
        return self.tasks.index(task)

    @property
    def trained_tasks(self) -> list[str]:
        return [t for t in self.tasks if self.trained is None or t in self.trained]


def t5_config(preset: str, vocab_size: int, dropout: float | None = None) -> dict:
    """A T5 config dict for a named preset; vocabulary from the tokenizer (T5's 32,000 pieces -> 32,100)."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    vocab = 32100 if vocab_size == 32000 else vocab_size
    shape = dict(PRESETS[preset])
    if dropout is not None:
        shape["dropout_rate"] = dropout
    cfg = T5Config(
        vocab_size=vocab,
        feed_forward_proj="relu",
        pad_token_id=PAD_ID,
        eos_token_id=EOS_ID,
        decoder_start_token_id=PAD_ID,
        **shape,
    )
    return cfg.to_dict()


class PODModel(nn.Module):
    def __init__(self, config: PODConfig, backbone: T5ForConditionalGeneration | None = None) -> None:
        super().__init__()
        self.config = config
        self.t5 = backbone if backbone is not None else T5ForConditionalGeneration(T5Config(**config.t5))
        d_model = self.t5.config.d_model
        device = self.t5.get_input_embeddings().weight.device  # beside the backbone (a GPU, or `meta` in tests)
        self.whole_word = nn.Embedding(config.whole_word_size, d_model, device=device)
        self.prompts = nn.Parameter(torch.empty(len(config.tasks), config.num_prompts, d_model, device=device))
        nn.init.uniform_(self.prompts, -0.1, 0.1)

    def embed(
        self,
        task_index: torch.Tensor,
        input_ids: torch.Tensor,
        whole_word_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        use_prompts: bool = True,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Encoder input embeddings and mask with the task's continuous prompts in front.

        `task_index` has one entry per row, so sample-mixed batches need no special path.
        """
        tokens = self.t5.get_input_embeddings()(input_ids) + self.whole_word(whole_word_ids)
        if not use_prompts:
            return tokens, attention_mask
        prompts = self.prompts[task_index].to(tokens.dtype)
        ones = attention_mask.new_ones(attention_mask.shape[0], prompts.shape[1])
        return torch.cat([prompts, tokens], dim=1), torch.cat([ones, attention_mask], dim=1)

    def _history(self, task_index, input_ids, mask) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """For the prompt-extended input: per position the number of items up to it (`step`), which keys
        anything may read (`visible`: the padding mask less, on causal rows, the words after the first item,
        e.g. the closing `</s>`: their place moves with the history's length, so reading them would make a
        prefix's states depend on what follows it), and the rows that read causally."""
        is_item = torch.zeros_like(mask, dtype=torch.bool)
        is_item[:, mask.shape[1] - input_ids.shape[1] :] = input_ids >= self.config.causal_items_from
        step = torch.cumsum(is_item.long(), dim=1)
        rows = task_index == self.config.task_index("sequential")
        visible = mask.bool() & (is_item | (step == 0) | ~rows[:, None])
        return step, visible, rows

    @staticmethod
    def _additive(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """A boolean `[batch, query, key]` mask as the additive `[batch, 1, query, key]` one attention adds."""
        return ((~allowed).to(dtype) * torch.finfo(dtype).min)[:, None]

    def causal(self) -> bool:
        return self.config.causal_items_from is not None and "sequential" in self.config.tasks

    def encode(
        self,
        task_index: torch.Tensor,
        input_ids: torch.Tensor,
        whole_word_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        use_prompts: bool = True,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Encoder states and the mask the decoder's cross-attention reads (prompt-extended).

        On a causal-history model's sequential rows, a position reads the visible keys with no more items
        before them than itself (`_history`), so words read words and an item the items up to itself."""
        hidden, mask, _ = self._encode(task_index, input_ids, whole_word_ids, attention_mask, use_prompts)
        return hidden, mask

    def _encode(self, task_index, input_ids, whole_word_ids, attention_mask, use_prompts=True):
        """`encode` plus, on a causal-history model, each position's item count (`_history`'s `step`)."""
        embeds, mask = self.embed(task_index, input_ids, whole_word_ids, attention_mask, use_prompts)
        if not self.causal():
            return self.t5.get_encoder()(inputs_embeds=embeds, attention_mask=mask).last_hidden_state, mask, None
        step, visible, rows = self._history(task_index, input_ids, mask)
        allowed = visible[:, None, :] & ((step[:, None, :] <= step[:, :, None]) | ~rows[:, None, None])
        encoder = self.t5.get_encoder()
        hidden = encoder(inputs_embeds=embeds, attention_mask=self._additive(allowed, embeds.dtype)).last_hidden_state
        return hidden, visible.to(mask.dtype), step

    def forward(
        self,
        task_index,
        input_ids,
        whole_word_ids,
        attention_mask,
        labels=None,
        next_items=None,
        label_smoothing: float = 0.0,
    ) -> torch.Tensor:
        """Mean token NLL over the non-padding target tokens (`labels` padded with -100), or with `next_items`
        the mean next-item NLL of `next_item_loss`. `label_smoothing` (training only) moves that share of each
        target's mass evenly onto the other classes: a brake on the overconfidence that makes validation NLL
        rise while the ranking still improves."""
        if next_items is not None:
            return self.next_item_loss(
                task_index, input_ids, whole_word_ids, attention_mask, next_items, label_smoothing
            )
        hidden, mask = self.encode(task_index, input_ids, whole_word_ids, attention_mask)
        # the decoder reads the labels shifted right, as T5 does when given `labels`; the loss is computed here
        # once (T5's own is the same cross-entropy without smoothing)
        decoder_input_ids = self.t5._shift_right(labels)
        out = self.t5(encoder_outputs=BaseModelOutput(hidden), attention_mask=mask, decoder_input_ids=decoder_input_ids)
        return nn.functional.cross_entropy(
            out.logits.flatten(0, 1).float(), labels.flatten(), ignore_index=-100, label_smoothing=label_smoothing
        )

    def next_item_states(self, task_index, input_ids, whole_word_ids, attention_mask, rows: int) -> torch.Tensor:
        """Output states `[batch, rows, d_model]` (scaled for the tied output matrix) after each of the first
        `rows` items of causal-history sequential inputs: row r is the state a one-step decode of the input
        cut after its (r+1)-th item gives. The decoder's first step attends only to itself, so `rows`
        independent first steps run as one decoder pass whose queries each see the states up to their item."""
        if not self.causal():
            raise ValueError("next-item states need a causal-history model (--sequential-samples causal)")
        hidden, visible, step = self._encode(task_index, input_ids, whole_word_ids, attention_mask)
        batch, dtype, device = hidden.shape[0], hidden.dtype, hidden.device
        after = torch.arange(1, rows + 1, device=device)
        sees = visible.bool()[:, None, :] & (step[:, None, :] <= after[None, :, None])  # [batch, rows, source]
        own = torch.eye(rows, dtype=torch.bool, device=device).expand(batch, rows, rows)  # a first step sees itself
        start = torch.full((batch, rows), self.t5.config.decoder_start_token_id, device=device)
        out = self.t5.get_decoder()(
            input_ids=start,
            attention_mask=self._additive(own, dtype),
            encoder_hidden_states=hidden,
            encoder_attention_mask=self._additive(sees, dtype),
        ).last_hidden_state
        return out * self.t5.config.d_model**-0.5 if self.t5.config.tie_word_embeddings else out

    def next_item_loss(
        self, task_index, input_ids, whole_word_ids, attention_mask, next_items, label_smoothing: float = 0.0
    ) -> torch.Tensor:
        """Mean NLL of every next item of causal-history inputs (`next_items[b, r]`: the token of the item
        after the (r+1)-th input item, -100 where none), normalized over the item tokens only: a one-step
        top-k ranks items among items, and the words' rows of the output matrix are spared."""
        states = self.next_item_states(task_index, input_ids, whole_word_ids, attention_mask, next_items.shape[1])
        keep = next_items >= 0
        first = self.config.causal_items_from
        logits = states[keep] @ self.t5.lm_head.weight[first:].t()
        return nn.functional.cross_entropy(logits.float(), next_items[keep] - first, label_smoothing=label_smoothing)

    def logits(self, task_index, input_ids, whole_word_ids, attention_mask, decoder_input_ids) -> torch.Tensor:
        hidden, mask = self.encode(task_index, input_ids, whole_word_ids, attention_mask)
        out = self.t5(encoder_outputs=BaseModelOutput(hidden), attention_mask=mask, decoder_input_ids=decoder_input_ids)
        return out.logits


def build_model(
    tokenizer: Tokenizer,
    preset: str = "tiny",
    backbone: str | Path | None = None,
    num_prompts: int = 3,
    tasks: list[str] | None = None,
    dropout: float | None = None,
    topn_history: bool = False,
    user_ids: bool = True,
    init_std: float | None = None,
    trained: list[str] | None = None,
    causal_items_from: int | None = None,
) -> PODModel:
    """A fresh POD model: pretrained backbone weights from a local directory, or random from a preset.

    `init_std` re-draws the random model's token and whole-word embeddings from N(0, init_std). T5's own init
    (std 1.0) suits a pretrained start; from scratch, Adam moves each weight by about the learning rate per
    step, so embeddings 10x larger than the layers' weights learn 10x slower in relative terms, and the item
    embeddings are most of what a recommender learns. Measured both ways (RESULTS.md): 0.05 helps Beauty's
    sequential task and hurts the synthetic three-task demo, so it is an option, not the default."""
    tasks = list(tasks or TASKS)
    if backbone is not None:
        t5 = T5ForConditionalGeneration.from_pretrained(str(backbone), use_safetensors=True)
        if tokenizer.items.num_tokens and t5.config.vocab_size < tokenizer.vocab_size:
            # item tokens are new rows after the backbone's vocabulary; they start from the mean embedding
            t5.resize_token_embeddings(tokenizer.vocab_size)
        if t5.config.vocab_size < tokenizer.vocab_size:
            raise ValueError(
                f"{backbone}: backbone vocabulary ({t5.config.vocab_size}) is smaller than the tokenizer's "
                f"({tokenizer.vocab_size})"
            )
        config = PODConfig(
            t5=t5.config.to_dict(),
            tasks=tasks,
            num_prompts=num_prompts,
            topn_history=topn_history,
            user_ids=user_ids,
            trained=trained,
            causal_items_from=causal_items_from,
        )
        return PODModel(config, backbone=t5)
    config = PODConfig(
        t5=t5_config(preset, tokenizer.vocab_size, dropout),
        tasks=tasks,
        num_prompts=num_prompts,
        topn_history=topn_history,
        user_ids=user_ids,
        trained=trained,
        causal_items_from=causal_items_from,
    )
    model = PODModel(config)
    if init_std:
        with torch.no_grad():
            model.t5.get_input_embeddings().weight.normal_(0.0, init_std)
            model.whole_word.weight.normal_(0.0, init_std)
    return model


def save_checkpoint(model: PODModel, tokenizer: Tokenizer, out: Path, extra: dict | None = None, write_more=None):
    """Write a checkpoint directory atomically; `write_more(tmpdir)` may add files (training state)."""
    model = getattr(model, "module", model)

    def fill(tmp: Path) -> None:
        meta = {
            "format": CHECKPOINT_FORMAT,
            "version": CHECKPOINT_VERSION,
            "pod": asdict(model.config),
            "tokenizer": "spiece.model",
            "item_ids": tokenizer.item_mode,
            **(extra or {}),
        }
        (tmp / "config.json").write_text(json.dumps(meta, indent=2))
        save_model(model, str(tmp / "model.safetensors"))
        tokenizer.save(tmp)
        if write_more is not None:
            write_more(tmp)

    write_dir_atomically(Path(out), fill)


def config_from(cls: type, values: dict, source: Path):
    """`cls(**values)` for a config dataclass read from `source`; a field this code does not know (the file was
    written by another version of POD) is refused by name, with the file, instead of as a bare TypeError."""
    unknown = sorted(set(values) - {f.name for f in fields(cls)})
    if unknown:
        raise ValueError(
            f"{source}: unknown {cls.__name__} field(s) {', '.join(unknown)} (written by another version of POD?)"
        )
    return cls(**values)


def resolve_checkpoint(path: str | Path) -> Path:
    """Accept a checkpoint directory or a training run directory (then its `best/`)."""
    path = Path(path)
    for cand in (path, path / "best", path / "last"):
        if (cand / "config.json").is_file():
            return cand
    old = path.with_name(f".{path.name}.old")  # an interrupted swap leaves the previous one here
    if (old / "config.json").is_file():
        return old
    raise FileNotFoundError(f"{path}: not a POD checkpoint (no config.json here or in best/ or last/)")


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu") -> tuple[PODModel, Tokenizer, dict]:
    """Rebuild model and tokenizer from a checkpoint directory (safetensors and JSON only)."""
    path = resolve_checkpoint(path)
    meta = json.loads((path / "config.json").read_text())
    if meta.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path / 'config.json'}: not a POD checkpoint (format={meta.get('format')!r})")
    if meta.get("version", 0) > CHECKPOINT_VERSION:
        raise ValueError(f"{path / 'config.json'}: checkpoint version {meta['version']} is newer than this code")
    config = config_from(PODConfig, meta["pod"], path / "config.json")
    tokenizer = Tokenizer.load(path, config.whole_word_size)
    if tokenizer.vocab_size > config.t5["vocab_size"]:
        raise ValueError(
            f"{path}: the tokenizer needs {tokenizer.vocab_size} embedding rows ({tokenizer.item_mode} item ids), "
            f"the model has {config.t5['vocab_size']}"
        )
    model = PODModel(config)
    missing, unexpected = load_model(model, str(path / "model.safetensors"), strict=False)
    if unexpected or [m for m in missing if not m.endswith(("lm_head.weight", "embed_tokens.weight"))]:
        raise ValueError(
            f"{path / 'model.safetensors'}: weights do not match config (missing {missing}, unexpected {unexpected})"
        )
    model.t5.tie_weights()
    return model.to(device), tokenizer, meta
