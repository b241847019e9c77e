"""The task items (trimode.tasks) and the mode evaluation that scores them (trimode.train.evaluate)."""

import re

import pytest
import torch

from tests.conftest import random_model
from trimode.api import TriMode
from trimode.tasks import TASKS, Task, load_tasks, split_of
from trimode.tasks.arithmetic import first_integer
from trimode.tasks.base import exact_line
from trimode.tasks.code import function_items, stdlib_files
from trimode.train.evaluate import evaluate_modes, majority_baseline, markdown_table, markdown_tpf_table, mode_label
from trimode.train.tokenizer_train import config_fields, train_tokenizer

GENERATED = ["arithmetic", "copy", "reverse", "sort"]



@pytest.mark.parametrize("name", GENERATED)
def test_generated_items_are_reproducible_distinct_and_split_disjoint(name):
    train = load_tasks(name, 300, seed=0, split="train")
    assert load_tasks(name, 300, seed=0, split="train") == train
    assert load_tasks(name, 300, seed=1, split="train") != train
    heldout = [t for seed in range(3) for t in load_tasks(name, 100, seed=seed, split="heldout")]
    assert len({t.prompt for t in train}) == 300
    assert not {t.prompt for t in train} & {t.prompt for t in heldout}
    assert all(split_of(f"{name}:{t.prompt}") == "heldout" for t in heldout)
    for t in train[:50]:
        assert t.check(t.answer) and t.check(t.completion)
        assert len(t.prompt) < 200


def test_answers_are_right():
    for t in load_tasks("arithmetic", 400, seed=3, split="train"):
        if m := re.fullmatch(r"What is (\d+) plus (\d+)\?", t.prompt):
            assert int(t.answer) == int(m[1]) + int(m[2])
        elif m := re.fullmatch(r"What is (\d+) minus (\d+)\?", t.prompt):
            assert int(t.answer) == int(m[1]) - int(m[2]) >= 0
        elif m := re.search(r"buys (\d) bags with (\d) ", t.prompt):
            assert int(t.answer) == int(m[1]) * int(m[2])
    for t in load_tasks("copy", 50, split="heldout"):
        assert t.answer == t.prompt.removeprefix("Copy: ")
    for t in load_tasks("reverse", 50, split="heldout"):
        assert t.answer.split() == t.prompt.removeprefix("Reverse: ").split()[::-1]
    for t in load_tasks("sort", 50, split="heldout"):
        assert t.answer.split() == sorted(t.prompt.removeprefix("Sort: ").split())


def test_checkers():
    assert first_integer("The answer is 12 apples.", "12") and not first_integer("112", "12")
    assert not first_integer("no number", "3") and first_integer("-4", "-4")
    assert exact_line("\n  a  b c\nmore", "a b c") and not exact_line("a b", "a b c") and not exact_line("", "a")
    t = Task("copy", "Copy: a b", "a b")
    assert t.check("a b\nsomething else") and not t.check("b a")


def test_python_next_line_comes_from_heldout_files_only():
    train, heldout = set(stdlib_files("train")), set(stdlib_files("heldout"))
    assert train and heldout and not train & heldout
    assert all(p.suffix == ".py" and "test" not in p.parent.parts for p in heldout)
    items = load_tasks("python_next_line", 20, seed=0, split="heldout")
    assert items == load_tasks("python_next_line", 20, seed=0, split="heldout")
    for t in items:
        assert not t.chat and t.prompt.split("\n")[0].lstrip().startswith(("def ", "async def "))
        assert t.completion.startswith("\n") and t.completion.strip() == t.answer and t.answer
        assert t.check(t.completion) and not t.check("\n    pass_not_this")


def test_function_items_cut_at_a_statement():
    import random

    source = "import os\n\nclass A:\n    def f(self, x):\n        '''Doc.'''\n        y = x + 1\n        return y\n"
    items = function_items(source, random.Random(0))
    assert items in ([("def f(self, x):\n    '''Doc.'''", "    y = x + 1")],
                     [("def f(self, x):\n    '''Doc.'''\n    y = x + 1", "    return y")])
    assert function_items("def broken(:\n", random.Random(0)) == []


def test_load_tasks_errors():
    with pytest.raises(ValueError, match="unknown task 'nope'"):
        load_tasks("nope", 3)
    with pytest.raises(ValueError, match="unknown split"):
        load_tasks("copy", 3, split="test")
    assert set(GENERATED) | {"python_next_line"} <= set(TASKS)


# --------------------------------------------------------------------------------------------- evaluate_modes


@pytest.fixture(scope="module")
def tiny_tm(tmp_path_factory):
    """A random float64 model over a real (tiny) trained tokenizer: fast, and deterministic in every mode."""
    texts = [t.prompt + " " + t.answer for name in GENERATED for t in load_tasks(name, 200, split="train")]
    tok = train_tokenizer(texts, 300, tmp_path_factory.mktemp("tok"))
    fields = config_fields(tok)
    net = random_model(seed=1, vocab=fields["vocab_size"])
    net.config.eos_token_id, net.config.mask_token_id = fields["eos_token_id"], fields["mask_token_id"]
    return TriMode(net, tok)


