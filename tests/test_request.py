"""The request core's edit builders and outputs: every size bounded before it is allocated, spans mapped in one
pass and never cutting a character, stop strings and finish reasons of an infill, a fill's prompt tokens."""

import time

import pytest

from tests.invariance import flat_cost
from trimode.api import default_model_path, load
from trimode.engine import Engine, EngineRequest
from trimode.request import fill_request, infill_request, revise_request
from trimode.request.edits import span_holes


@pytest.fixture(scope="module")
def bundled():
    return load(default_model_path())


@pytest.mark.parametrize("template", ["a [[hole:2000000000]] b", "a [[hole:99999999999999999999999]] b",
                                      "a [[hole:" + "9" * 5000 + "]] b"])
def test_a_hole_larger_than_the_context_is_a_value_error_naming_it(bundled, template):
    with pytest.raises(ValueError, match=r"^hole 1 \(\[\[hole:\d+.*\]\]\) is larger than the context length 2048$"):
        bundled.fill(template)


@pytest.mark.parametrize("call, message", [
    (lambda tm: tm.fill("a [[hole:1500]] b [[hole:1500]] c"),
     r"^hole 2 \(150\d tokens\) does not fit: .* more than the context length 2048$"),
    (lambda tm: tm.fill("a [[hole:0]] b"), "at least 1 token"),
    (lambda tm: tm.fill("a [[hole]] b", hole_tokens=10**5000), r"^hole_tokens \(a huge integer\) exceeds"),
    (lambda tm: tm.fill("x" * 2048 * 40 + "[[hole]]"), r"^template is \d+ characters long"),
    (lambda tm: tm.infill("x", "y", max_new_tokens=2_000_000_000), r"^max_new_tokens \(2000000000\) exceeds"),
    (lambda tm: tm.infill("x", "y", max_new_tokens=-10**5000), r"^max_new_tokens must be >= 1, got a huge"),
    (lambda tm: tm.infill("x", "y" * 2048 * 40), r"^suffix is \d+ characters long"),
    (lambda tm: tm.revise("p", "d" * 2048 * 40), r"^draft is \d+ characters long"),
    (lambda tm: tm.revise("p", "1 2 3", spans=[[0, 10**5000]]), r"^span \[0, a huge integer\] is out of range"),
    (lambda tm: tm.revise("p", "1 2", spans=[[0, 1]] * 4), r"^spans holds 4 ranges"),
    (lambda tm: tm.revise("p", "1 2", spans=[["0", 1]]), "two integers each"),
    (lambda tm: tm.revise("p", "1 2", spans=5), "list of"),
    (lambda tm: tm.infill("x", "y", stop="."), "stop must be a list of strings"),
    (lambda tm: tm.revise("p", "1 2", stop=["."]), "stop applies to an infill"),
])
def test_bad_sizes_are_one_line_value_errors(bundled, call, message):
    with pytest.raises(ValueError, match=message) as err:
        call(bundled)
    assert "\n" not in str(err.value) and len(str(err.value)) < 200


def test_a_draft_longer_than_the_context_is_rejected_before_its_spans_are_mapped(bundled):
    draft = " ".join(str(i % 10) for i in range(6000))  # about 12,000 tokens
    t0 = time.perf_counter()
    with pytest.raises(ValueError, match="context length"):
        revise_request(bundled, "p", draft, spans=[[0, 1]])
    assert time.perf_counter() - t0 < 1.0


def test_spans_map_to_tokens_in_one_pass():
    offsets = [(i, i + 1) for i in range(200_000)]
    t0 = time.perf_counter()
    holes = span_holes(offsets, [(5, 7), (199_990, 200_000)])
    assert time.perf_counter() - t0 < 1.0
    assert [i for i, h in enumerate(holes) if h] == [5, 6, *range(199_990, 200_000)]


