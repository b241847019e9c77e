"""Editing: infill, revision and templates keep what they must, batch like the other modes, and reject bad input;
remasking inside diffusion is bounded."""

import dataclasses

import pytest
import torch

from tests.conftest import random_model
from tests.invariance import flat_cost
from trimode.api import BlockState, TriMode, default_model_path, load
from trimode.decode.driver import decode, drive
from trimode.decode.stopping import StopRule
from trimode.engine import Engine, EngineRequest
from trimode.request import infill_request


@pytest.fixture(scope="module")
def tm():
    return TriMode(random_model(3))


@pytest.fixture(scope="module")
def bundled():
    return load(default_model_path())


def test_infill_keeps_prefix_and_suffix_and_returns_the_middle_only(tm):
    prefix, suffix = [9, 12, 30, 31], [40, 41, 42]
    r = tm.infill(prefix, suffix, max_new_tokens=5)
    assert r.mode == "edit" and r.finish_reason == ("length" if len(r.token_ids) == 5 else "stop")  # hole ran full
    assert len(r.token_ids) <= 5 and tm.config.pad_token_id not in r.token_ids
    # The machine's block holds the middle then the suffix, unchanged.
    req = infill_request(tm, prefix, suffix, max_new_tokens=5)
    assert req.edit.block.tokens[5:] == suffix and req.prompt_ids == prefix


def test_empty_token_is_stripped_from_holes(tm):
    req = infill_request(tm, [9, 12], [40, 41], max_new_tokens=4)
    empty = req.edit.empty_id
    ids, _, _ = req.edit.render([20, 21, empty, empty, 40, 41], tm.decode)
    assert ids == [20, 21]


def test_a_hole_grows_from_its_window_while_the_model_fills_it_to_the_end(tm):
    """A random model rarely writes the empty token, so its hole doubles 2 -> 4 -> 8 slots; the last attempt is the
    whole budget filled from scratch, so the tokens are those of no window, after more passes."""
    prefix, suffix = [9, 12, 30, 31], [40, 41, 42]
    whole = tm.infill(prefix, suffix, max_new_tokens=8, hole_window=0)
    assert tm.config.pad_token_id not in whole.token_ids and len(whole.token_ids) == 8
    grown = tm.infill(prefix, suffix, max_new_tokens=8, hole_window=2)
    assert grown.token_ids == whole.token_ids
    assert grown.stats.forward_passes > whole.stats.forward_passes
    req = infill_request(tm, prefix, suffix, max_new_tokens=8, hole_window=2)
    widths = [len(e.token_ids) for e in tm.drive(req, provisional=True) if isinstance(e, BlockState)]
    assert widths and widths[0] == 2 + 3 and widths[-1] == 8 + 3 and sorted(set(widths)) == [5, 7, 11]


def test_a_hole_the_model_ends_stays_in_its_window(bundled):
    """The bundled model ends a one-item hole with pads in the first window: one attempt, 6 slots, whatever the
    budget; the slots past the window are the empty token, stripped like the others."""
    prompt = bundled.tokenizer.apply_chat_template([{"role": "user", "content": "Sort: 7 3 9 1 4 2"}])
    suffix = bundled.encode(" 4 7 9")
    req = infill_request(bundled, bundled.encode(prompt + "1 2"), suffix, max_new_tokens=32)
    widths = {len(e.token_ids) for e in bundled.drive(req, provisional=True) if isinstance(e, BlockState)}
    assert widths == {6 + len(suffix)}
    r = bundled.infill(bundled.encode(prompt + "1 2"), bundled.encode(" 4 7 9"), max_new_tokens=32)
    assert r.text == " 3" and r.stats.forward_passes <= 4


def test_a_prefix_cut_after_a_space_is_healed(bundled):
    """'q w ' ends in a token of its own (' '), where the text 'q w e' has ' e': the hole's first slot takes the
    space's place and must start with it, and the middle comes back without it."""
    tok = bundled.tokenizer
    chat = tok.apply_chat_template([{"role": "user", "content": "Copy: q w e r t y"}])
    ids = tok.encode(chat + "q w ")
    kept, space, first = tok.heal_trailing_space(ids)
    assert kept == ids[:-1] and space == " " and tok.encode(" e")[0] in first
    assert all(tok.token_texts[t].startswith(" ") for t in first)
    assert tok.heal_trailing_space(tok.encode(chat + "q w")) is None  # no trailing space
    assert tok.heal_trailing_space(tok.encode(chat)) is None  # a newline ends tokens anyway: not healed
    r = bundled.infill(chat + "q w ", " t y", max_new_tokens=8)
    assert r.text == "e r" and r.spans == [(0, 3)] and tok.decode(r.token_ids) == " e r"
    # As token ids the caller chose the tokens: no healing unless asked for.
    assert infill_request(bundled, ids, " t y").edit.healed_prefix == ""
    assert infill_request(bundled, ids, " t y", heal=True).edit.healed_prefix == " "
    # Templates heal the text before each hole too; the spans are the holes' words, without the space.
    f = bundled.fill(chat + "q w [[hole:4]] t y")
    assert f.text == chat + "q w e r t y" and [f.text[a:b] for a, b in f.spans] == ["e r"]


def test_revise_with_spans_changes_only_those_tokens(bundled):
    prompt = bundled.tokenizer.apply_chat_template([{"role": "user", "content": "Sort: 7 3 9 1 4 2"}])
    draft = "1 2 3 5 7 9"
    r = bundled.revise(prompt, draft, spans=[(6, 7)])
    assert r.text[:6] == draft[:6] and r.text[7:] == draft[7:]
    assert all(6 <= a and b <= len(r.text) for a, b in r.spans)


