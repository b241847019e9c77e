"""What a task is, how the train / held-out split is decided, and the registry `load_tasks` reads.

A task item is a prompt with a checkable answer. Items are generated from a seed; which split an item belongs
to is decided by a hash of its *split key* (the prompt for generated items, the source file for items cut from
code), never by the seed, so the held-out items are disjoint from every training item whatever seeds are used.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

SPLITS = ("train", "heldout")
HELDOUT_FRACTION = 0.1


def split_of(key: str, heldout_fraction: float = HELDOUT_FRACTION) -> str:
    """"heldout" for a stable `heldout_fraction` of keys, "train" for the rest (sha256, not Python's hash)."""
    h = int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "big") / 2**64
    return "heldout" if h < heldout_fraction else "train"


def check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; use 'train' or 'heldout'")


def first_line(output: str) -> str:
    """The first non-empty line of a model's output, stripped."""
    for line in output.splitlines():
        if line.strip():
            return line.strip()
    return ""


def exact_line(output: str, answer: str) -> bool:
    """The answer is the first non-empty output line, up to surrounding and repeated inner whitespace."""
    return " ".join(first_line(output).split()) == " ".join(answer.split())


@dataclass(frozen=True)
class Task:
    """One item: `prompt` (a user message when `chat`, else raw text to continue) and its `answer`.

    A conversation item (structured output, tool calls) also has `messages`, the chat before the answer (the
    user turn, a system turn with a schema, earlier tool calls and results), and `tools`, the OpenAI tool dicts
    the chat template lists; `prompt` is then the user's request, the item's identity."""

    name: str
    prompt: str
    answer: str
    checker: Callable[[str, str], bool] = exact_line
    chat: bool = True
    max_new_tokens: int = 32
    target: str = ""  # the exact continuation to train on, when it differs from `answer` (e.g. a leading newline)
    messages: tuple[dict, ...] = field(default=(), hash=False)
    tools: tuple[dict, ...] = field(default=(), hash=False)

    def check(self, output_text: str) -> bool:
        """Whether the model's generated text (prompt excluded) answers the item correctly."""
        return self.checker(output_text, self.answer)

    @property
    def completion(self) -> str:
        """What a model should generate after the prompt (the assistant message, for chat items)."""
        return self.target or self.answer


def prompt_text(item, tokenizer) -> str:
    """What a model is given for `item` (a `Task`, or any item with `.prompt` and `.chat`): a chat item's prompt
    as a user turn (a conversation item's `messages`, with its `tools`) when `tokenizer` (an `NLDTokenizer`, or
    None) has a chat template, else the prompt as is."""
    if getattr(item, "chat", False) and tokenizer is not None and tokenizer.chat_template:
        messages = list(getattr(item, "messages", ())) or [{"role": "user", "content": item.prompt}]
        return tokenizer.apply_chat_template(messages, tools=list(getattr(item, "tools", ())) or None)
    return item.prompt


@dataclass(frozen=True)
class TaskSpec:
    name: str
    description: str
    # items(rng, split) yields an endless (or exhausting) stream of candidate items of `split`
    items: Callable[[random.Random, str], Iterator[Task]]
    conversation: bool = False  # items are conversations (a schema, tools): not among the defaults of plain_tasks


TASKS: dict[str, TaskSpec] = {}


def plain_tasks() -> list[str]:
    """The names of the tasks asked as one prompt, in registration order: what benches and the sampler recipe
    take when no task is named (the structured tasks are conversations and are named explicitly)."""
    return [name for name, spec in TASKS.items() if not spec.conversation]


def register(spec: TaskSpec) -> TaskSpec:
    TASKS[spec.name] = spec
    return spec


def load_tasks(name: str, n: int, seed: int = 0, split: str = "heldout") -> list[Task]:
    """`n` distinct items of task `name` from `split`, the same for the same (name, n, seed, split)."""
    check_split(split)
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; known: {', '.join(sorted(TASKS))}")
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    rng = random.Random(f"{name}:{split}:{seed}")
    seen: set[str] = set()
    out: list[Task] = []
    misses = 0
    for task in TASKS[name].items(rng, split):
        if len(out) >= n:
            break
        if task.prompt in seen:
            misses += 1
            if misses > 50 * (n + 10):  # a small item space would otherwise loop for ever
                break
            continue
        seen.add(task.prompt)
        out.append(task)
    if len(out) < n:
        raise ValueError(f"task {name!r} has only {len(out)} distinct {split} items, {n} were asked for")
    return out


def generated(name: str, draw: Callable[[random.Random], tuple[str, str]], split: str, rng: random.Random,
              **task_fields) -> Iterator[Task]:
    """Items from `draw(rng) -> (prompt, answer)`, kept when the prompt hashes into `split`."""
    while True:
        prompt, answer = draw(rng)
        if split_of(f"{name}:{prompt}") == split:
            yield Task(name, prompt, answer, **task_fields)
