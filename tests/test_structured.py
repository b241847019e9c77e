"""Structured output in every mode (decode/grammar.py, decode/frontier.py): answers always match their
constraint, the lossless modes write exactly what AR writes under it, hostile constraints are refused by name."""

import json
import re

import jsonschema
import pytest
import torch

import trimode
from trimode.decode.grammar import Constraint, compile_constraint
from trimode.decode.stopping import ThinkingBudget
from trimode.engine import Engine, EngineRequest
from trimode.engine.auto import CostModel
from trimode.request.tools import Function, ToolCallStream, chat_inputs, parse_tool_calls, tool_grammar

PROMPTS = ["What is 3 + 4?", "Sort: 5 2 9", "Name a fruit.", "Reverse the word cat.", "Count to three."]
SCHEMA = {
    "$defs": {"item": {"type": "object", "properties": {"name": {"type": "string", "maxLength": 8},
                                                         "qty": {"type": "integer", "minimum": 0, "maximum": 99}},
                       "required": ["name", "qty"], "additionalProperties": False}},
    "type": "object",
    "properties": {"answer": {"type": "integer", "minimum": -999, "maximum": 999},
                   "kind": {"enum": ["sum", "list", "word"]},
                   "items": {"type": "array", "items": {"$ref": "#/$defs/item"}, "maxItems": 2}},
    "required": ["answer", "kind", "items"], "additionalProperties": False,
}
MODES = [("ar", {}), ("linear_spec", {"block_length": 4}), ("quadratic_spec", {"block_length": 4}),
         ("diffusion", {"block_length": 8}), ("diffusion", {"block_length": 8, "threshold": None, "steps": 2})]


@pytest.fixture(scope="module")
def tm():
    return trimode.load()


def chat(tm, text):
    return tm.tokenizer.encode_chat([{"role": "user", "content": text + " Answer in JSON."}])


@pytest.mark.parametrize("mode,knobs", MODES)
def test_every_answer_validates_against_its_schema(tm, mode, knobs):
    for prompt in PROMPTS:
        r = tm.generate(chat(tm, prompt), mode=mode, max_new_tokens=120, json_schema=SCHEMA, **knobs)
        assert r.finish_reason == "stop", (prompt, r.text)
        jsonschema.validate(json.loads(r.text), SCHEMA)


@pytest.mark.parametrize("mode,knobs", MODES)
def test_regex_choice_and_grammar_hold_in_every_mode(tm, mode, knobs):
    for prompt in PROMPTS[:3]:
        ids = chat(tm, prompt)
        r = tm.generate(ids, mode=mode, max_new_tokens=24, regex=r"[0-9]{2}-[a-z]{2,4}", **knobs)
        assert re.fullmatch(r"[0-9]{2}-[a-z]{2,4}", r.text), r.text
        r = tm.generate(ids, mode=mode, max_new_tokens=24, choice=["yes", "no", "not sure"], **knobs)
        assert r.text in ("yes", "no", "not sure")
        r = tm.generate(ids, mode=mode, max_new_tokens=24, grammar='start: "x=" D D\nD: /[0-9]/', **knobs)
        assert re.fullmatch(r"x=[0-9]{2}", r.text), r.text


@pytest.mark.parametrize("sampled", [False, True])
def test_speculative_modes_write_what_ar_writes_under_the_schema(tm, sampled):
    sampling = {"temperature": 0.8, "seed": 7} if sampled else {}
    for prompt in PROMPTS:
        ids = chat(tm, prompt)
        ar = tm.generate(ids, mode="ar", max_new_tokens=60, json_schema=SCHEMA, **sampling)
        for mode, block in (("linear_spec", 3), ("linear_spec", 8), ("quadratic_spec", 3), ("quadratic_spec", 6)):
            r = tm.generate(ids, mode=mode, max_new_tokens=60, json_schema=SCHEMA, block_length=block, **sampling)
            assert r.token_ids == ar.token_ids, (mode, block, prompt)
            assert r.finish_reason == ar.finish_reason


