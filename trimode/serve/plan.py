"""Request planning, the same for every generation endpoint: body bytes -> a `Plan` (what will run).

/v1/completions, /v1/chat/completions and /v1/edits take one path: parse the body, check the model, resolve the
route (and its review and audit) and the risk, choose the mode, bound every size the request names, tokenize,
and fit the token budgets in the context. `Planner.prepare` is linear in the body: the server runs it (and the
engine's own validation at submit) in a worker thread, never on the event loop.

Every size a request can name is bounded before anything is allocated or tokenized: text against the prompt
character limit (`prompt_char_limit`: the most characters a prompt that fits the context can have), a
template's holes against the context, spans against the draft. A bound that fails is a 400 naming the field.
"""

from __future__ import annotations

import json
import re
import time
import uuid
from dataclasses import dataclass, field

from starlette.datastructures import Headers

from trimode.api import TriMode
from trimode.decode.grammar import Constraint
from trimode.decode.modes import mode_spec, names
from trimode.engine import Engine, EngineRequest
from trimode.model.tokenizer import TemplateError
from trimode.request.tools import chat_inputs
from trimode.serve.policy import RISKS, AuditLog, Policy, Route
from trimode.serve.priority import Decision, ModeMeter
from trimode.serve.protocol import (
    APIError,
    ChatCompletionRequest,
    ChatMessage,
    CompletionRequest,
    EditRequest,
    GenerationFields,
    ResponsesRequest,
    parse_body,
)
from trimode.serve.structured import FieldError, compile_for, functions_of, requested_constraint

ROUTE_HEADER = "x-trimode-route"
RISK_HEADER = "x-trimode-risk"
DEFAULT_MAX_BODY_BYTES = 16 << 20
DEFAULT_MAX_BLOCK_LENGTH = 64
LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "::1")
MODES = names(editing=False)  # what a request's `mode` may be
ENDPOINTS = {"completions": CompletionRequest, "chat.completions": ChatCompletionRequest, "edits": EditRequest,
             "responses": ResponsesRequest}  # the Responses API runs the chat path
_HOLE_SIZE = re.compile(r"\[\[hole:(\d+)\]\]")
_HOLE = re.compile(r"\[\[hole(?::\d+)?\]\]")


@dataclass
class ServerConfig:
    model_name: str
    default_mode: str = "ar"
    default_knobs: dict = field(default_factory=dict)  # block_length, threshold, causal_context, use_drafter
    default_max_tokens: int = 256
    default_temperature: float = 0.0
    api_key: str | None = None
    policy: Policy | None = None
    audit_log: AuditLog | None = None
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES  # larger request bodies get 413
    max_block_length: int = DEFAULT_MAX_BLOCK_LENGTH  # a longer block_length is a 400 (a quadratic pass is B(B+1))
    # Host header values answered (any port); others get 421 (DNS rebinding). None or "*" in it: any host.
    allowed_hosts: tuple[str, ...] | None = LOOPBACK_HOSTS

    def __post_init__(self) -> None:
        if self.default_mode not in MODES:
            raise ValueError(f"unknown default mode {self.default_mode!r}; choose one of {', '.join(MODES)}")
        if self.default_max_tokens < 1:
            raise ValueError("default_max_tokens must be >= 1")
        if self.max_body_bytes < 1:
            raise ValueError("max_body_bytes must be >= 1")
        if self.max_block_length < 2:
            raise ValueError("max_block_length must be >= 2")


