"""Discrete prompt templates, per task. Template 0 of each task is the bare form used at inference.

Training draws one template per sample (the paper's distillation: the continuous prompts learn what the
words say); validation, test and serving use only template 0 unless `continuous+discrete` inference is
asked for, which keeps a fixed wordy template (index 1) for the paper's Table 6 ablation.

Placeholders: `{user}` is one user ID, `{item}` one item ID, `{items}` a space-separated list of item IDs.

Top-N may also read the user's recent history (`history`): the paper's top-N input holds only the user ID and
the candidates, which a model trained from random weights cannot turn into preferences (the ID is a few
digit pieces seen once an epoch); with the last purchases in front, the candidates are ranked by what the
user did, as sequential recommendation is.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

from pod.ids import item_token, user_token

TEMPLATES: dict[str, tuple[str, ...]] = {
    "sequential": (
        "{user} {items}",
        "here is what {user} bought so far, in order : {items} . which item comes next ?",
        "{user} has purchased {items} . predict the next item the user will buy .",
        "given the shopping history {items} of {user} , recommend the following item .",
        "purchase sequence of {user} : {items} . what will be bought next ?",
        "{user} interacted with {items} one after another . guess the next item .",
    ),
    "topn": (
        "{user} {items}",
        "which of these items would {user} like best : {items} ?",
        "pick the item that {user} is most likely to buy from the candidates {items} .",
        "candidates : {items} . choose one to recommend to {user} .",
        "{user} is shown {items} . select the item the user will interact with .",
        "rank the following items for {user} and return the best one : {items}",
    ),
    "explanation": (
        "{user} {item}",
        "explain why {user} would enjoy {item} .",
        "write a sentence about what {user} likes in {item} .",
        "what would {user} say about {item} ?",
        "give a reason for {user} to buy {item} .",
        "describe a feature of {item} that matters to {user} .",
    ),
}

BARE = 0
WORDY = 1


def fill(task: str, template: int, user: int, items: list[int], history: Sequence[int] = ()) -> str:
    """Render a template for internal indices (`items` has one element for explanation); a non-empty
    `history` (top-N with history) goes in front, most recent last, ended by ` .`."""
    text = TEMPLATES[task][template]
    ids = " ".join(item_token(i) for i in items)
    out = text.format(user=user_token(user), items=ids, item=ids)
    if history:
        out = " ".join(item_token(i) for i in history) + " . " + out
    return out


def draw(task: str, rng: random.Random) -> int:
    """A training template drawn uniformly from the task's set, bare form included."""
    return rng.randrange(len(TEMPLATES[task]))
