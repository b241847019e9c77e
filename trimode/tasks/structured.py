"""The four learned tasks (arithmetic, copy, reverse, sort) asked for as structured output: a JSON object under a
schema, a tool call, and the answer after a tool's result.

    json_<task>         a system turn gives a JSON schema, the user turn asks the task; the answer is the JSON
                        object, written as the engine's grammar writes it (`json.dumps`: ", " and ": ", nothing
                        else), its keys in the schema's order (alphabetical, as `Constraint.json_schema` keeps
                        them). Shapes: an integer field (arithmetic), a string field, a list of strings, and for
                        the list tasks sometimes a `count` field besides (the number of items).
    toolcall_<task>     the chat template lists 1-2 tools (the task's own and others, shuffled); the user asks the
                        task; the answer is the `<tool_call>` block calling the task's tool with the task's input
                        as arguments (`request/tools.py:call_text`, what the tool-call grammar writes).
    toolresult_<task>   the same conversation with the call made and the tool's result (the task's answer) in
                        the history; the answer is the plain answer.

Each item is built from an item of the base task drawn from the same split, so a held-out structured item asks a
held-out question (disjoint from every training item of either kind); variants (key name, shape, tools offered)
are drawn from the item's own seeded stream.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Iterator

from trimode.request.tools import Function, call_text, parse_tool_calls
from trimode.tasks.arithmetic import first_integer
from trimode.tasks.base import TASKS, Task, TaskSpec, exact_line, register

BASE_TASKS = ("arithmetic", "copy", "reverse", "sort")
INT_KEYS = ("answer", "result", "value", "total")
STR_KEYS = ("answer", "result", "text", "output")
LIST_KEYS = ("items", "answer", "result", "list")

# Each task's tool: its name, its one parameter (name, JSON schema) and how the task's input becomes the argument.
_STRINGS = {"type": "array", "items": {"type": "string"}}
TOOLS = {
    "arithmetic": ("solve", "Solve a word problem", ("question", {"type": "string"}), lambda p: p),
    "copy": ("echo", "Repeat a text", ("text", {"type": "string"}), lambda p: p.removeprefix("Copy: ")),
    "reverse": ("reverse", "Reverse a list", ("items", _STRINGS), lambda p: p.removeprefix("Reverse: ").split()),
    "sort": ("sort_digits", "Sort digits ascending", ("digits", _STRINGS), lambda p: p.removeprefix("Sort: ").split()),
}


def schema_of(properties: dict) -> dict:
    """An object schema with exactly these properties, all required."""
    return {"type": "object", "properties": properties, "required": list(properties), "additionalProperties": False}


def schema_instruction(schema: dict) -> str:
    return "Answer with a JSON object that follows this schema: " + json.dumps(schema)


def item_schema(item: Task) -> dict:
    """The schema a `json_<task>` item's system turn gives."""
    return json.loads(item.messages[0]["content"].split("schema: ", 1)[1])


def bounded(schema: dict) -> dict:
    """`schema` with its strings, arrays and integers bounded (strings 24 characters, lists 8 items of 4, integers
    |n| <= 9999), so that every answer it allows fits in the generation budget: a JSON cut by the budget does not
    parse (docs/structured.md). The prompt shows the schema as given; the engine holds the output to this one."""
    props = {}
    for key, p in schema["properties"].items():
        if p["type"] == "string":
            p = {**p, "maxLength": 24}
        elif p["type"] == "array":
            p = {**p, "maxItems": 8, "items": {**p["items"], "maxLength": 4}}
        elif p["type"] == "integer":
            p = {**p, "minimum": -9999, "maximum": 9999}
        props[key] = p
    return {**schema, "properties": props}


def function_of(task: str) -> Function:
    name, description, (param, param_schema), _ = TOOLS[task]
    return Function(name, schema_of({param: param_schema}), description)


def expected_call(task: str, prompt: str) -> tuple[str, dict]:
    """The call a task's item asks for: (the tool's name, its arguments)."""
    name, _, (param, _), argument = TOOLS[task]
    return name, {param: argument(prompt)}