def test_evaluate_modes_scores_lossless_modes_like_ar(tiny_tm):
    # Items whose answer is exactly the model's own greedy AR text: AR scores 100%, and so must the
    # speculative modes, which are lossless at temperature 0. Diffusion is not lossless; it is only reported.
    base = load_tasks("copy", 4, split="heldout") + load_tasks("arithmetic", 4, split="heldout")
    items = []
    for t in base:
        text = tiny_tm.generate(tiny_tm.tokenizer.apply_chat_template([{"role": "user", "content": t.prompt}]),
                                max_new_tokens=t.max_new_tokens).text
        items.append(Task(t.name, t.prompt, text, checker=str.__eq__, max_new_tokens=t.max_new_tokens))
    modes = [{"mode": "ar"}, {"mode": "diffusion", "threshold": 0.9}, {"mode": "linear_spec", "use_drafter": False},
             {"mode": "quadratic_spec"}]
    rows = evaluate_modes(tiny_tm, items, modes)
    assert [r["mode"] for r in rows] == ["ar", "diffusion@0.9", "linear_spec", "quadratic_spec"]
    by_mode = {r["mode"]: r for r in rows}
    for name in ("ar", "linear_spec", "quadratic_spec"):
        assert by_mode[name]["accuracy"] == 1.0
        assert by_mode[name]["accuracy_by_task"] == {"copy": 1.0, "arithmetic": 1.0}
    assert by_mode["ar"]["tokens_per_forward"] == pytest.approx(
        by_mode["ar"]["generated_tokens"] / by_mode["ar"]["forward_passes"])
    assert by_mode["ar"]["forward_passes"] == by_mode["ar"]["generated_tokens"]  # AR: one token per forward
    assert by_mode["ar"]["tokens_per_decode_forward"] == pytest.approx(
        by_mode["ar"]["generated_tokens"] / (by_mode["ar"]["forward_passes"] - len(items)))
    assert by_mode["linear_spec"]["mean_acceptance"] >= 1.0
    assert all(r["tokens_per_second"] > 0 for r in rows)
    table = markdown_table(rows, majority_baseline(items, n_train=50))
    assert table.count("\n") == 2 + 1 + len(rows) - 1 and "| quadratic_spec |" in table
    ar = by_mode["ar"]
    assert ar["tokens_per_forward_by_task"] == {"copy": 1.0, "arithmetic": 1.0}
    tpf = markdown_tpf_table(rows)
    assert tpf.splitlines()[0] == "| mode | copy | arithmetic |" and "| ar | 1.00 | 1.00 |" in tpf


def test_evaluate_modes_counts_wrong_answers(tiny_tm):
    items = [Task("copy", "Copy: a b", "this answer is never generated", checker=str.__eq__, max_new_tokens=4)]
    rows = evaluate_modes(tiny_tm, items, [{"mode": "ar"}])
    assert rows[0]["accuracy"] == 0.0 and rows[0]["generated_tokens"] >= 1


def test_evaluate_modes_defaults_and_errors(tiny_tm):
    rows = evaluate_modes(tiny_tm, {"sort": 2}, [{"mode": "ar"}])
    assert rows[0]["items"] == 2 and list(rows[0]["accuracy_by_task"]) == ["sort"]
    assert mode_label({"mode": "linear_spec", "use_drafter": True}) == "linear_spec+drafter"
    with pytest.raises(ValueError, match="no linear_spec_lora"):
        evaluate_modes(tiny_tm, {"sort": 1}, [{"mode": "linear_spec", "use_drafter": True}])
    with pytest.raises(ValueError, match="'mode' key"):
        evaluate_modes(tiny_tm, {"sort": 1}, [{"threshold": 0.5}])
    with pytest.raises(ValueError, match="tokenizer"):
        evaluate_modes(TriMode(tiny_tm.net, None), {"sort": 1})


def test_evaluate_command(tiny_tm, tmp_path, capsys):
    from trimode.model.loading import save_checkpoint
    from trimode.train.evaluate import main

    save_checkpoint(tiny_tm.net, tmp_path, dtype=torch.float32)
    tiny_tm.tokenizer.tok.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(__import__("json").dumps(tiny_tm.tokenizer.config))
    assert main(["--model", str(tmp_path), "--n", "2", "--tasks", "copy,sort", "--modes", "ar,linear_spec"]) == 0
    out = capsys.readouterr().out
    assert "| mode | copy | sort | all | tokens/forward | excl. prefill | tokens/s |" in out
    assert "| baseline: most frequent answer |" in out and "| linear_spec |" in out
    assert main(["--model", str(tmp_path), "--tasks", "nope"]) == 2
    assert "error: unknown task(s) nope" in capsys.readouterr().err
    assert main(["--model", str(tmp_path / "missing")]) == 2
    assert capsys.readouterr().err.startswith("error: ")