def test_auto_in_the_engine_writes_what_ar_writes(tm):
    constraint = Constraint.json_schema(SCHEMA)
    with Engine(tm, cost=CostModel([(1, 1e-3), (1 << 16, 1e-3)])) as engine:
        for prompt in PROMPTS:
            ids = chat(tm, prompt)
            want = tm.generate(ids, mode="ar", max_new_tokens=80, json_schema=SCHEMA)
            for mode in ("auto", "linear_spec", "diffusion"):
                handle = engine.submit(EngineRequest(ids, mode=mode, max_new_tokens=80, constraint=constraint))
                result = [e for e in handle][-1]
                jsonschema.validate(json.loads(result.text), SCHEMA)
                if mode != "diffusion":
                    assert result.token_ids == want.token_ids, (mode, prompt)


def test_thinking_budget_then_grammar(tm):
    end = tm.tokenizer.token_id("</think>")
    if end is None:
        pytest.skip("no </think> token")
    ids = chat(tm, "What is 3 + 4?")
    ar = tm.generate(ids, mode="ar", max_new_tokens=60, choice=["yes", "no"], max_thinking_tokens=5)
    out = tm.tokenizer.decode(ar.token_ids, skip_special_tokens=False)
    assert ar.token_ids[5] == end or end in ar.token_ids[:5], out
    assert out.split("</think>", 1)[1].replace("</s>", "") in ("yes", "no"), out
    for mode in ("linear_spec", "quadratic_spec"):
        r = tm.generate(ids, mode=mode, max_new_tokens=60, choice=["yes", "no"], max_thinking_tokens=5,
                        block_length=4)
        assert r.token_ids == ar.token_ids, mode


@pytest.mark.parametrize("schema,words", [
    ({"type": "object", "properties": {"a": {"$ref": "#/$defs/missing"}}, "required": ["a"]}, "missing"),
    ({"enum": [f"value{i}" for i in range(10_000)]}, "characters"),
])
def test_hostile_schemas_are_refused_by_name(tm, schema, words):
    with pytest.raises(ValueError, match="JSON schema") as e:
        tm.generate("x", max_new_tokens=4, json_schema=schema)
    assert words in str(e.value)


def test_deep_nesting_and_bad_grammars_are_refused(tm):
    schema: dict = {"type": "integer"}
    for _ in range(300):
        schema = {"type": "array", "items": schema}
    with pytest.raises(ValueError, match="JSON schema"):
        tm.generate("x", max_new_tokens=4, json_schema=schema)
    with pytest.raises(ValueError, match="the grammar"):
        tm.generate("x", max_new_tokens=4, grammar="start: undefined_rule")
    with pytest.raises(ValueError, match="the regex"):
        tm.generate("x", max_new_tokens=4, regex="([a-z]")
    with pytest.raises(ValueError, match="one constraint"):
        tm.generate("x", max_new_tokens=4, regex="a", choice=["a"])


def test_matcher_rollback_forced_tokens_and_thinking_gate(tm):
    schema = {"type": "object", "properties": {"name": {"const": "get_weather"}}, "required": ["name"],
              "additionalProperties": False}
    compiled = compile_constraint(tm.tokenizer, tm.config.vocab_size, tm.eos_ids(), Constraint.json_schema(schema))
    assert compile_constraint(tm.tokenizer, tm.config.vocab_size, tm.eos_ids(),
                              Constraint.json_schema(dict(schema))) is compiled  # cached by spec
    g = compiled.matcher()
    forced = g.forced_tokens()
    assert tm.tokenizer.decode(forced) == '{"name": "get_weather"}'
    mark = g.checkpoint()
    for t in forced:
        assert g.allowed()[t]
        g.advance(t)
    assert g.is_accepting() and not g.finished
    assert g.allowed().nonzero().flatten().tolist() == sorted(tm.eos_ids())
    g.restore(mark)
    assert g.forced_tokens() == forced
    end = tm.tokenizer.token_id("</think>") or 5
    g = compiled.matcher(ThinkingBudget(4, end))
    assert g.allowed().all() and g.forced_tokens() == []
    g.advance(7)
    g.advance(end)
    assert g.forced_tokens() == forced
    g.rollback(1)
    assert g.thinking


def test_forced_tokens_cost_diffusion_no_pass(tm):
    schema = {"type": "object", "properties": {"label": {"enum": ["positive_review", "negative_review"]},
                                               "confidence_level": {"enum": ["high", "low"]}},
              "required": ["label", "confidence_level"], "additionalProperties": False}
    ids = chat(tm, "Classify: good")
    r = tm.generate(ids, mode="diffusion", max_new_tokens=64, json_schema=schema, block_length=16)
    jsonschema.validate(json.loads(r.text), schema)
    # Most of the answer is forced by the schema: far fewer passes than tokens.
    assert r.stats.forward_passes < len(r.token_ids) / 2, (r.stats.forward_passes, len(r.token_ids))


