"""Python next-line completion cut from the standard library, and the stdlib file list the corpus shares.

Items: the beginning of a function (its `def` line down to some statement) is the prompt, the statement's
first line is the answer; the check is an exact match of the first generated line, whitespace normalised.
The split is by source file (the same hash the corpus uses), so no held-out file is ever trained on.
"""

from __future__ import annotations

import ast
import random
import sysconfig
import textwrap
from collections.abc import Iterator
from functools import lru_cache
from pathlib import Path

from trimode.tasks.base import Task, TaskSpec, check_split, register, split_of

STDLIB_HELDOUT_FRACTION = 0.05
# Test suites, generated tables (codecs, pydoc topics) and build data are not code worth learning from.
EXCLUDED_PARTS = {"site-packages", "test", "tests", "idle_test", "__pycache__", "encodings", "pydoc_data",
                  "turtledemo", "ensurepip"}
MAX_PROMPT_CHARS = 600
MAX_PROMPT_LINES = 16


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


@lru_cache(maxsize=4)
def _all_stdlib_files(root: str) -> tuple[str, ...]:
    base = Path(root)
    keep = []
    for p in base.rglob("*.py"):
        rel = p.relative_to(base)
        if EXCLUDED_PARTS & set(rel.parts[:-1]) or rel.name.startswith("_sysconfigdata") or rel.parts[0].startswith(
            "config-"
        ):
            continue
        keep.append(rel.as_posix())
    return tuple(sorted(keep))


def stdlib_files(split: str, root: str | Path | None = None) -> list[Path]:
    """The stdlib's Python files of `split`, in sorted relative-path order (split by a hash of that path)."""
    check_split(split)
    base = Path(root) if root is not None else stdlib_root()
    if not base.is_dir():
        raise ValueError(f"no Python standard library at {base}")
    return [base / rel for rel in _all_stdlib_files(str(base))
            if split_of(f"stdlib:{rel}", STDLIB_HELDOUT_FRACTION) == split]


def function_items(source: str, rng: random.Random) -> list[tuple[str, str]]:
    """(prompt, answer line) pairs, at most one per function of `source`; [] if it does not parse."""
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return []
    lines = source.splitlines()
    out = []
    for fn in ast.walk(tree):
        if not isinstance(fn, ast.FunctionDef | ast.AsyncFunctionDef):
            continue
        body = fn.body[1:] if _has_docstring(fn) else fn.body
        starts = sorted({s.lineno for node in body for s in ast.walk(node) if isinstance(s, ast.stmt)})
        # At least two prompt lines: a bare `def` line rarely determines the next one.
        starts = [n for n in starts if fn.lineno + 2 <= n <= fn.lineno + MAX_PROMPT_LINES]
        if not starts:
            continue
        at = rng.choice(starts)
        chunk = textwrap.dedent("\n".join(lines[fn.lineno - 1 : at]))
        prompt, answer = chunk.rsplit("\n", 1)
        if not answer.strip() or len(prompt) > MAX_PROMPT_CHARS or "\t" in chunk:
            continue
        out.append((prompt.rstrip(), answer.rstrip()))
    return out


def _has_docstring(fn: ast.FunctionDef | ast.AsyncFunctionDef) -> bool:
    first = fn.body[0]
    return isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value, str)


def _items(rng: random.Random, split: str) -> Iterator[Task]:
    files = stdlib_files(split)
    rng.shuffle(files)
    for path in files:
        try:
            source = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        for prompt, answer in function_items(source, rng):
            yield Task("python_next_line", prompt, answer.strip(), chat=False, max_new_tokens=40,
                       target="\n" + answer)


PYTHON_NEXT_LINE = register(TaskSpec(
    "python_next_line", "the next line of a stdlib function (raw completion, exact match)", _items))