@dataclass
class Plan:
    """What one HTTP request will run: len(prompts) * n engine requests (choice k = prompt k // n)."""

    request_id: str
    endpoint: str  # "completions", "chat.completions", "responses" or "edits"
    prompts: list[list[int]]
    prompt_texts: list[str]
    mode: str
    knobs: dict
    max_tokens: list[int]  # per prompt
    temperature: float
    top_p: float
    top_k: int
    seed: int | None
    stop: list[str] | None
    n: int
    route: Route | None = None
    review_flag: bool | None = None  # None: unrouted or review optional and not flagged
    logprobs: int | None = None  # number of alternatives per token when logprobs were asked for
    provisional: bool = False
    echo: bool = False
    risk: str | None = None
    decision: Decision | None = None  # how the route's priority chose the mode (routed requests)
    rows: int = 1  # rows running or waiting in the engine when it arrived, itself included
    created: int = field(default_factory=lambda: int(time.time()))
    # An edit: ("infill", {"suffix": ids, "heal": [whether each prompt was text]}), ("revise", {...}), ("fill", ...)
    edit: tuple[str, dict] | None = None
    stream: bool = False
    include_usage: bool = False
    constraint: Constraint | None = None  # what every choice must match (serve/structured.py)
    tools: bool = False  # the answer's text is parsed into tool_calls
    structured: bool = False  # response_format asked for JSON (the message carries refusal: null)
    # The prompt scores the engine reads off the prefill (alternatives per position), for `echo` with `logprobs`
    # or vLLM's `prompt_logprobs` field (`show_prompt_logprobs`: the answer carries that field).
    prompt_logprobs: int | None = None
    show_prompt_logprobs: bool = False
    settings: dict = field(default_factory=dict)  # what a Responses API answer repeats of its request
    processors: dict = field(default_factory=dict)  # logit processor settings (GenerationFields.processors)
    ignore_eos: bool = False  # vLLM's: every choice generates exactly its max_tokens

    @property
    def chat(self) -> bool:
        return self.endpoint in ("chat.completions", "responses")

    @property
    def engine_logprobs(self) -> int | None:
        """The alternatives per token the engine reports logprobs with: the client's count, 0 when only the audit
        record wants the chosen tokens' values, None when nobody does (an edit reports none)."""
        if self.edit is not None:
            return None
        if self.logprobs is not None:
            return self.logprobs
        return 0 if self.audit_logprobs else None

    @property
    def audit_logprobs(self) -> bool:
        """Whether the audit record keeps each output token's log-probability."""
        return self.route is not None and self.route.priority == "accuracy_and_auditability"

    def engine_requests(self) -> list[EngineRequest]:
        out = []
        for p, ids in enumerate(self.prompts):
            edit = self.edit
            if edit is not None and isinstance(edit[1].get("heal"), list):
                edit = (edit[0], {**edit[1], "heal": edit[1]["heal"][p]})  # a text prompt is healed as tm.infill's
            for j in range(self.n):
                seed = None if self.seed is None else self.seed + j  # n samples, n different derived seeds
                out.append(EngineRequest(ids, self.mode, self.max_tokens[p], self.temperature, self.top_p,
                                         self.top_k, seed, self.stop, self.provisional, dict(self.knobs),
                                         edit=edit, constraint=self.constraint,
                                         prompt_logprobs=self.prompt_logprobs, logprobs=self.engine_logprobs,
                                         ignore_eos=self.ignore_eos, **self.processors))
        return out

    def review(self) -> dict | None:
        if self.route is None:
            return None
        return {"route": self.route.name, "level": self.route.human_review, "flagged": bool(self.review_flag),
                "risk": self.risk}

    def policy(self) -> dict | None:
        """The route, its priority and the decision it led to (the response's and the audit record's)."""
        if self.route is None:
            return None
        return {"route": self.route.name, "priority": self.route.priority,
                "decision": self.decision.as_dict() if self.decision else None}