def test_provisional_blocks_mark_the_tokens_the_grammar_forced(tm):
    """A diffusion block's provisional states say which slots the grammar forced (given tokens, no pass): the
    schema's keys and punctuation; without a grammar, nothing is marked."""
    schema = {"type": "object", "properties": {"label": {"enum": ["positive_review", "negative_review"]}},
              "required": ["label"], "additionalProperties": False}
    ids = chat(tm, "Classify: good")
    blocks = []
    events = tm.stream(ids, mode="diffusion", provisional=True, max_new_tokens=40, json_schema=schema,
                       block_length=8)
    while True:
        try:
            ev = next(events)
        except StopIteration as stop:
            result = stop.value
            break
        if hasattr(ev, "forced"):
            blocks.append(ev)
    assert blocks and all(b.forced is not None and len(b.forced) == len(b.token_ids) for b in blocks)
    forced = [[t for t, f in zip(b.token_ids, b.forced, strict=True) if f] for b in blocks]
    assert all(t is not None for ts in forced for t in ts)
    assert '"label": "' in "".join(tm.tokenizer.decode(ts) for ts in forced), forced
    assert result.stats.forward_passes < len(result.token_ids)
    free = [e for e in tm.stream(ids, mode="diffusion", provisional=True, max_new_tokens=8, block_length=8)
            if hasattr(e, "forced")]
    assert free and all(b.forced is None for b in free)


def test_rollback_over_eos_restores_the_state(tm):
    compiled = compile_constraint(tm.tokenizer, tm.config.vocab_size, tm.eos_ids(), Constraint.choice(["ab1"]))
    g = compiled.matcher()
    for t in tm.tokenizer.encode("ab1"):
        g.advance(t)
    mark, allowed = g.checkpoint(), g.allowed()
    eos = min(tm.eos_ids())
    g.advance(eos)
    g.advance(eos)
    assert g.finished
    g.restore(mark)
    assert not g.finished and torch.equal(g.allowed(), allowed)


def test_drafts_under_the_grammar_keep_speculation_ahead_of_ar(tm):
    tokens = forwards = 0
    for prompt in PROMPTS:
        for mode in ("linear_spec", "quadratic_spec"):
            r = tm.generate(chat(tm, prompt), mode=mode, max_new_tokens=80, json_schema=SCHEMA, block_length=6)
            tokens, forwards = tokens + len(r.token_ids), forwards + r.stats.forward_passes
    assert tokens / forwards > 1.5, (tokens, forwards)


@pytest.mark.parametrize("sampled", [False, True])
def test_grammar_and_logit_processors_meet_in_the_decision_stage(tm, sampled):
    """A grammar's masks and the logit processors apply in the one decision stage: under both, the lossless modes
    still write AR's tokens (and its log-probabilities), and every answer matches its schema."""
    ids = chat(tm, PROMPTS[0])
    kw = dict(max_new_tokens=60, json_schema=SCHEMA, frequency_penalty=0.8, repetition_penalty=1.2, logprobs=2,
              logit_bias={tm.encode("1")[0]: 3.0})
    if sampled:
        kw |= dict(temperature=0.8, seed=11)
    ref = tm.generate(ids, mode="ar", **kw)
    jsonschema.validate(json.loads(ref.text), SCHEMA)
    assert len(ref.logprobs) == len(ref.token_ids)
    for mode in ("linear_spec", "quadratic_spec"):
        r = tm.generate(ids, mode=mode, block_length=4, **kw)
        assert r.token_ids == ref.token_ids, mode
        assert [lp for lp, _ in r.logprobs] == pytest.approx([lp for lp, _ in ref.logprobs], abs=1e-3), mode
    r = tm.generate(ids, mode="diffusion", block_length=8, **{k: v for k, v in kw.items() if k != "logprobs"})
    jsonschema.validate(json.loads(r.text), SCHEMA)


