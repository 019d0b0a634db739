"""How users and items appear in text: `user_12`, `item_345`.

IDs stay in the text (the paper's choice, Sec. 3.2) so that one tokenizer serves IDs and words; the
whole-word embedding (see `pod.tokenization`) is what ties an ID's pieces back together.
"""

from __future__ import annotations

import re

ID_PATTERN = re.compile(r"(user|item)_(\d+)")


def user_token(index: int) -> str:
    return f"user_{index}"


def item_token(index: int) -> str:
    return f"item_{index}"


ANONYMOUS_USER = 0  # internal users start at 1: `user_0` stands for "someone", known only by the history


def item_target(index: int) -> str:
    """The decoder target for an item: its number alone, as in the reference code."""
    return str(index)