def test_revise_without_spans_fixes_a_wrong_item(bundled):
    prompt = bundled.tokenizer.apply_chat_template([{"role": "user", "content": "Sort: 7 3 9 1 4 2"}])
    r = bundled.revise(prompt, "1 2 3 5 7 9")
    assert r.text == "1 2 3 4 7 9"
    assert r.spans == [(6, 7)]
    unchanged = bundled.revise(prompt, "1 2 3 4 7 9")
    assert unchanged.text == "1 2 3 4 7 9" and unchanged.spans == []


def test_fill_template_holes(bundled):
    r = bundled.fill("Sort: 3 1 2\n[[hole:2]] 2 [[hole:2]]")
    assert r.text.startswith("Sort: 3 1 2\n")
    assert len(r.spans) == 2 and r.text.count(" 2 ") >= 1


@pytest.mark.parametrize("call, message", [
    (lambda tm: tm.revise([9, 12], "1 2 3", spans=[(0, 2), (1, 3)]), "overlap"),
    (lambda tm: tm.revise([9, 12], "1 2 3", spans=[(2, 9)]), "out of range"),
    (lambda tm: tm.revise([9, 12], "", spans=None), "draft is empty"),
    (lambda tm: tm.fill("no holes here"), "no hole"),
    (lambda tm: tm.infill([9], [10], max_new_tokens=0), "max_new_tokens"),
    (lambda tm: tm.infill([9] * 10, [10], max_new_tokens=5000), "context length"),
    (lambda tm: tm.infill([9], [10], threshold=2.0), "threshold must be in"),
])
def test_bad_edits_raise_value_errors(bundled, call, message):
    with pytest.raises(ValueError, match=message):
        call(bundled)


def test_a_checkpoint_without_a_mask_token_cannot_edit():
    net = random_model(1)
    net.config = dataclasses.replace(net.config, mask_token_id=-1)
    with pytest.raises(ValueError, match="no mask token"):
        TriMode(net).infill([9, 12], [40], max_new_tokens=3)


def test_edits_batched_with_other_modes_equal_their_runs_alone(tm):
    engine = Engine(tm, cost=flat_cost())
    prefix, suffix = [9, 12, 30], [40, 41]
    requests = [
        EngineRequest(prefix, mode="edit", max_new_tokens=4, edit=("infill", {"suffix": suffix})),
        EngineRequest([9, 12], mode="edit", edit=("revise", {"draft": [20, 21, 22, 23]}), knobs={"rounds": 3}),
        EngineRequest([7, 8, 9], mode="ar", max_new_tokens=6),
        EngineRequest([7, 8, 9], mode="diffusion", max_new_tokens=6, knobs={"block_length": 3}),
        EngineRequest(prefix, mode="edit", max_new_tokens=8, edit=("infill", {"suffix": suffix}),
                      knobs={"hole_window": 2}),  # a hole that grows 2 -> 4 -> 8: its passes change width
    ]
    handles = [engine.submit(r) for r in requests]
    while engine.step():
        pass
    got = [h.result() for h in handles]
    assert got[0].token_ids == tm.infill(prefix, suffix, max_new_tokens=4).token_ids
    assert got[1].token_ids == tm.revise([9, 12], [20, 21, 22, 23], rounds=3).token_ids
    assert got[2].token_ids == tm.generate([7, 8, 9], max_new_tokens=6).token_ids
    alone = tm.infill(prefix, suffix, max_new_tokens=8, hole_window=2)
    assert got[4].token_ids == alone.token_ids and got[4].stats.forward_passes == alone.stats.forward_passes
    assert alone.stats.forward_passes > tm.infill(prefix, suffix, max_new_tokens=8, hole_window=0).stats.forward_passes


def test_remasking_is_bounded_and_off_by_default():
    net = random_model(5)
    ids = torch.tensor([[10, 20, 30]])
    plain = drive(decode(net, "diffusion", ids, StopRule(12), block_length=6, threshold=1.0))
    same = drive(decode(net, "diffusion", ids, StopRule(12), block_length=6, threshold=1.0, remask_threshold=None))
    assert plain.tokens == same.tokens
    remasked = drive(decode(net, "diffusion", ids, StopRule(12), block_length=6, threshold=1.0,
                            remask_threshold=0.99))
    assert len(remasked.tokens[0]) == 12
    # Each slot is remasked at most twice: at most 3 x 5 denoising passes per block, plus prefill and refresh.
    assert plain.stats.forward_passes < remasked.stats.forward_passes <= 1 + 2 * 15 + 1
    with pytest.raises(ValueError, match="remask_threshold"):
        drive(decode(net, "diffusion", ids, StopRule(12), steps=2, remask_threshold=0.5))


def test_cli_infill_and_revise():
    import subprocess
    import sys

    def cli(*args):
        return subprocess.run([sys.executable, "-m", "trimode.cli", *args], capture_output=True, text=True,
                              timeout=300)

    r = cli("revise", "--chat", "Sort: 7 3 9 1 4 2", "1 2 3 5 7 9")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "1 2 3 4 7 9" and "changed: [6, 7]" in r.stderr
    r = cli("infill", "--chat", "Sort: 7 3 9 1 4 2", "1 2 ", " 4 7 9", "-n", "2")
    assert r.returncode == 0 and "[infill]" in r.stderr
    for bad, message in ((("revise", "x", "--span", "5:9"), "out of range"),
                         (("revise", "x", "--span", "nope"), "START:END"),
                         (("infill", "a", "b", "-n", "0"), "max_new_tokens")):
        r = cli(*bad)
        assert r.returncode == 2 and r.stderr.startswith("error:") and message in r.stderr, r.stderr
        assert "Traceback" not in r.stderr
