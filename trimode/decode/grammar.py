"""Grammar-constrained decoding: what a request may write (`Constraint`), its compiled form, and the per-request
`GrammarMatcher` every mode consults when it chooses a token.

    c = Constraint.json_schema({"type": "object", ...})          # or .json_object(), .regex(r"..."), .choice([...]),
                                                                  # .grammar(lark_text)
    compiled = compile_constraint(tokenizer, vocab_size, eos_ids, c)   # ValueError naming the constraint
    g = compiled.matcher(thinking)                                # one per request
    logits = g.mask(logits)          # disallowed tokens -> -inf (the grammar's mask at the current state)
    g.advance(token)                 # the token became final
    g.rollback(n); g.forced_tokens(); g.is_accepting(); g.finished

The engine is llguidance (docs/structured.md says why and what was measured). A grammar is built once per
constraint and tokenizer (an LRU of pristine matchers; a request gets a copy), with bounded size and time: a
schema over `MAX_CONSTRAINT_CHARS`, one llguidance refuses (a dangling `$ref`, nesting past its recursion limit,
an unknown Lark rule) or one whose build takes longer than `COMPILE_SECONDS` is a ValueError naming it.

The thinking budget: with a `ThinkingBudget`, every token is allowed until the end-of-thinking token was written;
the grammar starts after it. EOS is allowed exactly where the grammar accepts (and is all that is allowed once
the grammar can write nothing more).
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Literal

import llguidance
import llguidance.torch
import torch

from trimode.decode.stopping import ThinkingBudget

Kind = Literal["json_schema", "json_object", "regex", "choice", "grammar"]
KINDS: tuple[str, ...] = ("json_schema", "json_object", "regex", "choice", "grammar")
MAX_CONSTRAINT_CHARS = 32_768  # a schema, regex, grammar or choice list longer than this is refused
MAX_CHOICES = 1_024
COMPILE_SECONDS = 5.0  # a grammar whose build takes longer is refused (the build itself is fuel-bounded too)
CACHE_SIZE = 64  # compiled grammars kept per tokenizer
# JSON as `json.dumps` writes it: one space after "," and ":", no other whitespace (a model that may write any
# whitespace can fill its budget with it).
JSON_FORMAT = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
LIMITS = dict(max_grammar_size=200_000, initial_lexer_fuel=1_000_000, step_lexer_fuel=200_000,
              max_lexer_states=100_000, verbose_errors=False)


@dataclass(frozen=True)
class Constraint:
    """What the output must match. `value`: the JSON schema as canonical JSON text, the regex, the choices as a
    JSON list, or the grammar in llguidance's Lark syntax (https://github.com/guidance-ai/llguidance, a Lark
    superset: `start: ...` rules, "literals", /regexes/, %json {schema} for a JSON-schema-valued rule)."""

    kind: Kind
    value: str = ""

    @classmethod
    def json_schema(cls, schema) -> Constraint:
        """`schema`: a dict, JSON text, or a pydantic model class (its `model_json_schema()`)."""
        if hasattr(schema, "model_json_schema"):
            schema = schema.model_json_schema()
        if isinstance(schema, str):
            try:
                schema = json.loads(schema)
            except ValueError as e:
                raise ValueError(f"the JSON schema is not valid JSON: {e}") from None
        if not isinstance(schema, dict):
            raise ValueError("the JSON schema must be a JSON object")
        return cls("json_schema", json.dumps(schema, sort_keys=True, ensure_ascii=False))

    @classmethod
    def json_object(cls) -> Constraint:
        return cls("json_object")

    @classmethod
    def regex(cls, pattern: str) -> Constraint:
        if not isinstance(pattern, str) or not pattern:
            raise ValueError("the regex must be a non-empty string")
        return cls("regex", pattern)

    @classmethod
    def choice(cls, options: list[str]) -> Constraint:
        if (not isinstance(options, list | tuple) or not options
                or not all(isinstance(o, str) and o for o in options)):
            raise ValueError("choice must be a non-empty list of non-empty strings")
        if len(options) > MAX_CHOICES:
            raise ValueError(f"choice has {len(options)} options; at most {MAX_CHOICES}")
        return cls("choice", json.dumps(list(options), ensure_ascii=False))

    @classmethod
    def grammar(cls, lark: str) -> Constraint:
        if not isinstance(lark, str) or not lark.strip():
            raise ValueError("the grammar must be non-empty Lark text")
        return cls("grammar", lark)

    @property
    def label(self) -> str:
        return {"json_schema": "the JSON schema", "json_object": "json_object", "regex": "the regex",
                "choice": "the choice list", "grammar": "the grammar"}[self.kind]

    def llguidance_grammar(self) -> str:
        """This constraint as an llguidance grammar (not yet checked)."""
        m = llguidance.LLMatcher
        if self.kind == "json_schema":
            return m.grammar_from_json_schema(self.value, JSON_FORMAT)
        if self.kind == "json_object":
            return m.grammar_from_json_schema({"type": "object"}, JSON_FORMAT)
        if self.kind == "regex":
            return m.grammar_from_regex(self.value)
        if self.kind == "choice":
            options = json.loads(self.value)
            return m.grammar_from_lark("start: " + " | ".join(json.dumps(o, ensure_ascii=False) for o in options))
        return m.grammar_from_lark(self.value)


def constraint_of(constraint: Constraint | None = None, json_schema=None, json_object: bool = False,
                  regex: str | None = None, choice: list[str] | None = None,
                  grammar: str | None = None) -> Constraint | None:
    """The one constraint given by any of these arguments (None: none); ValueError when more than one is."""
    given = {"constraint": constraint, "json_schema": json_schema, "json_object": json_object or None,
             "regex": regex, "choice": choice, "grammar": grammar}
    named = [k for k, v in given.items() if v is not None]
    if len(named) > 1:
        raise ValueError(f"give one constraint, not {' and '.join(named)}")
    if not named:
        return None
    if constraint is not None:
        if not isinstance(constraint, Constraint):
            raise ValueError("constraint must be a trimode Constraint")
        return constraint
    if json_schema is not None:
        return Constraint.json_schema(json_schema)
    if json_object:
        return Constraint.json_object()
    if regex is not None:
        return Constraint.regex(regex)
    if choice is not None:
        return Constraint.choice(choice)
    return Constraint.grammar(grammar)


_TOKENIZERS: dict[int, tuple[object, llguidance.LLTokenizer]] = {}
_LOCK = threading.Lock()


def llg_tokenizer(tokenizer, vocab_size: int, eos_ids: list[int]) -> llguidance.LLTokenizer:
    """llguidance's view of `tokenizer` (an NLDTokenizer), built once per tokenizer object and EOS set."""
    key = id(tokenizer)
    with _LOCK:
        held = _TOKENIZERS.get(key)
        if held is not None and held[0] is tokenizer and held[1].eos_tokens == list(eos_ids):
            return held[1]
    lt = llguidance.LLTokenizer(tokenizer.tok.to_str(), n_vocab=vocab_size, eos_token=list(eos_ids))
    with _LOCK:
        _TOKENIZERS[key] = (tokenizer, lt)
    return lt


