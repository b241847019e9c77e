"""Editing items cut from the list tasks: a hole to fill, a wrong item to fix.

The list tasks (copy, reverse, sort) answer with space-separated items ("1 2 3 4 7 9"), so an answer can be cut
between items and an item swapped for another of its kind. `trimode bench quality` and
`python -m trimode.train.evaluate --editing` both draw their editing items here:
- a hole: one or two consecutive items of the answer (`cut_hole`);
- a wrong draft: the answer with one item replaced by a different letter or digit (`wrong_draft`).
"""

from __future__ import annotations

import random
import string
from dataclasses import dataclass

from trimode.tasks.base import Task, prompt_text

EDIT_TASKS = ("copy", "reverse", "sort")


@dataclass(frozen=True)
class Hole:
    """An answer cut around one or two of its items: `before` + `hole` + `after` are its items, in order."""

    before: list[str]
    hole: list[str]
    after: list[str]

    @property
    def middle(self) -> str:
        """The hole's items as the answer writes them: "3 4"."""
        return " ".join(self.hole)

    @property
    def head(self) -> str:
        """The answer up to the hole, cut before the space of the hole's first item: "1 2"."""
        return " ".join(self.before)

    @property
    def tail(self) -> str:
        """The answer after the hole, each item with the space before it: " 7 9"."""
        return "".join(" " + item for item in self.after)


def cut_hole(answer: str, rng: random.Random) -> Hole:
    """A hole of one or two consecutive items (one when the answer has only one), at a random place."""
    items = answer.split(" ")
    size = min(rng.choice((1, 2)), len(items))
    at = rng.randrange(len(items) - size + 1)
    return Hole(items[:at], items[at : at + size], items[at + size :])


def other_item(item: str, rng: random.Random) -> str:
    """A different item of the same kind: another digit for a digit, another lowercase letter otherwise."""
    pool = string.digits if item.isdigit() else string.ascii_lowercase
    return rng.choice([c for c in pool if c != item])


def wrong_draft(answer: str, rng: random.Random) -> str:
    """The answer with one item, at a random place, replaced by `other_item`."""
    items = answer.split(" ")
    at = rng.randrange(len(items))
    items[at] = other_item(items[at], rng)
    return " ".join(items)


@dataclass(frozen=True)
class InfillItem:
    """Text cut after the space before the hole: `prefix` ("<prompt>1 2 ") + `middle` ("3 4") + `suffix`."""

    prefix: str
    suffix: str
    middle: str


@dataclass(frozen=True)
class RevisionItem:
    prompt: str
    draft: str
    answer: str


def infill_items(tasks: list[Task], tokenizer, seed: int) -> list[InfillItem]:
    """One hole per task item, the prompt rendered for `tokenizer` (see `prompt_text`)."""
    rng = random.Random(f"infill:{seed}")
    out = []
    for task in tasks:
        hole = cut_hole(task.answer, rng)
        prefix = prompt_text(task, tokenizer) + "".join(item + " " for item in hole.before)
        out.append(InfillItem(prefix, hole.tail, hole.middle))
    return out


def revision_items(tasks: list[Task], tokenizer, seed: int) -> list[RevisionItem]:
    """One wrong draft per task item, the prompt rendered for `tokenizer` (see `prompt_text`)."""
    rng = random.Random(f"revise:{seed}")
    return [RevisionItem(prompt_text(task, tokenizer), wrong_draft(task.answer, rng), task.answer) for task in tasks]
