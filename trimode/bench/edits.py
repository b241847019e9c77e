"""Held-out editing items for `trimode bench quality`: a hole to fill, a wrong item to fix.

Built from the held-out items of the list tasks (copy, reverse, sort: answers are space-separated items):
- infill: one or two consecutive items of the answer are the hole; the prefix is the prompt (chat rendered)
  and the answer before them, the suffix the answer after them; right when the middle is exactly those items;
- revision: one item of the answer is replaced by another of its kind (a different letter or digit); the model
  revises the draft with no spans given; fixed when the revised draft is exactly the answer.
"""

from __future__ import annotations

import random
import string
from dataclasses import dataclass

EDIT_TASKS = ("copy", "reverse", "sort")


@dataclass(frozen=True)
class InfillItem:
    prefix: str
    suffix: str
    middle: str


@dataclass(frozen=True)
class RevisionItem:
    prompt: str
    draft: str
    answer: str


def _other(item: str, rng: random.Random) -> str:
    pool = string.digits if item.isdigit() else string.ascii_lowercase
    return rng.choice([c for c in pool if c != item])


def infill_items(tm, tasks: list, seed: int) -> list[InfillItem]:
    from trimode.bench.quality import prompt_text

    rng = random.Random(f"infill:{seed}")
    out = []
    for task in tasks:
        items = task.answer.split(" ")
        k = rng.choice([1, 2]) if len(items) > 2 else 1
        at = rng.randrange(0, len(items) - k + 1)
        before, hole, after = items[:at], items[at : at + k], items[at + k :]
        prefix = prompt_text(tm, task) + "".join(i + " " for i in before)
        out.append(InfillItem(prefix, "".join(" " + i for i in after), " ".join(hole)))
    return out


def revision_items(tm, tasks: list, seed: int) -> list[RevisionItem]:
    from trimode.bench.quality import prompt_text

    rng = random.Random(f"revise:{seed}")
    out = []
    for task in tasks:
        items = task.answer.split(" ")
        at = rng.randrange(len(items))
        items[at] = _other(items[at], rng)
        out.append(RevisionItem(prompt_text(tm, task), " ".join(items), task.answer))
    return out
