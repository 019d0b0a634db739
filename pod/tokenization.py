"""SentencePiece tokenization with whole-word ids.

The whole-word id of a token is the 1-based slot of the ID (`user_12`, `item_345`) it belongs to in the
text; every other token gets 0 (REFERENCE.md). Slots are found from the pieces themselves, so the same
code works for T5's vocabulary (`▁user _ 12 34`) and for a small vocabulary trained on our data
(`▁user _ 1 2 3 4`, digits split).
"""

from __future__ import annotations

import io
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import sentencepiece as spm

from pod.ids import ID_PATTERN

WORD_START = "\u2581"  # SentencePiece's word-boundary marker
PAD_ID, EOS_ID, UNK_ID = 0, 1, 2  # T5's layout; our own vocabularies are trained to match it


class Tokenizer:
    """A SentencePiece model plus the whole-word slots of the POD input format."""

    def __init__(self, model_file: str | Path, whole_word_size: int = 512) -> None:
        self.path = Path(model_file)
        self.sp = spm.SentencePieceProcessor(model_file=str(model_file))
        if (self.sp.pad_id(), self.sp.eos_id()) != (PAD_ID, EOS_ID):
            raise ValueError(
                f"{model_file}: expected pad id {PAD_ID} and eos id {EOS_ID} (T5 layout), "
                f"got {self.sp.pad_id()} and {self.sp.eos_id()}"
            )
        self.whole_word_size = whole_word_size

    @property
    def vocab_size(self) -> int:
        return self.sp.get_piece_size()

    def encode_input(self, text: str) -> tuple[list[int], list[int]]:
        """Token ids and whole-word ids for an encoder input (ends with `</s>`, slot 0)."""
        pieces = self.sp.encode(text, out_type=str)
        ids = [self.sp.piece_to_id(p) for p in pieces]
        return ids + [EOS_ID], whole_word_ids(pieces, self.whole_word_size) + [0]

    def encode_target(self, text: str) -> list[int]:
        return self.sp.encode(text) + [EOS_ID]

    def decode(self, ids: Iterable[int]) -> str:
        return self.sp.decode([i for i in ids if i not in (PAD_ID, EOS_ID) and i < self.vocab_size])

    def pieces(self, text: str) -> list[str]:
        return self.sp.encode(text, out_type=str)

    def encode_batch(self, texts: list[str]) -> dict[str, np.ndarray]:
        """Padded encoder inputs for a batch: `input_ids`, `whole_word_ids`, `attention_mask` (int64)."""
        enc = [self.encode_input(t) for t in texts]
        n = max(len(ids) for ids, _ in enc)
        out = {k: np.zeros((len(texts), n), dtype=np.int64) for k in ("input_ids", "whole_word_ids", "attention_mask")}
        for row, (ids, ww) in enumerate(enc):
            out["input_ids"][row, : len(ids)] = ids
            out["whole_word_ids"][row, : len(ww)] = ww
            out["attention_mask"][row, : len(ids)] = 1
        return out


def whole_word_ids(pieces: list[str], size: int = 512) -> list[int]:
    """Slot of the ID each piece belongs to (1, 2, ...), 0 for pieces outside any ID.

    Pieces are grouped into words at each `▁`; within a word, a piece gets an ID's slot when its
    characters overlap the ID's span, so trailing punctuation (`item_12,`) stays 0.
    """
    out = [0] * len(pieces)
    slot = 0
    start = 0
    while start < len(pieces):
        end = start + 1
        while end < len(pieces) and not pieces[end].startswith(WORD_START):
            end += 1
        spans, pos = [], 0
        for p in pieces[start:end]:
            text = p.replace(WORD_START, "")
            spans.append((pos, pos + len(text)))
            pos += len(text)
        word = "".join(p.replace(WORD_START, "") for p in pieces[start:end])
        for match in ID_PATTERN.finditer(word):
            slot = min(slot + 1, size - 1)
            for k, (a, b) in enumerate(spans):
                if a < match.end() and b > match.start() or (a == b and a == match.start()):
                    out[start + k] = slot
        start = end
    return out


def train_sentencepiece(lines: Iterable[str], out_file: Path, vocab_size: int = 800) -> Path:
    """Train a small BPE vocabulary for models built from scratch (digits split, `_` its own piece).

    Small vocabularies train much faster from random weights: the ID digits become ten shared tokens
    instead of thousands of number pieces that each need to be learnt.
    """
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(list(lines)),
        model_writer=model,
        vocab_size=vocab_size,
        model_type="bpe",
        character_coverage=1.0,
        split_digits=True,
        user_defined_symbols=["_"],
        pad_id=PAD_ID,
        eos_id=EOS_ID,
        unk_id=UNK_ID,
        bos_id=-1,
        hard_vocab_limit=False,
        minloglevel=2,
    )
    out_file.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_file.with_suffix(".tmp")
    tmp.write_bytes(model.getvalue())
    tmp.replace(out_file)
    return out_file
