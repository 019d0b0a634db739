"""SentencePiece tokenization with whole-word ids, and the one place that decides how an item is written.

The whole-word id of a token is the 1-based slot of the ID (`user_12`, `item_345`) it belongs to in the
text; every other token gets 0 (REFERENCE.md). Slots are found from the pieces themselves, so the same
code works for T5's vocabulary (`▁user _ 12 34`) and for a small vocabulary trained on our data
(`▁user _ 1 2 3 4`, digits split).

Items are written according to the tokenizer's `ItemIndex` (`pod.items`): as digit pieces (`digits`, the
paper's form), or as extra vocabulary tokens placed after the SentencePiece vocabulary (`token`,
`collaborative`, `semantic`). Texts keep saying `item_17` in every mode, so templates, prepared data and the service
stay mode-agnostic; only this class turns an item word into tokens. A tokenizer directory holds
`spiece.model` and, unless the mode is `digits`, `items.json` (`Tokenizer.save` / `Tokenizer.load`).
"""

from __future__ import annotations

import io
import re
import shutil
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import sentencepiece as spm

from pod.ids import ID_PATTERN, item_target
from pod.items import ITEMS_FILE, ItemIndex

WORD_START = "\u2581"  # SentencePiece's word-boundary marker
PAD_ID, EOS_ID, UNK_ID = 0, 1, 2  # T5's layout; our own vocabularies are trained to match it
SPIECE_FILE = "spiece.model"
T5_PIECES, T5_VOCAB = 32000, 32100  # T5 models carry 100 sentinel rows after the SentencePiece pieces
_PLAIN = re.compile(r"[!-~]+( [!-~]+)*")  # printable ASCII words, one space apart: safe to encode word by word
_WORD_CACHE = 1 << 18  # distinct words kept by a tokenizer (a catalogue's items and users fit)
_TEXT_CACHE = 1 << 15  # whole inputs kept (a full evaluation split's, between sorting and running)


