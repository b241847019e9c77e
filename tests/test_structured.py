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