def _json_value(task: str, answer: str, rng: random.Random) -> tuple[dict, dict]:
    """(the schema's properties, the answer object) for one of the task's shapes."""
    if task == "arithmetic":
        if rng.random() < 0.75:
            key = rng.choice(INT_KEYS)
            return {key: {"type": "integer"}}, {key: int(answer)}
        key = rng.choice(STR_KEYS)
        return {key: {"type": "string"}}, {key: answer}
    shape = rng.randrange(3)
    if shape == 0:
        key = rng.choice(STR_KEYS)
        return {key: {"type": "string"}}, {key: answer}
    key = rng.choice(LIST_KEYS)
    props, obj = {key: _STRINGS}, {key: answer.split()}
    if shape == 2:  # a second field: the model must put each value under its own key
        props["count"], obj["count"] = {"type": "integer"}, len(answer.split())
    order = sorted(props)
    return {k: props[k] for k in order}, {k: obj[k] for k in order}


def json_checker(task: str):
    """Right when the output parses and every field holds the answer (the list as its items, `count` as their
    number)."""
    def check(output: str, answer: str) -> bool:
        try:
            obj = json.loads(output)
        except ValueError:
            return False
        if not isinstance(obj, dict) or not obj:
            return False
        for key, value in obj.items():
            if key == "count" and task != "arithmetic":
                right = value == len(answer.split())
            elif isinstance(value, list):
                right = value == answer.split()
            elif isinstance(value, bool):
                right = False
            elif isinstance(value, int):
                right = task == "arithmetic" and value == int(answer)
            else:
                right = isinstance(value, str) and " ".join(value.split()) == answer
            if not right:
                return False
        return True
    return check


def _json_item(task: str, base: Task, rng: random.Random) -> Task:
    props, obj = _json_value(task, base.answer, rng)
    schema = schema_of(props)
    messages = ({"role": "system", "content": schema_instruction(schema)}, {"role": "user", "content": base.prompt})
    return Task(f"json_{task}", base.prompt, base.answer, json_checker(task), target=json.dumps(obj),
                max_new_tokens=96, messages=messages)


def call_checker(output: str, answer: str) -> bool:
    """Right when the output holds exactly one call, with the expected name and arguments (`answer`: that call as
    `call_text` writes it)."""
    _, calls = parse_tool_calls(output)
    _, expected = parse_tool_calls(answer)
    return (len(calls) == 1 and calls[0]["function"]["name"] == expected[0]["function"]["name"]
            and json.loads(calls[0]["function"]["arguments"]) == json.loads(expected[0]["function"]["arguments"]))


def _offered_tools(task: str, rng: random.Random) -> tuple[dict, ...]:
    others = [t for t in BASE_TASKS if t != task]
    chosen = [task] + rng.sample(others, rng.randint(0, 1))
    rng.shuffle(chosen)
    return tuple(function_of(t).as_tool() for t in chosen)


def _call_item(task: str, base: Task, rng: random.Random) -> Task:
    name, args = expected_call(task, base.prompt)
    text = call_text(name, args)
    return Task(f"toolcall_{task}", base.prompt, text, call_checker, max_new_tokens=96,
                messages=({"role": "user", "content": base.prompt},), tools=_offered_tools(task, rng))


def _result_item(task: str, base: Task, rng: random.Random) -> Task:
    name, args = expected_call(task, base.prompt)
    call = {"id": "call_0", "type": "function", "function": {"name": name, "arguments": args}}
    messages = ({"role": "user", "content": base.prompt}, {"role": "assistant", "content": "", "tool_calls": [call]},
                {"role": "tool", "tool_call_id": "call_0", "content": base.answer})
    checker = first_integer if task == "arithmetic" else exact_line
    return Task(f"toolresult_{task}", base.prompt, base.answer, checker, max_new_tokens=20, messages=messages,
                tools=_offered_tools(task, rng))


def _spec(kind: str, task: str, make: Callable[[str, Task, random.Random], Task], description: str) -> TaskSpec:
    def items(rng: random.Random, split: str) -> Iterator[Task]:
        for base in TASKS[task].items(rng, split):
            yield make(task, base, rng)

    return register(TaskSpec(f"{kind}_{task}", description, items, conversation=True))


for _task in BASE_TASKS:
    _spec("json", _task, _json_item, f"{_task}, answered as a JSON object under a schema given in the system turn")
    _spec("toolcall", _task, _call_item, f"{_task}, answered by calling the task's tool (1-2 tools offered)")
    _spec("toolresult", _task, _result_item, f"{_task}: the tool's result in the history, then the plain answer")

STRUCTURED_TASKS = tuple(f"{kind}_{t}" for kind in ("json", "toolcall", "toolresult") for t in BASE_TASKS)