class Planner:
    """Body bytes -> Plan, for every generation endpoint (off the event loop: see the module docstring)."""

    def __init__(self, engine: Engine, config: ServerConfig, meter: ModeMeter) -> None:
        self.engine = engine
        self.tm = engine.tm
        self.config = config
        self.meter = meter
        self.max_prompt_chars = prompt_char_limit(self.tm)

    def prepare(self, raw: bytes, headers: Headers, endpoint: str) -> Plan:
        body = parse_body(raw, ENDPOINTS[endpoint])
        cfg = self.config
        if body.model != cfg.model_name:
            raise APIError(404, f"the model {body.model!r} does not exist; this server serves {cfg.model_name!r}",
                           param="model", code="model_not_found")
        route, risk = self._route(body, headers), self._risk(body, headers)
        load = self.engine.stats()
        rows = load["running_requests"] + load["queue_depth"] + 1
        request_id = {"completions": "cmpl-", "chat.completions": "chatcmpl-", "edits": "edit-",
                      "responses": "resp_"}[endpoint]
        plan = (self._edit(body, route, rows) if endpoint == "edits"
                else self._generation(body, route, rows, endpoint != "completions", load))
        plan.endpoint, plan.request_id = endpoint, request_id + uuid.uuid4().hex
        plan.risk, plan.rows, plan.stream = risk, rows, body.stream
        plan.include_usage = endpoint == "responses" or bool(getattr(getattr(body, "stream_options", None),
                                                                         "include_usage", False))
        if route is not None:
            plan.review_flag = route.flags_for_review(plan.request_id, risk)
        if endpoint == "responses":
            choice = body.tool_choice or "auto"
            plan.settings = {"instructions": body.instructions, "max_output_tokens": body.max_output_tokens,
                             "metadata": body.metadata or {}, "temperature": plan.temperature, "top_p": plan.top_p,
                             "tool_choice": choice if choice in ("none", "auto", "required") else
                             {"type": "function", "name": choice}, "parallel_tool_calls":
                             body.parallel_tool_calls if body.parallel_tool_calls is not None else True,
                             "max_tool_calls": body.max_tool_calls,
                             "tools": [t.model_dump(by_alias=True, exclude_none=True) for t in body.tools or []],
                             "text": {"format": (body.text or {}).get("format") or {"type": "text"}},
                             "user": body.user, "safety_identifier": body.safety_identifier}
        return plan

    # -- the route, the risk, the mode ------------------------------------------------------------------------
    @staticmethod
    def _risk(body, headers: Headers) -> str | None:
        """The request's risk: the body's `risk` or the X-Trimode-Risk header; given both, the higher one (a
        gateway's header can raise what a client declares, not lower it)."""
        header = headers.get(RISK_HEADER)
        if header is not None and header not in RISKS:
            raise APIError(400, f"the X-Trimode-Risk header must be one of {', '.join(RISKS)}, got {header!r}",
                           param="risk", code="invalid_value")
        given = [r for r in (header, body.risk) if r is not None]
        return max(given, key=RISKS.index) if given else None

    def _route(self, body, headers: Headers) -> Route | None:
        name = headers.get(ROUTE_HEADER)
        if name is not None and body.route is not None and name != body.route:
            raise APIError(400, f"the {ROUTE_HEADER} header ({name!r}) and the route field ({body.route!r}) differ",
                           param="route")
        name = name if name is not None else body.route
        policy = self.config.policy
        if policy is None:
            if name is not None:
                raise APIError(404, f"unknown route {name!r}: this server has no routing policy", param="route",
                               code="route_not_found")
            return None
        try:
            return policy.route(name)
        except KeyError:
            raise APIError(404, f"unknown route {name!r}; routes: {', '.join(policy.routes)}", param="route",
                           code="route_not_found") from None

    def _mode(self, body: GenerationFields, route: Route | None, rows: int) -> tuple[str, dict, bool, Decision | None]:
        """The mode, knobs (server < route < request), verified flag and, on a route, the decision."""
        given = {**self.config.default_knobs, **(route.knobs if route else {}), **body.knobs}

        def knobs_of(mode: str) -> dict:  # the knobs the registry says `mode` reads; the others are dropped
            return {k: v for k, v in given.items() if k in mode_spec(mode).knob_names}

        if route is None:
            mode = body.mode or self.config.default_mode
            return mode, knobs_of(mode), False, None
        if body.mode is not None:
            if not route.permits(body.mode):
                raise APIError(403, f"route {route.name!r} does not allow mode {body.mode!r} (allowed: "
                                    f"{', '.join(sorted(route.modes))})", type="permission_error", param="mode",
                               code="mode_not_allowed")
            decision = Decision(body.mode, "named by the request", rows)
        else:
            decision = self.meter.decide(route, rows, knobs_of)
        return decision.mode, knobs_of(decision.mode), route.verified, decision

    @staticmethod
    def _edit_on(route: Route | None, param: str, rows: int, why: str) -> Decision | None:
        """An edit on `route`: refused on a verified route (its answers must be exactly AR's), else decided."""
        if route is not None and route.verified:
            raise APIError(403, f"route {route.name!r} requires the exact AR output; an edit is not AR decoding",
                           type="permission_error", param=param, code="mode_not_allowed")
        return Decision("edit", why, rows) if route is not None else None

    # -- completions and chat -----------------------------------------------------------------------------------
    def _generation(self, body: GenerationFields, route: Route | None, rows: int, chat: bool, load: dict) -> Plan:
        cfg = self.config
        choices = (1 if chat else len(body.prompts)) * body.n
        capacity = load["max_running"] + load["max_queue"]
        if choices > capacity:  # a 429 would tell the client to retry something that can never fit
            raise APIError(400, f"this request asks for {choices} generations (prompts x n); this server runs or "
                                f"queues at most {capacity} at once", param="prompt" if choices > body.n else "n")
        suffix = getattr(body, "suffix", None)
        if suffix is not None:  # OpenAI's `suffix`: fill in the middle, the edit mode's infill
            if body.mode is not None:
                raise APIError(400, "suffix fills in the middle (trimode's edit mode); leave mode out", param="mode")
            decision = self._edit_on(route, "suffix", rows, "suffix: fill in the middle")
            if body.echo or body.logprobs is not None:
                raise APIError(400, "suffix does not combine with echo or logprobs", param="suffix")
            if body.max_tokens == 0:
                raise APIError(400, "suffix needs max_tokens >= 1 (the hole's budget)", param="max_tokens")
            mode, verified = "edit", False
            knobs = {k: v for k, v in body.knobs.items() if k in mode_spec("edit").knob_names}
        else:
            mode, knobs, verified, decision = self._mode(body, route, rows)
            knobs.update(body.thinking)
        block = knobs.get("block_length")
        if block is not None and block > cfg.max_block_length:
            raise APIError(400, f"block_length {block} is above this server's maximum of {cfg.max_block_length} "
                                "(--max-block-length)", param="block_length", code="invalid_value")
        if body.provisional and mode not in ("diffusion", "edit"):
            raise APIError(400, f"provisional events exist only in diffusion mode and edits, and this request runs "
                                f"{mode}", param="provisional")
        prompt_param = "messages" if chat else "prompt"
        constraint, tool_choice, asked_by = self._constraint(body, mode)
        if chat:
            texts, prompts = self._chat(body.messages, tools=functions_of(body))
            budget, logprobs, echo = body.token_budget, (body.top_logprobs or 0) if body.logprobs else None, False
        else:
            prompts, texts = self._prompts(body)
            budget, logprobs, echo = body.max_tokens, body.logprobs, body.echo
        if any(not p for p in prompts):
            raise APIError(400, "the prompt is empty", param=prompt_param)
        budget_param = "max_completion_tokens" if chat and body.max_completion_tokens else "max_tokens"
        suffix_ids = self.encode(suffix, "suffix") if suffix is not None else []
        max_tokens = [self._budget(len(p) + len(suffix_ids), budget, budget_param, prompt_param) for p in prompts]
        temperature = body.temperature if body.temperature is not None else cfg.default_temperature
        if verified and mode != "ar":
            temperature = 0.0  # self-speculation emits exactly the AR output only when verification is greedy
        plan = Plan("", "chat.completions" if chat else "completions", prompts, texts, mode, knobs, max_tokens,
                    temperature, body.top_p if body.top_p is not None else 1.0, body.top_k or 0, body.seed,
                    body.stop_list, body.n, route, None, logprobs, body.provisional, echo, decision=decision)
        if suffix is not None:
            plan.edit = ("infill", {"suffix": suffix_ids, "heal": [isinstance(p, str) for p in body.prompts]})
        plan.constraint, plan.structured = constraint, asked_by == "response_format"
        plan.processors = body.processors
        plan.tools = tool_choice is not None and tool_choice != "none"
        self._scoring(body, plan)
        if body.ignore_eos and constraint is not None:
            raise APIError(400, f"ignore_eos does not combine with {asked_by} (the grammar ends the answer)",
                           param="ignore_eos")
        plan.ignore_eos = body.ignore_eos
        return plan

    def _constraint(self, body: GenerationFields, mode: str) -> tuple[Constraint | None, str | None, str]:
        """The constraint the body asks for (compiled now, off the event loop), its tool choice and its field."""
        try:
            tok = self.tm.tokenizer
            call_token = tok.token_id("<tool_call>") if tok is not None else None  # Qwen-style vocabularies
            constraint, tool_choice, field_name = requested_constraint(body, call_token)
            if constraint is not None:
                if mode == "edit":
                    raise FieldError(field_name, f"{field_name} does not combine with suffix (an edit)")
                compile_for(self.tm, constraint, field_name, self.tm.eos_ids())
        except FieldError as e:
            raise APIError(400, str(e), param=e.field, code="invalid_value") from None
        return constraint, tool_choice, field_name

    @staticmethod
    def _scoring(body: GenerationFields, plan: Plan) -> None:
        """The prompt scores to read off the prefill: `echo` with `logprobs`, or vLLM's `prompt_logprobs`."""
        asked = [k for k in (plan.logprobs if plan.echo else None, body.prompt_logprobs) if k is not None]
        if not asked:
            return
        if plan.edit is not None:
            raise APIError(400, "suffix does not combine with prompt_logprobs", param="prompt_logprobs")
        plan.prompt_logprobs, plan.show_prompt_logprobs = max(asked), body.prompt_logprobs is not None

    def _prompts(self, body: CompletionRequest) -> tuple[list[list[int]], list[str]]:
        prompts, texts = [], []
        for p in body.prompts:
            if isinstance(p, str):
                texts.append(p)
                prompts.append(self.encode(p, "prompt"))
            else:
                self._check_ids(p)  # before decoding: the tokenizer raises on ids outside its vocabulary
                prompts.append(list(p))
                texts.append(self.tm.decode(list(p)) if self.tm.tokenizer else " ".join(map(str, p)))
        return prompts, texts

    def _chat(self, messages: list[ChatMessage], param: str = "messages",
              tools: list | None = None) -> tuple[list[str], list[list[int]]]:
        """The rendered conversation and its ids: contents encoded as text (`NLDTokenizer.encode_chat`); tools
        and tool messages in the template's format (request/tools.py)."""
        tok = self.tm.tokenizer
        if tok is None:
            raise APIError(400, "this model has no tokenizer, so no chat template; use /v1/completions with token "
                                "ids", param=param)
        inputs = [m.as_template_input() for m in messages]
        self.check_chars(sum(len(m["content"]) for m in inputs), param)  # before the template renders them
        tool_list = None
        try:
            if tools or any(m["role"] == "tool" or m.get("tool_calls") for m in inputs):
                inputs, tool_list = chat_inputs(tok, inputs, tools or [])
            text = tok.apply_chat_template(inputs, tools=tool_list)
            ids = tok.encode_chat(inputs, tools=tool_list)
        except (TemplateError, ValueError) as e:
            raise APIError(400, str(e), param=param) from None
        return [text], [ids]

    # -- edits ------------------------------------------------------------------------------------------------
    def _edit(self, body: EditRequest, route: Route | None, rows: int) -> Plan:
        """/v1/edits: the route's review and audit apply (not its mode or knobs: an edit runs the edit machine)."""
        decision = self._edit_on(route, "kind", rows, f"/v1/edits: {body.kind}")
        if self.tm.tokenizer is None:
            raise APIError(400, "this model has no tokenizer: edits take text", param="kind")
        if body.kind == "fill":
            if body.prompt is not None:
                raise APIError(400, "kind fill takes no prompt: the template's text before its first hole is the "
                                    "context", param="prompt")
            pieces = self._template(body.template, body.hole_tokens)
            texts, prompts = [body.template], [[t for p in pieces for t in self.encode(p, "template")]]
            edit = ("fill", {"template": body.template, "hole_tokens": body.hole_tokens})
        else:
            self.check_chars(len(body.draft), "draft")
            if body.spans is not None and len(body.spans) > len(body.draft) + 1:
                raise APIError(400, f"{len(body.spans)} spans for a draft of {len(body.draft)} characters: spans "
                                    "must not overlap", param="spans")
            if body.messages is not None:
                texts, prompts = self._chat(body.messages)
            else:
                texts = [body.prompt or ""]
                prompts = [self.encode(body.prompt, "prompt") if body.prompt else []]
            self._fits(len(prompts[0]), "messages" if body.messages is not None else "prompt")
            edit = ("revise", {"draft": body.draft, "spans": body.spans})
        cfg = self.config
        return Plan("", "edits", prompts, texts, "edit", body.knobs, [1],
                    body.temperature if body.temperature is not None else cfg.default_temperature,
                    body.top_p if body.top_p is not None else 1.0, body.top_k or 0, body.seed, None, 1, route,
                    provisional=body.provisional, decision=decision, edit=edit)

    def _template(self, template: str, hole_tokens: int) -> list[str]:
        """The template's text pieces, once its holes' sizes are known to fit the context (before tokenizing)."""
        self.check_chars(len(template), "template")
        context = self.tm.max_context
        for size in _HOLE_SIZE.findall(template):
            if len(size) > len(str(context)) or int(size) >= context:
                shown = size if len(size) <= 12 else f"{size[:6]}...({len(size)} digits)"
                raise APIError(400, f"template: a hole of {shown} tokens exceeds this model's context length "
                                    f"({context} tokens)", param="template", code="context_length_exceeded")
        pieces = _HOLE.split(template)
        holes = sum(int(s) for s in _HOLE_SIZE.findall(template)) + hole_tokens * (
            len(pieces) - 1 - len(_HOLE_SIZE.findall(template)))
        if holes >= context:
            raise APIError(400, f"template: its holes take {holes} tokens; this model's context is {context} tokens "
                                "(exceeds the context length)", param="template", code="context_length_exceeded")
        return pieces

    # -- sizes and tokens -------------------------------------------------------------------------------------
    def check_chars(self, chars: int, param: str) -> None:
        limit = self.max_prompt_chars
        if limit is not None and chars > limit:  # certainly too long: not worth tokenizing (10 MB: seconds)
            raise APIError(400, f"the {param} has {chars} characters; this model's context of "
                                f"{self.tm.max_context} tokens holds at most {limit}", param=param,
                           code="context_length_exceeded")

    def encode(self, text: str, param: str) -> list[int]:
        if self.tm.tokenizer is None:
            raise APIError(400, "this model has no tokenizer: give the prompt as token ids", param=param)
        self.check_chars(len(text), param)
        # The ids of `tokenizer.encode(text)`, by `encode_batch`: `encode` holds the GIL for the whole text (for
        # megabytes, seconds in which the event loop's thread cannot run either); `encode_batch` releases it.
        return self.tm.tokenizer.tok.encode_batch([text], add_special_tokens=False)[0].ids

    def _check_ids(self, ids: list[int]) -> None:
        self._fits(len(ids), "prompt")
        vocab = self.tm.config.vocab_size
        bad = next((t for t in ids if not 0 <= t < vocab), None)
        if bad is not None:
            raise APIError(400, f"prompt token ids must be in [0, {vocab}); got {bad}", param="prompt",
                           code="invalid_value")

    def _fits(self, prompt_len: int, prompt_param: str) -> None:
        context = self.tm.max_context
        if prompt_len >= context:
            raise APIError(400, f"the prompt has {prompt_len} tokens; this model's context is {context} tokens",
                           param=prompt_param, code="context_length_exceeded")

    def _budget(self, prompt_len: int, asked: int | None, param: str, prompt_param: str) -> int:
        context = self.tm.max_context
        self._fits(prompt_len, prompt_param)
        if asked is None:
            return min(self.config.default_max_tokens, context - prompt_len)
        if prompt_len + asked > context:
            raise APIError(400, f"{param} ({asked}) + the prompt ({prompt_len} tokens) exceeds this model's context "
                                f"of {context} tokens", param=param, code="context_length_exceeded")
        return asked


def prompt_char_limit(tm: TriMode) -> int | None:
    """The most characters a prompt that fits the context can have, or None when the tokenizer gives no bound.

    With a byte-level tokenizer that does not normalize, every character of a text is covered by some token,
    so a text has at least len(text) / (the longest token's characters) tokens. Other tokenizers may drop or
    fold characters: their prompts are tokenized (off the event loop) and counted."""
    tok = tm.tokenizer
    if tok is None:
        return None
    spec = json.loads(tok.tok.to_str())
    if spec.get("normalizer") is not None or "ByteLevel" not in json.dumps(spec.get("pre_tokenizer")):
        return None
    pieces = tok.tok.decode_batch([[i] for i in range(tok.vocab_size)], skip_special_tokens=False)
    longest = max(map(len, pieces))
    return tm.max_context * max(longest, 1)