@pytest.mark.parametrize("draft, hole_tokens", [("😀😀 1 2", 4), ("中文 1 2", 3)])
def test_a_span_never_cuts_a_character(bundled, draft, hole_tokens):
    """The first character is several byte tokens: a span of it rewrites all of them and keeps the next one whole."""
    req = revise_request(bundled, "Copy: " + draft + "\n", draft, spans=[[0, 1]])
    assert req.edit.block.holes == [True] * hole_tokens + [False] * (len(req.edit.block.holes) - hole_tokens)
    r = bundled.revise("Copy: " + draft + "\n", draft, spans=[[0, 1]])
    assert "\ufffd" not in r.text[len(r.text) - len(draft) + 1:] and r.text.endswith(draft[1:])
    (a, b), = r.spans
    assert a == 0 and r.text[b:] == draft[1:]


def middle_character(text: str) -> str:
    """A stop string the bundled model's middle for ("x", "y") is sure to contain (whatever its weights write)."""
    text = text.strip()
    assert len(text) >= 3, text
    return text[len(text) // 2]


def test_infill_honours_stop_strings(bundled):
    plain = bundled.infill("x", "y", max_new_tokens=8)
    stop = middle_character(plain.text)
    r = bundled.infill("x", "y", max_new_tokens=8, stop=[stop])
    assert r.finish_reason == "stop" and r.text == plain.text[: plain.text.index(stop)]
    assert r.token_ids == plain.token_ids[: len(r.token_ids)] and bundled.decode(r.token_ids).startswith(r.text)
    assert stop in bundled.decode(r.token_ids)  # the tokens through the stop string, as a continuation keeps them


def test_infill_finish_reason_says_whether_the_model_ended_the_middle(bundled):
    full = bundled.infill("x", "y", max_new_tokens=8)  # the bundled model writes all 8 slots here
    assert len(full.token_ids) == 8 and full.finish_reason == "length"
    chat = bundled.tokenizer.apply_chat_template([{"role": "user", "content": "Sort: 7 3 9 1 4 2"}])
    ended = bundled.infill(chat + "1 2", " 4 7 9", max_new_tokens=32)
    assert ended.text == " 3" and ended.finish_reason == "stop"


def test_a_healed_infill_stays_within_max_new_tokens(bundled):
    chat = bundled.tokenizer.apply_chat_template([{"role": "user", "content": "Copy: q w e r t y"}])
    for n in (1, 2, 8):
        req = infill_request(bundled, chat + "q w ", " t y", max_new_tokens=n)
        assert req.edit.healed_prefix == " " and req.rule.max_new_tokens == n + len(bundled.encode(" t y"))
        r = bundled.infill(chat + "q w ", " t y", max_new_tokens=n)
        assert 1 <= len(r.token_ids) <= n and r.stats.generated_tokens == len(r.token_ids)


def test_a_fill_reports_its_template_as_prompt_tokens(bundled):
    template = "Sort: 3 1 2\n[[hole:2]] 2 [[hole:2]]"
    req = fill_request(bundled, template)
    kept = sum(n for kind, n in req.edit.segments if kind == "keep")
    assert kept > 0
    r = bundled.fill(template)
    assert r.stats.prompt_tokens == len(req.prompt_ids) + kept
    engine = Engine(bundled, cost=flat_cost())
    handle = engine.submit(EngineRequest([], "edit", 1, edit=("fill", {"template": template})))
    while engine.step():
        pass
    got = handle.result()
    assert got.stats.prompt_tokens == r.stats.prompt_tokens and got.text == r.text


def test_the_engine_cuts_an_infill_at_its_stop_strings(bundled):
    stop = middle_character(bundled.infill("x", "y", max_new_tokens=8).text)
    engine = Engine(bundled, cost=flat_cost())
    handle = engine.submit(EngineRequest(bundled.encode("x"), "edit", 8, stop=[stop],
                                         edit=("infill", {"suffix": bundled.encode("y")})))
    while engine.step():
        pass
    got = handle.result()
    alone = bundled.infill("x", "y", max_new_tokens=8, stop=[stop])
    assert got.finish_reason == "stop" and got.text == alone.text and got.token_ids == alone.token_ids