class CompiledConstraint:
    """A checked grammar for one tokenizer: `matcher()` gives each request its own matcher."""

    def __init__(self, constraint: Constraint, pristine: llguidance.LLMatcher, vocab_size: int,
                 eos_ids: list[int]) -> None:
        self.constraint, self._pristine = constraint, pristine
        self.vocab_size, self.eos_ids = vocab_size, list(eos_ids)

    def matcher(self, thinking: ThinkingBudget | None = None) -> GrammarMatcher:
        return GrammarMatcher(self._pristine.deep_copy(), self.vocab_size, self.eos_ids, thinking)


_CACHE: OrderedDict[tuple, CompiledConstraint] = OrderedDict()


def compile_constraint(tokenizer, vocab_size: int, eos_ids, constraint: Constraint) -> CompiledConstraint:
    """`constraint` compiled for `tokenizer` (cached, LRU): ValueError naming the constraint when it is too large,
    invalid, or takes longer than COMPILE_SECONDS to build."""
    if tokenizer is None:
        raise ValueError("structured output needs the checkpoint's tokenizer")
    if len(constraint.value) > MAX_CONSTRAINT_CHARS:
        raise ValueError(f"{constraint.label} is {len(constraint.value)} characters long; at most "
                         f"{MAX_CONSTRAINT_CHARS} are supported")
    eos = sorted(eos_ids)
    key = (id(tokenizer), vocab_size, tuple(eos), constraint)
    with _LOCK:
        if key in _CACHE:
            _CACHE.move_to_end(key)
            return _CACHE[key]
    lt = llg_tokenizer(tokenizer, vocab_size, eos)
    matcher = _build_in_time(constraint, lt)
    compiled = CompiledConstraint(constraint, matcher, vocab_size, eos)
    with _LOCK:
        _CACHE[key] = compiled
        while len(_CACHE) > CACHE_SIZE:
            _CACHE.popitem(last=False)
    return compiled


def _build_in_time(constraint: Constraint, lt: llguidance.LLTokenizer) -> llguidance.LLMatcher:
    """Build the matcher in a thread (llguidance releases the GIL while it builds) and wait at most
    COMPILE_SECONDS; a build that runs over is abandoned to finish on its own (its fuel limits bound it)."""
    box: dict = {}

    def build() -> None:
        try:
            grammar = constraint.llguidance_grammar()
            m = llguidance.LLMatcher(lt, grammar, log_level=0, limits=llguidance.LLParserLimits(**LIMITS))
            box["matcher"] = m
        except Exception as e:  # llguidance raises ValueError for a schema it cannot read
            box["error"] = str(e)

    worker = threading.Thread(target=build, name="trimode-grammar", daemon=True)
    worker.start()
    worker.join(COMPILE_SECONDS)
    if worker.is_alive():
        raise ValueError(f"{constraint.label} is too complex: building its grammar took over {COMPILE_SECONDS:g} s")
    if "error" in box:
        raise ValueError(f"{constraint.label} is not supported: {_short(box['error'])}")
    matcher = box["matcher"]
    if matcher.is_error():
        raise ValueError(f"{constraint.label} is not supported: {_short(matcher.get_error())}")
    return matcher


