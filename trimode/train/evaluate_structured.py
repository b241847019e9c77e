"""Structured output and tool calls per decoding mode (the model card's structured table).

    python -m trimode.train.evaluate --structured --n 20

On held-out items of the structured tasks (`trimode.tasks.structured`), greedy, every mode (`ar`, `linear_spec`,
`quadratic_spec`, `diffusion`, and `auto` through the engine):
- JSON under a schema (`json_<task>`: the schema in the system turn, the task in the user turn): the same prompt
  once with the schema as the constraint (bounded so that every answer fits the budget: `bounded`) and once
  free; schema-valid rate (jsonschema) and answer accuracy of both, tokens per forward of both (prefill counted,
  as the accuracy table counts it);
- tool calls (`toolcall_<task>`, 1-2 tools offered): `tool_choice` "required" (the model picks the tool) and the
  task's tool named; right when the one call has the task's tool and its arguments (`request/tools.py`'s
  grammar writes the call, its parser reads it);
- the answer after a tool's result (`toolresult_<task>`, the call and its result in the history), free text.

Prompts are encoded as a server encodes a chat request: `encode_chat(messages, tools=...)`.
"""

from __future__ import annotations

import json
import sys
import time
from collections import Counter

import jsonschema

from trimode.api import TriMode
from trimode.decode.grammar import Constraint
from trimode.engine.engine import Engine
from trimode.engine.request import EngineRequest
from trimode.request.tools import Function, tool_grammar
from trimode.tasks import Task, load_tasks
from trimode.tasks.structured import BASE_TASKS, TOOLS, bounded, item_schema

MODES = ("ar", "linear_spec", "quadratic_spec", "diffusion", "auto")


def item_functions(item: Task) -> list[Function]:
    return [Function(t["function"]["name"], t["function"]["parameters"], t["function"].get("description", ""))
            for t in item.tools]


class _Runner:
    """Greedy generation in one mode: `tm.generate`, or the engine for `auto` (it steers by load there only)."""

    def __init__(self, tm: TriMode, engine: Engine, mode: str) -> None:
        self.tm, self.engine, self.mode = tm, engine, mode
        self.tokens = Counter()
        self.forwards = Counter()

    def __call__(self, item: Task, constraint: Constraint | None, kind: str) -> str:
        ids = self.tm.tokenizer.encode_chat(list(item.messages), tools=list(item.tools) or None)
        if self.mode == "auto":
            req = EngineRequest(ids, mode="auto", max_new_tokens=item.max_new_tokens, constraint=constraint)
            r = [e for e in self.engine.submit(req)][-1]
        else:
            r = self.tm.generate(ids, mode=self.mode, max_new_tokens=item.max_new_tokens, temperature=0.0,
                                 constraint=constraint)
        self.tokens[kind] += r.stats.generated_tokens
        self.forwards[kind] += r.stats.forward_passes
        return r.text or ""

    def tpf(self, kind: str) -> float:
        return self.tokens[kind] / self.forwards[kind] if self.forwards[kind] else 0.0


def _valid(text: str, schema: dict) -> bool:
    try:
        jsonschema.validate(json.loads(text), schema)
    except (ValueError, jsonschema.ValidationError):
        return False
    return True


def _mode_row(run: _Runner, items: dict[str, list[Task]]) -> dict:
    right: Counter[str] = Counter()
    by_task: Counter[str] = Counter()
    for item in items["json"]:
        schema = item_schema(item)
        text = run(item, Constraint.json_schema(bounded(schema)), "schema")
        right["valid"] += _valid(text, schema)
        right["schema"] += item.check(text)
        by_task[item.name] += item.check(text)
        right["free"] += item.check(run(item, None, "free"))
    for item in items["call"]:
        fns = item_functions(item)
        right["required"] += item.check(run(item, tool_grammar(fns, "required"), "call"))
        named = TOOLS[item.name.removeprefix("toolcall_")][0]
        right["named"] += item.check(run(item, tool_grammar(fns, named), "call"))
    for item in items["result"]:
        right["result"] += item.check(run(item, None, "result"))
    nj, nc, nr = len(items["json"]), len(items["call"]), len(items["result"])
    per_task = Counter(t.name for t in items["json"])
    return {"mode": run.mode, "schema_valid": right["valid"] / nj, "accuracy_schema": right["schema"] / nj,
            "accuracy_free": right["free"] / nj,
            "accuracy_schema_by_task": {k: by_task[k] / v for k, v in per_task.items()},
            "tpf_schema": run.tpf("schema"), "tpf_free": run.tpf("free"), "tpf_call": run.tpf("call"),
            "call_required": right["required"] / nc, "call_named": right["named"] / nc,
            "answer_after_result": right["result"] / nr}


def evaluate_structured(tm: TriMode, n: int = 20, seed: int = 0, modes: tuple[str, ...] = MODES,
                        tasks: tuple[str, ...] = BASE_TASKS, progress: bool = False) -> list[dict]:
    """One row per mode (see the module docstring); `n` held-out items per task and kind."""
    if tm.tokenizer is None or not tm.tokenizer.chat_template:
        raise ValueError("the structured evaluation needs a model with a chat template")
    items = {kind: [t for task in tasks for t in load_tasks(f"{prefix}_{task}", n, seed, "heldout")]
             for kind, prefix in (("json", "json"), ("call", "toolcall"), ("result", "toolresult"))}
    rows = []
    with Engine(tm) as engine:
        for mode in modes:
            start = time.perf_counter()
            rows.append(_mode_row(_Runner(tm, engine, mode), items))
            rows[-1]["seconds"] = time.perf_counter() - start
            if progress:
                print(f"{mode}: {rows[-1]['seconds']:.0f}s", file=sys.stderr, flush=True)
    return rows


def markdown_structured_table(rows: list[dict]) -> str:
    head = ("| mode | schema-valid | accuracy under the schema | accuracy free | tokens/forward schema | "
            "tokens/forward free | tool call, required | tool call, named | answer after the result |")
    lines = [head, "|" + "---|" * 9]
    for r in rows:
        lines.append(f"| {r['mode']} | {100 * r['schema_valid']:.0f}% | {100 * r['accuracy_schema']:.1f}% | "
                     f"{100 * r['accuracy_free']:.1f}% | {r['tpf_schema']:.2f} | {r['tpf_free']:.2f} | "
                     f"{100 * r['call_required']:.1f}% | {100 * r['call_named']:.1f}% | "
                     f"{100 * r['answer_after_result']:.1f}% |")
    return "\n".join(lines)


def markdown_schema_by_task(rows: list[dict]) -> str:
    names = list(rows[0]["accuracy_schema_by_task"])
    lines = ["| mode | " + " | ".join(names) + " |", "|" + "---|" * (len(names) + 1)]
    for r in rows:
        lines.append(f"| {r['mode']} | " + " | ".join(f"{100 * r['accuracy_schema_by_task'][k]:.0f}%"
                                                     for k in names) + " |")
    return "\n".join(lines)
