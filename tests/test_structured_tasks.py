"""The structured task items (trimode/tasks/structured.py): deterministic, held-out items disjoint from training
items (of their own kind and of the base task), and the training text is what constrained decoding writes: the
grammar of the schema / of the tool choice accepts the target token by token and then EOS."""

import json

import pytest

from trimode.api import default_model_path
from trimode.decode.grammar import Constraint, compile_constraint
from trimode.model.tokenizer import NLDTokenizer
from trimode.request.tools import parse_tool_calls, tool_grammar
from trimode.tasks import STRUCTURED_TASKS, load_tasks, prompt_text
from trimode.tasks.structured import BASE_TASKS, TOOLS, bounded, item_schema
from trimode.train.corpus import load_corpus
from trimode.train.evaluate_structured import item_functions
from trimode.train.tokenizer_train import CHAT_TEMPLATE


@pytest.fixture(scope="module")
def tok():
    return NLDTokenizer.from_dir(default_model_path())


def accepts(tok, constraint, text):
    g = compile_constraint(tok, tok.vocab_size, [2], constraint).matcher()
    for t in tok.encode(text):
        if not g.accepts(t):
            return False
        g.advance(t)
    return g.accepts(2)


def test_items_are_deterministic_and_distinct_per_seed():
    for name in STRUCTURED_TASKS:
        a, b = load_tasks(name, 20, seed=3, split="train"), load_tasks(name, 20, seed=3, split="train")
        assert [(t.prompt, t.completion, t.messages, t.tools) for t in a] == \
               [(t.prompt, t.completion, t.messages, t.tools) for t in b]
        assert len({t.prompt for t in a}) == 20
        assert [t.prompt for t in load_tasks(name, 20, seed=4, split="train")] != [t.prompt for t in a]


def test_heldout_items_ask_heldout_questions():
    for task in BASE_TASKS:
        base_train = {t.prompt for t in load_tasks(task, 3000, seed=0, split="train")}
        for kind in ("json", "toolcall", "toolresult"):
            held = {t.prompt for s in (0, 1) for t in load_tasks(f"{kind}_{task}", 40, seed=s, split="heldout")}
            train = {t.prompt for s in (0, 1) for t in load_tasks(f"{kind}_{task}", 200, seed=s, split="train")}
            assert not held & train and not held & base_train, (kind, task)


def test_json_targets_are_what_the_schema_grammar_writes(tok):
    for task in BASE_TASKS:
        items = load_tasks(f"json_{task}", 40, seed=0, split="train")
        shapes = set()
        for item in items:
            schema = item_schema(item)
            assert item.completion == json.dumps(json.loads(item.completion))  # ", " and ": " only
            assert accepts(tok, Constraint.json_schema(schema), item.completion), item.completion
            assert accepts(tok, Constraint.json_schema(bounded(schema)), item.completion), item.completion
            assert item.check(item.completion)
            assert not item.check(item.completion.replace(":", ": 1,", 1))
            shapes.add(tuple(p["type"] for p in schema["properties"].values()))
        assert len(shapes) >= 2, task  # more than one shape per task
    wrong = load_tasks("json_sort", 1, seed=0, split="train")[0]
    key = next(iter(item_schema(wrong)["properties"]))
    assert not wrong.check(json.dumps({key: "0 1 2 3 4 5 6 7 8 9"}))


def test_tool_call_targets_are_what_the_tool_grammar_writes(tok):
    for task in BASE_TASKS:
        for item in load_tasks(f"toolcall_{task}", 20, seed=0, split="train"):
            fns = item_functions(item)
            assert TOOLS[task][0] in [f.name for f in fns] and 1 <= len(fns) <= 2
            for choice in ("required", TOOLS[task][0]):
                assert accepts(tok, tool_grammar(fns, choice), item.completion), (choice, item.completion)
            _, calls = parse_tool_calls(item.completion)
            assert len(calls) == 1 and calls[0]["function"]["name"] == TOOLS[task][0]
            assert item.check(item.completion)
            other = item.completion.replace('": "', '": "x', 1) if '": "' in item.completion else \
                item.completion.replace('["', '["x', 1)
            assert not item.check(other)


def test_tool_result_items_end_with_the_tool_response(tok):
    for task in BASE_TASKS:
        item = load_tasks(f"toolresult_{task}", 1, seed=0, split="train")[0]
        text = prompt_text(item, tok)
        assert text.endswith(f"<tool_response>\n{item.answer}\n</tool_response>\n<|assistant|>\n")
        assert "<tool_call>\n{\"name\": " in text and item.check(item.completion)


def test_training_prompts_are_the_inference_prompts(tok):
    """The corpus renders an item as the bundled tokenizer renders it for inference (the same template)."""
    assert tok.chat_template == CHAT_TEMPLATE
    names = ["json_sort", "toolcall_arithmetic", "toolresult_copy"]
    docs = load_corpus([{"kind": "tasks", "counts": {n: 5 for n in names}}], "train", seed=0)
    want = {(prompt_text(t, tok), t.completion) for n in names for t in load_tasks(n, 5, 0, "train")}
    assert {(d.prompt, d.text) for d in docs} == want
    for d in docs:  # and the ids a server encodes for the same messages
        item = next(t for n in names for t in load_tasks(n, 5, 0, "train") if prompt_text(t, tok) == d.prompt)
        assert tok.encode(d.prompt) == tok.encode_chat(list(item.messages), tools=list(item.tools) or None)


def test_plain_tasks_leave_the_conversations_out():
    """Benches and the sampler recipe default to the tasks asked as one prompt: the same five as before the
    structured tasks were registered."""
    from trimode.tasks import TASKS, plain_tasks

    assert sorted(plain_tasks()) == ["arithmetic", "copy", "python_next_line", "reverse", "sort"]
    assert set(STRUCTURED_TASKS) <= set(TASKS) and not set(STRUCTURED_TASKS) & set(plain_tasks())
