"""Seeded arithmetic word problems with small numbers; the answer is one integer.

Sized for a tiny model: operands up to 10 (products up to 5 x 5), one or two steps, short sentences.
"""

from __future__ import annotations

import random
import re
from collections.abc import Iterator

from trimode.tasks.base import Task, TaskSpec, generated, register

NAMES = ["Ann", "Ben", "Cara", "Dev", "Eli", "Fay", "Gus", "Hana", "Ivo", "Jo", "Kim", "Leo", "Mia", "Ned", "Ola",
         "Pat", "Raj", "Sue", "Tom", "Uma", "Vic", "Wes", "Yan", "Zoe"]
THINGS = ["apples", "pens", "coins", "books", "cards", "eggs", "stamps", "shells", "cups", "keys", "rocks", "hats"]
INTEGER = re.compile(r"-?\d+")


def _draw(rng: random.Random) -> tuple[str, str]:
    name, other = rng.sample(NAMES, 2)
    thing = rng.choice(THINGS)
    kind = rng.randrange(8)
    a, b = rng.randint(0, 10), rng.randint(0, 10)
    if kind == 0:
        return f"{name} has {a} {thing}. {name} gets {b} more. How many {thing} does {name} have now?", str(a + b)
    if kind == 1:
        a, b = max(a, b), min(a, b)
        return f"{name} has {a} {thing} and gives {b} to {other}. How many {thing} does {name} have left?", str(a - b)
    if kind == 2:
        return f"There are {a} {thing} in a box. {name} puts in {b} more. How many {thing} are in the box?", str(a + b)
    if kind == 3:
        a, b = rng.randint(2, 5), rng.randint(2, 5)
        return f"{name} buys {a} bags with {b} {thing} in each bag. How many {thing} is that?", str(a * b)
    if kind == 4:
        return f"What is {a} plus {b}?", str(a + b)
    if kind == 5:
        a, b = max(a, b), min(a, b)
        return f"What is {a} minus {b}?", str(a - b)
    if kind == 6:
        c = rng.randint(0, 5)
        a, b = max(a, b), min(a, b)
        return (f"{name} had {a} {thing}, lost {b}, then found {c}. How many {thing} does {name} have?",
                str(a - b + c))
    return f"{name} has {a} {thing} and {other} has {b}. How many {thing} do they have together?", str(a + b)


def first_integer(output: str, answer: str) -> bool:
    """The first integer in the output equals the answer."""
    m = INTEGER.search(output)
    return m is not None and int(m.group()) == int(answer)


def _items(rng: random.Random, split: str) -> Iterator[Task]:
    return generated("arithmetic", _draw, split, rng, checker=first_integer, max_new_tokens=8)


ARITHMETIC = register(TaskSpec("arithmetic", "one- or two-step word problems with small numbers; answer = integer",
                               _items))
