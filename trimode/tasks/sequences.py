"""Symbol-manipulation tasks a tiny model can learn: copy, reverse and sort a short list (3-6 items)."""

from __future__ import annotations

import random
import string
from collections.abc import Iterator

from trimode.tasks.base import Task, TaskSpec, generated, register


def _letters(rng: random.Random) -> list[str]:
    return [rng.choice(string.ascii_lowercase) for _ in range(rng.randint(3, 6))]


def _copy(rng: random.Random) -> tuple[str, str]:
    items = " ".join(_letters(rng))
    return f"Copy: {items}", items


def _reverse(rng: random.Random) -> tuple[str, str]:
    items = _letters(rng)
    return f"Reverse: {' '.join(items)}", " ".join(reversed(items))


def _sort(rng: random.Random) -> tuple[str, str]:
    items = [rng.randint(0, 9) for _ in range(rng.randint(3, 6))]
    return f"Sort: {' '.join(map(str, items))}", " ".join(map(str, sorted(items)))


def _spec(name: str, draw, description: str) -> TaskSpec:
    def items(rng: random.Random, split: str) -> Iterator[Task]:
        return generated(name, draw, split, rng, max_new_tokens=20)

    return register(TaskSpec(name, description, items))


COPY = _spec("copy", _copy, "repeat 3-6 space-separated letters")
REVERSE = _spec("reverse", _reverse, "reverse 3-6 space-separated letters")
SORT = _spec("sort", _sort, "sort 3-6 digits ascending")