def _short(message: str) -> str:
    message = " ".join(message.split())
    return message if len(message) <= 300 else message[:297] + "..."


class GrammarMatcher:
    """One request's position in its grammar. Tokens before the end-of-thinking token (with a thinking budget)
    are not the grammar's: they pass freely, and rolling back over the end-think token reopens thinking. EOS ends
    the grammar (where it accepts); llguidance keeps no EOS in its history, so this class counts what it handed
    llguidance to roll back exactly."""

    def __init__(self, matcher: llguidance.LLMatcher, vocab_size: int, eos_ids: list[int],
                 thinking: ThinkingBudget | None = None):
        self._m = matcher
        self.vocab_size, self.eos_ids = vocab_size, frozenset(eos_ids)
        self._end_think = None if thinking is None else thinking.end_think_token_id
        self._free = 0 if thinking is None else None  # tokens written before the grammar started (None: thinking)
        self._history: list[int] = []
        self._fed: list[bool] = []  # per history token: whether llguidance consumed it
        self._ended: int | None = None  # history length once the grammar's EOS was written
        self._bitmask = llguidance.torch.allocate_token_bitmask(1, vocab_size)
        self._bits = torch.tensor([1 << i for i in range(32)], dtype=torch.int64)

    @property
    def thinking(self) -> bool:
        return self._free is None

    @property
    def finished(self) -> bool:
        """The grammar wrote its EOS."""
        return self._ended is not None

    def is_accepting(self) -> bool:
        return self.finished or (not self.thinking and self._m.is_accepting())

    def allowed(self) -> torch.Tensor:
        """Bool [vocab_size]: the tokens the grammar allows next (all while thinking; EOS only once ended)."""
        if self.thinking:
            return torch.ones(self.vocab_size, dtype=torch.bool)
        if self.finished:
            out = torch.zeros(self.vocab_size, dtype=torch.bool)
            out[list(self.eos_ids)] = True
            return out
        llguidance.torch.fill_next_token_bitmask(self._m, self._bitmask, 0)
        words = self._bitmask[0].to(torch.int64) & 0xFFFFFFFF
        return ((words[:, None] & self._bits[None, :]) != 0).flatten()[: self.vocab_size]

    def mask(self, logits: torch.Tensor) -> torch.Tensor:
        """`logits` [..., V] with every token the grammar does not allow next set to -inf (a copy)."""
        if self.thinking:
            return logits
        allowed = self.allowed().to(logits.device)
        return logits.masked_fill(~allowed, float("-inf"))

    def accepts(self, token: int) -> bool:
        """Whether the grammar allows `token` next (without advancing)."""
        if self.thinking:
            return True
        if self.finished or token in self.eos_ids:
            return token in self.eos_ids and self.is_accepting()
        return self._m.validate_tokens([token]) == 1

    def advance(self, token: int) -> None:
        """`token` became final. A token the grammar does not allow is a bug in the caller: ValueError."""
        fed = False
        if self.thinking:
            if token == self._end_think:
                self._free = len(self._history) + 1
        elif token in self.eos_ids or self.finished:
            if not self.is_accepting() or (self.finished and token not in self.eos_ids):
                raise ValueError(f"the grammar does not allow token {token} here")
            if self._ended is None:
                self._ended = len(self._history) + 1
        elif self._m.consume_token(token):
            fed = True
        else:
            raise ValueError(f"the grammar does not allow token {token} here: {_short(self._m.get_error())}")
        self._history.append(token)
        self._fed.append(fed)

    def rollback(self, n: int) -> None:
        """Undo the last `n` advances."""
        if n <= 0:
            return
        if n > len(self._history):
            raise ValueError(f"cannot roll back {n} tokens: only {len(self._history)} were written")
        fed = sum(self._fed[-n:])
        if fed and not self._m.rollback(fed):
            raise ValueError(f"the grammar cannot roll back {fed} tokens")
        del self._history[-n:], self._fed[-n:]
        if self._ended is not None and len(self._history) < self._ended:
            self._ended = None
        if self._free is not None and self._end_think is not None and len(self._history) < self._free:
            self._free = None

    def checkpoint(self) -> int:
        """A mark to `restore` to later."""
        return len(self._history)

    def restore(self, mark: int) -> None:
        self.rollback(len(self._history) - mark)

    def forced_tokens(self) -> list[int]:
        """The tokens the grammar forces next whatever the model says (none while thinking or once ended)."""
        if self.thinking or self.finished or self._m.is_stopped():
            return []
        return list(self._m.compute_ff_tokens())