WEATHER = Function("get_weather", {"type": "object", "properties": {"city": {"enum": ["Paris", "Oslo"]}},
                                   "required": ["city"], "additionalProperties": False})
CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'


def walk(tm, matcher, text: str) -> bool:
    """Whether the grammar takes every token of `text` (the matcher is left after the last one it took)."""
    for t in tm.tokenizer.encode(text):
        if not matcher.accepts(t):
            return False
        matcher.advance(t)
    return True


def test_auto_tool_choice_lets_text_come_before_a_call(tm):
    """`tool_choice="auto"`: free text, a call, or text then calls; from `<tool_call>\n` on, the call grammar
    holds (its name and arguments forced or masked), and nothing follows the last call."""
    def matcher(parallel=True):
        c = tool_grammar([WEATHER], "auto", parallel)
        return compile_constraint(tm.tokenizer, tm.config.vocab_size, tm.eos_ids(), c).matcher()

    for text in ("Just text, no call.", "a <tool_ca", CALL, "Let me check.\n" + CALL, f"Both:\n{CALL}\n{CALL}"):
        g = matcher()
        assert walk(tm, g, text) and g.is_accepting(), text
    g = matcher()
    assert walk(tm, g, "Let me check.\n<tool_call>\n")
    assert not g.is_accepting()
    assert tm.tokenizer.decode(g.forced_tokens()) == '{"name": "get_weather", "arguments": {"city": "'
    assert not walk(tm, matcher(), 'x <tool_call>\n{"name": "other"')
    assert not walk(tm, matcher(), CALL + " and text after it")
    assert not walk(tm, matcher(parallel=False), f"{CALL}\n{CALL}")
    content, calls = parse_tool_calls("Let me check.\n" + CALL)
    assert content == "Let me check." and [c["function"]["name"] for c in calls] == ["get_weather"]
    stream, deltas = ToolCallStream(), []
    for ch in "Let me check.\n" + CALL:  # one character at a time, as a stream may cut it
        deltas += stream.feed(ch)
    deltas += stream.close()
    assert "".join(d.get("content", "") for d in deltas).strip() == "Let me check."
    kinds = [k for d in deltas for k in d]
    first_call = kinds.index("tool_calls")
    assert "content" in kinds[:first_call] and "content" not in kinds[first_call:], kinds


@pytest.mark.parametrize("choice", ["auto", "required"])
def test_max_calls_bounds_the_number_of_calls(tm, choice):
    def matcher(n):
        c = tool_grammar([WEATHER], choice, max_calls=n)
        return compile_constraint(tm.tokenizer, tm.config.vocab_size, tm.eos_ids(), c).matcher()

    for n, calls in ((1, 1), (2, 1), (2, 2), (3, 3)):
        g = matcher(n)
        assert walk(tm, g, "\n".join([CALL] * calls)) and g.is_accepting(), (n, calls)
    for n in (1, 2, 3):
        assert not walk(tm, matcher(n), "\n".join([CALL] * (n + 1))), n
    with pytest.raises(ValueError, match="max_tool_calls must be between 1 and 128"):
        tool_grammar([WEATHER], choice, max_calls=0)


@pytest.mark.parametrize("sampled", [False, True])
def test_speculation_writes_what_ar_writes_under_auto_tool_choice(tm, sampled):
    c = tool_grammar([WEATHER], "auto")
    bias = {t: 4.0 for t in tm.tokenizer.encode("<tool_call>")}  # '<' and its pieces come up in the text
    for prompt in PROMPTS[:3]:
        msgs, tools = chat_inputs(tm.tokenizer, [{"role": "user", "content": prompt}], [WEATHER])
        ids = tm.tokenizer.encode_chat(msgs, tools=tools) if tools else tm.tokenizer.encode_chat(msgs)
        kw = dict(max_new_tokens=48, constraint=c, logit_bias=bias)
        kw |= dict(temperature=0.9, seed=3) if sampled else {}
        ar = tm.generate(ids, mode="ar", **kw)
        for mode, block in (("linear_spec", 4), ("quadratic_spec", 4)):
            r = tm.generate(ids, mode=mode, block_length=block, **kw)
            assert r.token_ids == ar.token_ids, (mode, prompt)
        r = tm.generate(ids, mode="diffusion", block_length=8, **kw)
        assert "<tool_call>" not in r.text or parse_tool_calls(r.text)[1], r.text
