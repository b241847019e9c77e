"""The model that ships in the package: loads with no argument, has learned its tasks, and shows the tri-mode
shape (parallel modes commit several tokens per forward; greedy self-speculation is exactly AR)."""

import subprocess
import sys

import pytest

import trimode
from tests.edit_oracle import infill_tokens, revise_tokens
from trimode.tasks import load_tasks, prompt_text
from trimode.train.evaluate import SUFFIX_LENGTHS, evaluate_editing, evaluate_suffix_span


@pytest.fixture(scope="module")
def bundled():
    return trimode.load()


def test_readme_command_sorts_in_few_forwards():
    r = subprocess.run([sys.executable, "-m", "trimode.cli", "generate", "--chat", "--mode", "linear_spec",
                        "Sort: 7 3 9 1 4 2"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "1 2 3 4 7 9"
    assert "[linear_spec] 12 tokens, 3 forward passes" in r.stderr


def test_speculation_is_ar_and_parallel_modes_commit_more_than_one_token_per_forward(bundled):
    items = [t for name in ("copy", "reverse", "sort") for t in load_tasks(name, 4, seed=1)]
    tokens = {m: 0 for m in ("ar", "linear_spec", "quadratic_spec", "diffusion")}
    forwards = dict.fromkeys(tokens, 0)
    for task in items:
        prompt = prompt_text(task, bundled.tokenizer)
        ar = bundled.generate(prompt, mode="ar", max_new_tokens=task.max_new_tokens)
        assert task.check(ar.text)
        for mode in tokens:
            r = bundled.generate(prompt, mode=mode, max_new_tokens=task.max_new_tokens)
            if mode != "diffusion":
                assert r.token_ids == ar.token_ids, (mode, task.prompt)
            tokens[mode] += r.stats.generated_tokens
            forwards[mode] += r.stats.forward_passes
    tpf = {m: tokens[m] / forwards[m] for m in tokens}
    assert tpf["ar"] == 1.0
    assert tpf["linear_spec"] > 1.5 and tpf["quadratic_spec"] > 2.0 and tpf["diffusion"] > 2.0, tpf


def test_statistics_count_only_what_is_emitted(bundled):
    # "7" then EOS: the model keeps predicting EOS after the answer, and drafts past EOS agree with it; such
    # tokens are not output, so they count neither as accepted nor as committed.
    prompt = bundled.tokenizer.apply_chat_template([{"role": "user", "content": "What is 2 plus 5?"}])
    r = bundled.generate(prompt, mode="linear_spec", max_new_tokens=8)
    assert r.text == "7" and len(r.token_ids) == 2
    assert r.stats.forward_passes == 3 and r.stats.acceptance == [1] and r.stats.mean_acceptance == 1.0
    q = bundled.generate(prompt, mode="quadratic_spec", max_new_tokens=8)
    assert sum(q.stats.acceptance) == len(q.token_ids)
    d = bundled.generate(prompt, mode="diffusion", max_new_tokens=8)
    assert sum(d.stats.step_commits) <= len(d.token_ids)
    for stops in (["7"], None):  # a stop string: the tokens after it are dropped from the statistics too
        s = bundled.generate(prompt, mode="linear_spec", max_new_tokens=8, stop=stops)
        assert sum(s.stats.acceptance) + 1 == len(s.token_ids)


def test_bundled_model_fills_holes_and_fixes_a_wrong_item(bundled):
    """Stages 4 and 5 (recipes/default_model_stage4.yaml, _stage5*.yaml): infill of a one- or two-item hole (cut
    before and after the space) and revision of one wrong item, on held-out items the model card's table does not
    use (seed 1), with a margin under the card's rates."""
    rows = evaluate_editing(bundled, ("copy", "sort"), n=10, seed=1)
    for r in rows:
        assert r["infill_accuracy"] >= 0.6 and r["infill_accuracy_after_space"] >= 0.6, r
        assert r["revision_fix_rate"] >= 0.8 and r["revision_kept"] >= 0.9, r
        assert r["revision_remasked"] <= 2.0 and r["revision_remasked_right"] <= 0.5, r  # the wrong token, not all


def test_tm_infill_and_tm_revise_are_the_editing_contract(bundled):
    """tests/edit_oracle.py writes infill and revision with plain forward passes of the network; the API's edit
    machine (which `trimode.train.evaluate --editing` and the model card's table run) gives the same tokens."""
    tok = bundled.tokenizer
    chat = bundled.tokenizer.apply_chat_template([{"role": "user", "content": "Copy: q w e r t y"}])
    for before, after in (("q w", " t y"), ("", " e r t y"), ("q w e r", "")):
        ids = tok.encode(chat + before)
        suffix = tok.encode(after) if after else [bundled.config.eos_token_id]
        mine, _ = infill_tokens(bundled.net, ids, suffix, 8)
        assert bundled.infill(ids, suffix, max_new_tokens=8).token_ids == mine
    # Text cut after a space: tm.infill heals the boundary, and so does the evaluation's second column.
    ids = tok.encode(chat + "q w ")
    kept, space, first = tok.heal_trailing_space(ids)
    assert kept == ids[:-1] and space == " "
    mine, _ = infill_tokens(bundled.net, kept, tok.encode(" t y"), 9, first=first)
    got = bundled.infill(chat + "q w ", " t y", max_new_tokens=8)
    assert got.token_ids == mine and got.text == tok.decode(mine)[1:]
    for draft in ("q w e x t y", "q w e r t y", "a w e r t y"):
        mine, _, _ = revise_tokens(bundled.net, tok.encode(chat), tok.encode(draft))
        assert bundled.revise(chat, draft).text == tok.decode(mine)


def test_the_suffix_span_study_scores_the_same_suffix_the_same(bundled):
    """`evaluate --editing --suffix-span`: a suffix that fits one block is not cut, so both columns agree there;
    longer ones are cut to block_size - window tokens."""
    rows = evaluate_suffix_span(bundled, n=4, window=6)
    assert [r["suffix_tokens"] for r in rows] == list(SUFFIX_LENGTHS)
    for r in rows:
        assert r["cut_to"] == min(r["suffix_tokens"], bundled.config.block_size - 6)
        assert 0 < r["whole_ce"] < 20 and 0 <= r["whole_top1"] <= 1
        if r["suffix_tokens"] <= r["cut_to"]:
            assert r["whole_ce"] == r["cut_ce"] and r["whole_top1"] == r["cut_top1"]


def test_bundled_model_answers_under_a_schema_and_calls_tools(bundled):
    """Stage 5 (recipes/default_model_stage5*.yaml): the tasks asked for as JSON objects and as tool calls, on
    held-out items the model card's table does not use (seed 1), ar, with a margin under the card's rates (75%
    right under a schema, 72% tool calls, 97% answers after a tool result); every constrained answer is valid."""
    from trimode.train.evaluate_structured import evaluate_structured

    (row,) = evaluate_structured(bundled, n=6, seed=1, modes=("ar",))
    assert row["schema_valid"] == 1.0, row
    assert row["accuracy_schema"] >= 0.5 and row["call_required"] >= 0.4 and row["answer_after_result"] >= 0.75, row