class Tokenizer:
    """A SentencePiece model, the whole-word slots of the POD input format, and how items are written."""

    def __init__(self, model_file: str | Path, whole_word_size: int = 512, items: ItemIndex | None = None) -> None:
        self.path = Path(model_file)
        self.sp = spm.SentencePieceProcessor(model_file=str(model_file))
        if (self.sp.pad_id(), self.sp.eos_id()) != (PAD_ID, EOS_ID):
            raise ValueError(
                f"{model_file}: expected pad id {PAD_ID} and eos id {EOS_ID} (T5 layout), "
                f"got {self.sp.pad_id()} and {self.sp.eos_id()}"
            )
        self.whole_word_size = whole_word_size
        self.items = items if items is not None else ItemIndex.digits()
        self.sp_size = self.sp.get_piece_size()
        # item tokens go after every row a model built for this vocabulary already has (T5's sentinels too)
        self.item_offset = T5_VOCAB if self.sp_size == T5_PIECES else self.sp_size
        self._item_ids = {item: [self.item_offset + c for c in code] for item, code in self.items.codes.items()}
        # encode_input's caches, of tuples: the garbage collector stops scanning those (lists it would scan at
        # every collection, which cost an evaluation more than the cache saved)
        self._words: dict[str, tuple[tuple[int, ...], tuple[int, ...], int]] = {}  # per word
        self._texts: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = {}  # recent whole texts

    @classmethod
    def load(cls, directory: str | Path, whole_word_size: int = 512) -> Tokenizer:
        """`spiece.model` and, when present, `items.json` from a checkpoint, bundle or run directory."""
        directory = Path(directory)
        items_file = directory / ITEMS_FILE
        items = ItemIndex.load(items_file) if items_file.is_file() else None
        return cls(directory / SPIECE_FILE, whole_word_size, items)

    def save(self, directory: str | Path) -> None:
        """Write `spiece.model` and (unless the mode is digits) `items.json` into `directory`."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        target = directory / SPIECE_FILE
        if not (target.exists() and target.resolve() == self.path.resolve()):
            shutil.copyfile(self.path, target)
        if self.items.mode != "digits":
            self.items.save(directory / ITEMS_FILE)
        elif (directory / ITEMS_FILE).exists():
            (directory / ITEMS_FILE).unlink()  # a stale index would turn this tokenizer into another mode

    @property
    def item_mode(self) -> str:
        """`digits`, `token`, `collaborative` or `semantic`."""
        return self.items.mode

    @property
    def vocab_size(self) -> int:
        """Rows the model's embedding needs: the SentencePiece pieces, plus any item tokens after them."""
        return self.item_offset + self.items.num_tokens if self.items.num_tokens else self.sp_size

    def item_tokens(self, item: int) -> list[int]:
        """The extra-vocabulary tokens of an item (token/collaborative/semantic modes; KeyError for unknown items)."""
        try:
            return self._item_ids[item]
        except KeyError:
            raise KeyError(f"item {item} has no {self.item_mode} code in this tokenizer") from None

    def item_columns(self) -> tuple[list[int], list[int]]:
        """(items, token ids) of every item in token mode, in the same order: the columns an exact one-step
        top-k reads from the output logits."""
        if self.item_mode != "token":
            raise ValueError(f"item columns exist only for token item ids, not {self.item_mode}")
        items = sorted(self._item_ids)
        return items, [self._item_ids[i][0] for i in items]

    def encode_input(self, text: str, keep: bool = False) -> tuple[list[int], list[int]]:
        """Token ids and whole-word ids for an encoder input (ends with `</s>`, slot 0).

        With item tokens, the pieces of each known `item_N` are replaced by the item's tokens, which keep
        the item's whole-word slot; user IDs and words are tokenized exactly as in `digits` mode.

        Word by word through a cache: SentencePiece never joins two whitespace-separated words into one piece
        and slots are counted per word, so a text's encoding is its words' encodings in a row, with slots
        renumbered. A top-N input repeats the same few thousand item words, and re-tokenizing them was most
        of a GPU evaluation's time. Texts the word split might read differently (non-ASCII, tabs, newlines)
        take the whole-text path, `encode_input_whole`, which the cache is tested against.

        `keep=True` also keeps the whole text's encoding, for a caller that will encode it again soon: an
        evaluation sorts its jobs by length, then runs them. Training and serving encode a text once.
        """
        done = self._texts.get(text)
        if done is not None:
            return list(done[0]), list(done[1])
        if not _PLAIN.fullmatch(text):
            return self.encode_input_whole(text)
        ids: list[int] = []
        ww: list[int] = []
        slot, cap = 0, self.whole_word_size - 1
        for word in text.split(" "):  # _PLAIN: no empty words
            hit = self._words.get(word)
            if hit is None:
                if len(self._words) >= _WORD_CACHE:
                    self._words.clear()
                hit = self._words[word] = self._encode_word(word)
            w_ids, w_ww, n = hit
            ids += w_ids
            if len(w_ww) == 1:  # most words: one item token, or one piece
                ww.append(min(slot + w_ww[0], cap) if w_ww[0] else 0)
            else:
                ww += [min(slot + s, cap) if s else 0 for s in w_ww]
            slot = min(slot + n, cap)
        ids.append(EOS_ID)
        ww.append(0)
        if keep:
            if len(self._texts) >= _TEXT_CACHE:
                self._texts.clear()
            self._texts[text] = (tuple(ids), tuple(ww))
        return ids, ww

    def _encode_word(self, word: str) -> tuple[tuple[int, ...], tuple[int, ...], int]:
        """One word's ids, slots (1-based within the word) and slot count, for the word cache.

        A word that is exactly one ID (`user_7`, `item_12`) is all slot 1, so it skips the span search: an
        evaluation meets each user's word once, and those misses were most of its tokenizing time."""
        whole = ID_PATTERN.fullmatch(word)
        if whole is not None:
            code = self._item_ids.get(int(whole.group(2))) if whole.group(1) == "item" else None
            ids = tuple(code) if code is not None and self.item_mode != "digits" else tuple(self.sp.encode(word))
            return ids, (1,) * len(ids), 1 if ids else 0
        w_ids, w_ww = self.encode_input_whole(word)
        return tuple(w_ids[:-1]), tuple(w_ww[:-1]), max(w_ww[:-1], default=0)

    def encode_input_whole(self, text: str) -> tuple[list[int], list[int]]:
        """`encode_input` of the whole text at once (the reference the word cache must equal)."""
        pieces = self.sp.encode(text, out_type=str)
        slots, match_of, matches = _id_spans(pieces, self.whole_word_size)
        if self.item_mode == "digits":
            return [self.sp.piece_to_id(p) for p in pieces] + [EOS_ID], slots + [0]
        ids: list[int] = []
        ww: list[int] = []
        done: set[int] = set()
        for piece, slot, m in zip(pieces, slots, match_of):
            code = self._item_ids.get(matches[m][1]) if m >= 0 and matches[m][0] == "item" else None
            if code is None:
                ids.append(self.sp.piece_to_id(piece))
                ww.append(slot)
            elif m not in done:
                done.add(m)
                ids += code
                ww += [slot] * len(code)
        return ids + [EOS_ID], ww + [0]

    def encode_target(self, text: str) -> list[int]:
        return self.sp.encode(text) + [EOS_ID]

    def item_target(self, item: int) -> list[int]:
        """The decoder tokens that write an item (ending with `</s>`): the one place an item's output form
        is decided, so training targets, tries, catalogs and bundles agree."""
        if self.item_mode == "digits":
            return self.encode_target(item_target(item))
        return [*self.item_tokens(item), EOS_ID]

    def decode(self, ids: Iterable[int]) -> str:
        """Text of SentencePiece tokens; padding, `</s>`, T5 sentinels and item tokens are skipped."""
        return self.sp.decode([i for i in ids if i not in (PAD_ID, EOS_ID) and 0 <= i < self.sp_size])

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
    return _id_spans(pieces, size)[0]


def _id_spans(pieces: list[str], size: int = 512) -> tuple[list[int], list[int], list[tuple[str, int]]]:
    """`whole_word_ids`, plus which ID occurrence each piece belongs to (-1: none) and the occurrences as
    (kind, number): slots are capped at `size - 1`, so they cannot tell two late IDs apart."""
    out = [0] * len(pieces)
    match_of = [-1] * len(pieces)
    matches: list[tuple[str, int]] = []
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
            matches.append((match.group(1), int(match.group(2))))
            for k, (a, b) in enumerate(spans):
                if a < match.end() and b > match.start() or (a == b and a == match.start()):
                    out[start + k] = slot
                    match_of[start + k] = len(matches) - 1
        start = end
    return out, match_of, matches


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
