"""Compare llguidance and xgrammar on what trimode needs from a grammar engine (docs/structured.md).

    PYTHONPATH=$PWD python scripts/compare_grammar_engines.py

For each engine and case: the time to compile a grammar and build a matcher, the mean time of one token mask
while walking a valid answer token by token, the time of a mask at every position of a 16-token draft followed
by a rollback, and whether the hostile cases (a dangling $ref, a 10,000-value enum, 200 levels of nesting) are
refused or compiled. Both engines need `pip install llguidance xgrammar` (xgrammar is not a trimode dependency).
"""

from __future__ import annotations

import json
import time

import torch

from trimode.api import default_model_path

NESTED = {
    "$defs": {"item": {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12},
                                                         "qty": {"type": "integer"}},
                       "required": ["name", "qty"], "additionalProperties": False}},
    "type": "object",
    "properties": {"kind": {"enum": ["sum", "product", "list"]},
                   "items": {"type": "array", "items": {"$ref": "#/$defs/item"}, "maxItems": 4},
                   "total": {"type": "number"}},
    "required": ["kind", "items", "total"], "additionalProperties": False,
}
NESTED_VALUE = {"kind": "sum", "items": [{"name": "apple", "qty": 3}, {"name": "pear", "qty": 12}], "total": 15}
DANGLING = {"type": "object", "properties": {"a": {"$ref": "#/$defs/missing"}}, "required": ["a"]}
BIG_ENUM = {"enum": [f"value{i}" for i in range(10_000)]}


def deep(n: int) -> dict:
    schema: dict = {"type": "integer"}
    for _ in range(n):
        schema = {"type": "object", "properties": {"a": schema}, "required": ["a"], "additionalProperties": False}
    return schema


def timed(fn):
    t = time.perf_counter()
    try:
        out = fn()
        return out, time.perf_counter() - t, None
    except Exception as e:  # the engine's refusal is a result here
        return None, time.perf_counter() - t, f"{type(e).__name__}: {str(e)[:80]}"


class LLG:
    name = "llguidance"

    def __init__(self, tokenizer_json: str, eos: int) -> None:
        import llguidance
        import llguidance.torch

        self.llg, self.lt = llguidance, llguidance.torch
        self.tok = llguidance.LLTokenizer(tokenizer_json, eos_token=eos)
        self.bitmask = llguidance.torch.allocate_token_bitmask(17, self.tok.vocab_size)

    def matcher(self, kind: str, spec):
        m = self.llg.LLMatcher
        grammar = {"json": lambda: m.grammar_from_json_schema(spec), "regex": lambda: m.grammar_from_regex(spec),
                   "grammar": lambda: m.grammar_from_lark(spec)}[kind]()
        matcher = m(self.tok, grammar, log_level=0)
        if matcher.is_error():
            raise ValueError(matcher.get_error())
        return matcher

    def mask(self, matcher) -> None:
        self.lt.fill_next_token_bitmask(matcher, self.bitmask, 0)

    def advance(self, matcher, token: int) -> None:
        assert matcher.consume_token(token), matcher.get_error()

    def draft_masks(self, matcher, draft: list[int]) -> None:
        for t in draft:
            self.mask(matcher)
            self.advance(matcher, t)
        matcher.rollback(len(draft))


class XGR:
    name = "xgrammar"

    def __init__(self, path: str, eos: int) -> None:
        import transformers
        import xgrammar

        self.xgr = xgrammar
        hf = transformers.PreTrainedTokenizerFast(tokenizer_file=path + "/tokenizer.json", eos_token="</s>")
        info = xgrammar.TokenizerInfo.from_huggingface(hf, stop_token_ids=[eos])
        self.compiler = xgrammar.GrammarCompiler(info, max_threads=1, cache_enabled=False)
        self.bitmask = xgrammar.allocate_token_bitmask(17, info.vocab_size)

    def matcher(self, kind: str, spec):
        c = self.compiler
        compiled = {"json": lambda: c.compile_json_schema(json.dumps(spec)), "regex": lambda: c.compile_regex(spec),
                    "grammar": lambda: c.compile_grammar(spec)}[kind]()
        return self.xgr.GrammarMatcher(compiled, max_rollback_tokens=64)

    def mask(self, matcher) -> None:
        matcher.fill_next_token_bitmask(self.bitmask, 0)

    def advance(self, matcher, token: int) -> None:
        assert matcher.accept_token(token)

    def draft_masks(self, matcher, draft: list[int]) -> None:
        for t in draft:
            self.mask(matcher)
            self.advance(matcher, t)
        matcher.rollback(len(draft))


def walk(engine, matcher, tokens: list[int]) -> float:
    """Mean seconds per mask along `tokens`."""
    t = time.perf_counter()
    for tok in tokens:
        engine.mask(matcher)
        engine.advance(matcher, tok)
    return (time.perf_counter() - t) / len(tokens)


def main() -> None:
    from tokenizers import Tokenizer

    path = str(default_model_path())
    tok = Tokenizer.from_file(path + "/tokenizer.json")
    eos = tok.token_to_id("</s>")
    answer = tok.encode(json.dumps(NESTED_VALUE), add_special_tokens=False).ids
    torch.set_num_threads(1)
    lark = 'start: "yes" | "no" | NUMBER\nNUMBER: /[0-9]+/'
    gbnf = 'root ::= "yes" | "no" | [0-9]+'
    rows = []
    for engine in (LLG(tok.to_str(), eos), XGR(path, eos)):
        cases = [("nested $ref schema", "json", NESTED), ("regex", "regex", r"[A-Z][a-z]{2,8}-[0-9]{3}"),
                 ("CFG", "grammar", lark if engine.name == "llguidance" else gbnf),
                 ("dangling $ref", "json", DANGLING), ("10,000-value enum", "json", BIG_ENUM),
                 ("200-deep nesting", "json", deep(200))]
        for label, kind, spec in cases:
            matcher, seconds, error = timed(lambda e=engine, kind=kind, spec=spec: e.matcher(kind, spec))
            row = {"engine": engine.name, "case": label, "compile_ms": round(seconds * 1e3, 2),
                   "error": error}
            if label == "nested $ref schema" and matcher is not None:
                row["draft16_ms"] = round(timed(lambda e=engine, m=matcher: e.draft_masks(m, answer[:16]))[1] * 1e3, 3)
                row["mask_us"] = round(walk(engine, matcher, answer) * 1e6, 1)
            rows.append(row)
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
