"""The OpenAI-compatible HTTP server: `create_app(engine, ServerConfig(...))` -> a FastAPI app.

    POST /v1/completions, POST /v1/chat/completions   (JSON or SSE with "stream": true)
    GET  /v1/models, /health, /metrics
    GET  /, /playground                                 (the playground page, playground.py)

Every generation goes through the engine (`trimode.engine`). A request is turned into a `Plan` (prompt ids,
the mode and knobs that will run, sampling, the route, its priority's decision and its review flag), the plan
into one engine request per choice, and the engine's events into OpenAI JSON or server-sent events. Each
response carries the statistics of what ran in an extra `trimode` field. Errors are OpenAI-style bodies with a
4xx status.

Hostile input stays cheap: a body over `max_body_bytes` is a 413 before it is read whole; parsing, validation
and tokenization run off the event loop (so /health and the other requests keep answering), and a text prompt
longer than the context could hold is refused before it is tokenized. An unexpected error is a 500 that names
no internals and leaves the connection usable.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import aclosing, asynccontextmanager
from dataclasses import dataclass, field

import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException as StarletteHTTPException

from trimode.api import TriMode
from trimode.decode.modes import MODES as MODE_SPECS
from trimode.decode.result import BlockState, Delta, GenerationResult
from trimode.engine import Engine, EngineRequest, EngineStopped, QueueFull, RequestHandle
from trimode.model.tokenizer import TemplateError
from trimode.serve.logprobs import LOGPROB_MODES, chat_logprobs, completion_logprobs, token_logprobs
from trimode.serve.metrics import CONTENT_TYPE, ServerMetrics
from trimode.serve.playground import add_playground, event_fields
from trimode.serve.policy import RISKS, AuditLog, Policy, Route
from trimode.serve.priority import Decision, ModeMeter
from trimode.serve.protocol import (
    APIError,
    ChatCompletionRequest,
    CompletionRequest,
    EditRequest,
    GenerationFields,
    parse_body,
)

log = logging.getLogger("trimode.serve")

ROUTE_HEADER = "x-trimode-route"
RISK_HEADER = "x-trimode-risk"
DEFAULT_MAX_BODY_BYTES = 16 << 20
DEFAULT_MAX_BLOCK_LENGTH = 64
MODES = tuple(name for name, spec in MODE_SPECS.items() if not spec.editing)  # what a request's `mode` may be


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
    chat: bool
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
    # Fill in the middle (`suffix`): ("infill", {"suffix": ids, "heal": [whether each prompt was text]}).
    edit: tuple[str, dict] | None = None
    processors: dict = field(default_factory=dict)  # logit processor settings (GenerationFields.processors)

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
                                         edit=edit, **self.processors))
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


class Server:
    """Request handling behind the HTTP routes; one per app."""

    def __init__(self, engine: Engine, config: ServerConfig) -> None:
        self.engine = engine
        self.tm = engine.tm
        self.config = config
        self.metrics = ServerMetrics(engine.stats)
        self.meter = ModeMeter()
        self.max_prompt_chars = prompt_char_limit(self.tm)
        self.started = int(time.time())

    # -- request -> plan -----------------------------------------------------------------------------------
    def prepare(self, raw: bytes, headers: Headers, chat: bool) -> tuple[GenerationFields, Plan]:
        """Body bytes -> (request, plan). Linear in the body's size: the server calls it off the event loop."""
        body = parse_body(raw, ChatCompletionRequest if chat else CompletionRequest)
        return body, self.plan(body, headers, chat)

    def plan(self, body: GenerationFields, headers: Headers, chat: bool) -> Plan:
        cfg = self.config
        if body.model != cfg.model_name:
            raise APIError(404, f"the model {body.model!r} does not exist; this server serves {cfg.model_name!r}",
                           param="model", code="model_not_found")
        route = self._route(body, headers)
        risk = self._risk(body, headers)
        load = self.engine.stats()
        rows = load["running_requests"] + load["queue_depth"] + 1
        choices = (1 if chat else len(body.prompts)) * body.n
        capacity = load["max_running"] + load["max_queue"]
        if choices > capacity:  # a 429 would tell the client to retry something that can never fit
            raise APIError(400, f"this request asks for {choices} generations (prompts x n); this server runs or "
                                f"queues at most {capacity} at once", param="prompt" if choices > body.n else "n")
        suffix = getattr(body, "suffix", None)
        if suffix is not None:  # OpenAI's `suffix`: fill in the middle, the edit mode's infill
            if body.mode is not None:
                raise APIError(400, "suffix fills in the middle (trimode's edit mode); leave mode out", param="mode")
            if route is not None and route.verified:
                raise APIError(403, f"route {route.name!r} requires the exact AR output; fill-in-the-middle is not "
                                    "AR decoding", type="permission_error", param="suffix", code="mode_not_allowed")
            if body.echo or body.logprobs is not None:
                raise APIError(400, "suffix does not combine with echo or logprobs", param="suffix")
            mode, verified = "edit", False
            knobs = {k: v for k, v in body.knobs.items() if k in MODE_SPECS["edit"].knob_names}
            decision = Decision("edit", "suffix: fill in the middle", rows) if route is not None else None
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

        if chat:
            assert isinstance(body, ChatCompletionRequest)
            texts = [self._render_chat(body)]
            prompts = [self._encode(texts[0], "messages")]
            budget = body.token_budget
            logprobs = (body.top_logprobs or 0) if body.logprobs else None
            echo = False
        else:
            assert isinstance(body, CompletionRequest)
            prompts, texts = [], []
            for p in body.prompts:
                if isinstance(p, str):
                    texts.append(p)
                    prompts.append(self._encode(p, "prompt"))
                else:
                    self._check_ids(p)  # before decoding: the tokenizer raises on ids outside its vocabulary
                    prompts.append(list(p))
                    texts.append(self.tm.decode(list(p)) if self.tm.tokenizer else " ".join(map(str, p)))
            budget = body.max_tokens
            logprobs = body.logprobs
            echo = body.echo
        if any(not p for p in prompts):
            raise APIError(400, "the prompt is empty", param="messages" if chat else "prompt")
        if logprobs is not None:
            if body.stream:
                raise APIError(400, "logprobs are not supported with stream=true", param="logprobs")
            if mode not in LOGPROB_MODES:
                raise APIError(400, f"logprobs not supported for mode {mode} (its tokens are not chosen from the "
                                    f"AR distribution); use {', '.join(sorted(LOGPROB_MODES))}", param="logprobs")
        budget_param = "max_completion_tokens" if chat and body.max_completion_tokens else "max_tokens"
        suffix_ids = self._encode(suffix, "suffix") if suffix is not None else []
        max_tokens = [self._budget(len(p) + len(suffix_ids), budget, budget_param, "messages" if chat else "prompt")
                      for p in prompts]

        temperature = body.temperature if body.temperature is not None else cfg.default_temperature
        if verified and mode != "ar":
            temperature = 0.0  # self-speculation emits exactly the AR output only when verification is greedy
        request_id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        plan = Plan(request_id, chat, prompts, texts, mode, knobs, max_tokens, temperature,
                    body.top_p if body.top_p is not None else 1.0, body.top_k or 0, body.seed, body.stop_list,
                    body.n, route, None, logprobs, body.provisional, echo, risk, decision, rows)
        plan.processors = body.processors
        if suffix is not None:
            plan.edit = ("infill", {"suffix": suffix_ids, "heal": [isinstance(p, str) for p in body.prompts]})
        if route is not None:
            plan.review_flag = route.flags_for_review(request_id, risk)
        return plan

    @staticmethod
    def _risk(body: GenerationFields, headers: Headers) -> str | None:
        """The request's risk: the body's `risk` or the X-Trimode-Risk header; given both, the higher one (a
        gateway's header can raise what a client declares, not lower it)."""
        header = headers.get(RISK_HEADER)
        if header is not None and header not in RISKS:
            raise APIError(400, f"the X-Trimode-Risk header must be one of {', '.join(RISKS)}, got {header!r}",
                           param="risk", code="invalid_value")
        given = [r for r in (header, body.risk) if r is not None]
        return max(given, key=RISKS.index) if given else None

    def _route(self, body: GenerationFields, headers: Headers) -> Route | None:
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
            return {k: v for k, v in given.items() if k in MODE_SPECS[mode].knob_names}

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

    def _render_chat(self, body: ChatCompletionRequest) -> str:
        if self.tm.tokenizer is None:
            raise APIError(400, "this model has no tokenizer, so no chat template; use /v1/completions with token "
                                "ids", param="messages")
        try:
            return self.tm.tokenizer.apply_chat_template([m.as_template_input() for m in body.messages])
        except TemplateError as e:
            raise APIError(400, str(e), param="messages") from None

    def _encode(self, text: str, param: str) -> list[int]:
        if self.tm.tokenizer is None:
            raise APIError(400, "this model has no tokenizer: give the prompt as token ids", param=param)
        limit = self.max_prompt_chars
        if limit is not None and len(text) > limit:  # certainly too long: not worth tokenizing (10 MB: seconds)
            raise APIError(400, f"the prompt has {len(text)} characters; this model's context of "
                                f"{self.tm.max_context} tokens holds at most {limit}", param=param,
                           code="context_length_exceeded")
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

    # -- plan -> engine -------------------------------------------------------------------------------------
    def submit(self, plan: Plan) -> list[RequestHandle]:
        handles: list[RequestHandle] = []
        try:
            for req in plan.engine_requests():
                handles.append(self.engine.submit(req))
        except QueueFull as e:  # every running row and waiting place is taken
            self.metrics.rejected.labels("queue_full").inc()
            raise APIError(429, f"the server is busy: {e}; retry shortly", type="rate_limit_error",
                           code="queue_full", headers={"Retry-After": "1"}) from None
        except EngineStopped as e:
            raise APIError(503, str(e), type="server_error", code="engine_stopped") from None
        except ValueError as e:
            self.metrics.rejected.labels("invalid").inc()
            raise APIError(400, str(e)) from None
        finally:
            if len(handles) < plan.n * len(plan.prompts):
                for h in handles:
                    h.cancel()
        return handles

    def finish(self, plan: Plan, results: list[GenerationResult], texts: list[str], endpoint: str,
               logprobs: list[list[float]] | None = None) -> None:
        """Metrics, the mode meter and, for audited routes, the audit entry: done before the client sees the end."""
        for r in results:
            self.metrics.observe_generation(r)
            if r.finish_reason == "cancelled":
                self.metrics.cancelled.inc()  # a non-streamed request whose client went away
            else:
                self.meter.observe(r.mode, plan.knobs, plan.rows, r.stats.seconds, r.stats.generated_tokens,
                                   r.stats.forward_passes)
        route = plan.route
        if route is None:
            return
        if plan.review_flag:
            self.metrics.reviews.labels(route.name).inc()
        try:
            self._audit(plan, results[0].mode if results else plan.mode, texts,
                        [r.finish_reason for r in results], endpoint, logprobs)
        except OSError as e:  # no audit entry, no answer: the route requires the record
            log.exception("audit log write failed for %s", plan.request_id)
            raise APIError(500, f"the audit log could not be written ({e.strerror}); the answer is withheld",
                           type="server_error", code="audit_failed") from None

    def abandon(self, plan: Plan, texts: list[str], count: int, endpoint: str) -> None:
        """A stream cut off before the end (client gone): count it, and audit what an audited route produced."""
        self.metrics.cancelled.inc(count)
        try:
            self._audit(plan, plan.mode, texts, ["cancelled"] * len(texts), endpoint, None)
        except OSError:
            log.exception("could not write the audit entry of the cancelled request %s", plan.request_id)

    def _audit(self, plan: Plan, mode: str, texts: list[str], finish_reasons: list[str], endpoint: str,
               logprobs: list[list[float]] | None) -> None:
        route = plan.route
        if route is None or not route.audited or self.config.audit_log is None:
            return
        self.config.audit_log.record(
            route=route.name, mode=mode, request_id=plan.request_id, prompts=plan.prompt_texts, outputs=texts,
            review=route.human_review, flagged=bool(plan.review_flag), finish_reasons=finish_reasons,
            endpoint=endpoint, model=self.config.model_name, priority=route.priority,
            decision=plan.decision.as_dict() if plan.decision else None, risk=plan.risk, logprobs=logprobs,
        )

    def stats_field(self, plan: Plan, results: list[GenerationResult]) -> dict:
        """The extra `trimode` field: what ran and its statistics (summed over the choices)."""
        forwards = sum(r.stats.forward_passes for r in results)
        generated = sum(r.stats.generated_tokens for r in results)
        accepted = [a for r in results for a in r.stats.acceptance]
        modes = sorted({r.mode for r in results}) or [plan.mode]
        return {
            "request_id": plan.request_id,
            "mode": modes[0] if len(modes) == 1 else modes,
            "requested_mode": plan.mode,
            "knobs": results[0].knobs if results else plan.knobs,
            "forward_passes": forwards,
            "generated_tokens": generated,
            "tokens_per_forward": round(generated / forwards, 4) if forwards else 0.0,
            "mean_acceptance": round(sum(accepted) / len(accepted), 4) if accepted else 0.0,
            "seconds": round(max((r.stats.seconds for r in results), default=0.0), 6),
            "verified": bool(plan.route and plan.route.verified),
            "review": plan.review(),
            "policy": plan.policy(),
        }


def usage(plan: Plan, results: list[GenerationResult]) -> dict:
    prompt = sum(len(p) for p in plan.prompts)
    completion = sum(len(r.token_ids) for r in results)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def finish_reason(result: GenerationResult) -> str:
    return result.finish_reason if result.finish_reason in ("stop", "length") else "stop"


async def _events(handles: list[RequestHandle]) -> AsyncIterator[tuple[int, object]]:
    """(choice index, event) from all handles as they come; an engine error is re-raised here."""
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(k: int, handle: RequestHandle) -> None:
        try:
            async for ev in handle.aiter():
                queue.put_nowait((k, ev))
        except Exception as e:  # an engine error: handed to the consumer, which decides the status
            queue.put_nowait((k, e))
        finally:
            queue.put_nowait((k, None))

    tasks = [asyncio.create_task(pump(k, h)) for k, h in enumerate(handles)]
    try:
        open_ = len(handles)
        while open_:
            k, ev = await queue.get()
            if ev is None:
                open_ -= 1
            elif isinstance(ev, BaseException):
                raise ev
            else:
                yield k, ev
    finally:
        for t in tasks:
            t.cancel()


async def _cancel_on_disconnect(request: Request, handles: list[RequestHandle]) -> None:
    """Free the engine's work as soon as the client goes away (also while it waits for a non-streamed answer)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            for h in handles:
                h.cancel()
            return


def _engine_error(e: BaseException) -> APIError:
    """The client's view of a failed generation: the cause's class only where it is the client's business; the
    details (an allocator's message, a traceback) go to the server log."""
    if isinstance(e, APIError):
        return e
    if isinstance(e, ValueError):
        return APIError(400, str(e))
    if isinstance(e, EngineStopped):
        return APIError(503, str(e), type="server_error", code="engine_stopped")
    log.error("generation failed", exc_info=e)
    if isinstance(e, (MemoryError, torch.OutOfMemoryError)):
        return APIError(503, "the server ran out of memory for this request; retry later or ask for fewer tokens",
                        type="server_error", code="out_of_memory", headers={"Retry-After": "5"})
    return APIError(500, "generation failed (an internal error; the server log has the details)",
                    type="server_error", code="internal_error")


def _sse(obj: dict | str) -> bytes:
    return f"data: {obj if isinstance(obj, str) else json.dumps(obj, ensure_ascii=False)}\n\n".encode()


async def generate(server: Server, request: Request, chat: bool) -> Response:
    raw = await request.body()
    # Parsing, validating and tokenizing cost time linear in the body (up to max_body_bytes): a worker thread
    # does it, so the event loop keeps serving /health and the other requests meanwhile.
    body, plan = await asyncio.to_thread(server.prepare, raw, request.headers, chat)
    request.state.mode = plan.mode
    handles = server.submit(plan)
    headers = {"X-Request-Id": plan.request_id}
    if plan.route is not None:
        headers["X-Trimode-Review"] = "flagged" if plan.review_flag else plan.route.human_review
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return StreamingResponse(_stream(server, request, plan, handles, include_usage),
                                 media_type="text/event-stream", headers=headers)
    return JSONResponse(await _complete(server, request, plan, handles), headers=headers)


def _edit_request(server: Server, raw: bytes) -> tuple[EditRequest, EngineRequest]:
    """Body bytes -> the edit and its engine request (off the event loop, like `Server.prepare`)."""
    body = parse_body(raw, EditRequest)
    cfg, tm = server.config, server.tm
    if body.model != cfg.model_name:
        raise APIError(404, f"the model {body.model!r} does not exist; this server serves {cfg.model_name!r}",
                       param="model", code="model_not_found")
    sampling = dict(temperature=body.temperature if body.temperature is not None else cfg.default_temperature,
                    top_p=body.top_p if body.top_p is not None else 1.0, top_k=body.top_k or 0, seed=body.seed)
    if body.kind == "fill":
        return body, EngineRequest([], "edit", 1, **sampling, provisional=body.provisional, knobs=body.knobs,
                                   edit=("fill", {"template": body.template, "hole_tokens": body.hole_tokens}))
    context = body.prompt or ""
    if body.messages is not None:
        try:
            context = tm.tokenizer.apply_chat_template([m.as_template_input() for m in body.messages])
        except (TemplateError, AttributeError) as e:
            raise APIError(400, f"messages: {e}", param="messages") from None
    prefix = tm.encode(context) if context else []
    return body, EngineRequest(prefix, "edit", 1, **sampling, provisional=body.provisional, knobs=body.knobs,
                               edit=("revise", {"draft": body.draft, "spans": body.spans}))


async def edit(server: Server, request: Request) -> Response:
    """POST /v1/edits: one revision or template fill through the engine, as JSON or server-sent events."""
    body, req = await asyncio.to_thread(_edit_request, server, await request.body())
    request.state.mode = "edit"
    try:
        handle = server.engine.submit(req)
    except QueueFull as e:
        server.metrics.rejected.labels("queue_full").inc()
        raise APIError(429, f"the server is busy: {e}; retry shortly", type="rate_limit_error", code="queue_full",
                       headers={"Retry-After": "1"}) from None
    except EngineStopped as e:
        raise APIError(503, str(e), type="server_error", code="engine_stopped") from None
    except ValueError as e:
        server.metrics.rejected.labels("invalid").inc()
        raise APIError(400, str(e)) from None
    edit_id = "edit-" + uuid.uuid4().hex
    base = {"id": edit_id, "object": "edit", "created": int(time.time()), "model": server.config.model_name}

    def answer(r: GenerationResult) -> dict:
        server.metrics.observe_generation(r)
        choice = {"index": 0, "text": r.text or "", "spans": [list(s) for s in r.spans],
                  "finish_reason": finish_reason(r)}
        return {**base, "choices": [choice], "usage": {"prompt_tokens": len(req.prompt_ids),
                "completion_tokens": len(r.token_ids), "total_tokens": len(req.prompt_ids) + len(r.token_ids)},
                "trimode": r.stats.as_dict() | {"knobs": r.knobs}}

    async def events() -> AsyncIterator[tuple[int, object]]:
        async with aclosing(_events([handle])) as stream:
            async for item in stream:
                yield item

    if not body.stream:
        watcher = asyncio.create_task(_cancel_on_disconnect(request, [handle]))
        try:
            result = None
            async for _, ev in events():
                if isinstance(ev, GenerationResult):
                    result = ev
        except Exception as e:
            handle.cancel()
            raise _engine_error(e) from None
        finally:
            watcher.cancel()
        return JSONResponse(answer(result), headers={"X-Request-Id": edit_id})

    async def sse() -> AsyncIterator[bytes]:
        try:
            async for _, ev in events():
                if isinstance(ev, BlockState):
                    yield _sse({**base, "object": "edit.chunk",
                                "provisional": {"token_ids": ev.token_ids, "text": ev.text},
                                "trimode": event_fields(server.tm, ev)})  # each slot's text, as /v1/completions
                elif isinstance(ev, GenerationResult):
                    yield _sse({**answer(ev), "object": "edit.chunk"})
        except Exception as e:  # the stream has started: report in-band
            err = _engine_error(e)
            yield _sse(err.body())
        finally:
            handle.cancel()  # a client gone mid-stream frees the work (no-op once finished)
        yield _sse("[DONE]")

    return StreamingResponse(sse(), media_type="text/event-stream", headers={"X-Request-Id": edit_id})


async def _complete(server: Server, request: Request, plan: Plan, handles: list[RequestHandle]) -> dict:
    watcher = asyncio.create_task(_cancel_on_disconnect(request, handles))
    results: list[GenerationResult | None] = [None] * len(handles)
    try:
        async with aclosing(_events(handles)) as events:
            async for k, ev in events:
                if isinstance(ev, GenerationResult):
                    results[k] = ev
    except BaseException as e:
        for h in handles:
            h.cancel()
        if isinstance(e, Exception):
            raise _engine_error(e) from None
        raise
    finally:
        watcher.cancel()
    done = [r for r in results if r is not None]
    if len(done) != len(handles):
        raise APIError(500, "the engine ended a request without a result", type="server_error")

    texts = [r.text or "" for r in done]
    lps: list[dict | None] = [None] * len(done)
    if plan.logprobs is not None and any(r.mode not in LOGPROB_MODES for r in done):
        raise APIError(400, f"logprobs not supported for mode {done[0].mode} (auto chose it); name a mode")
    entries = await _logprob_entries(server, plan, done, texts, plan.logprobs or 0)
    if plan.logprobs is not None:
        lps = [chat_logprobs(e) if plan.chat else completion_logprobs(e, plan.logprobs) for e in entries]
    endpoint = "chat.completions" if plan.chat else "completions"
    server.finish(plan, done, texts, endpoint, _audit_logprobs(plan, entries))

    choices = []
    for k, r in enumerate(done):
        choice: dict = {"index": k}
        if plan.chat:
            choice["message"] = {"role": "assistant", "content": texts[k]}
        else:
            choice["text"] = (plan.prompt_texts[k // plan.n] if plan.echo else "") + texts[k]
        choice |= {"logprobs": lps[k], "finish_reason": finish_reason(r), "trimode": r.stats.as_dict()}
        choices.append(choice)
    response = {
        "id": plan.request_id,
        "object": "chat.completion" if plan.chat else "text_completion",
        "created": plan.created,
        "model": server.config.model_name,
        "system_fingerprint": None,
        "choices": choices,
        "usage": usage(plan, done),
        "trimode": server.stats_field(plan, done),
    }
    return response


async def _logprob_entries(server: Server, plan: Plan, done: list[GenerationResult], texts: list[str],
                           top: int) -> list:
    """Per choice, its tokens' logprobs, when the client or the audit record wants them (else empty)."""
    if plan.logprobs is None and not plan.audit_logprobs:
        return []
    return [await asyncio.to_thread(token_logprobs, server.tm, plan.prompts[k // plan.n], r.token_ids, texts[k], top)
            for k, r in enumerate(done)]


def _audit_logprobs(plan: Plan, entries: list) -> list[list[float]] | None:
    return [[e.logprob for e in choice] for choice in entries] if plan.audit_logprobs else None


async def _stream(server: Server, request: Request, plan: Plan, handles: list[RequestHandle],
                  include_usage: bool) -> AsyncIterator[bytes]:
    """SSE chunks: text as soon as it is committed (optionally provisional diffusion blocks); the finish chunks
    (with the `trimode` statistics) only once every choice is done and any audit entry is on disk."""
    base = {"id": plan.request_id, "object": "chat.completion.chunk" if plan.chat else "text_completion",
            "created": plan.created, "model": server.config.model_name}
    if plan.chat:
        base["system_fingerprint"] = None

    def chunk(k: int, text: str | None = None, **extra) -> dict:
        if plan.chat:
            delta = {} if text is None else {"content": text}
            choice = {"index": k, "delta": delta, "logprobs": None, "finish_reason": None}
        else:
            choice = {"index": k, "text": text or "", "logprobs": None, "finish_reason": None}
        choice.update(extra)
        return {**base, "choices": [choice]}

    watcher = asyncio.create_task(_cancel_on_disconnect(request, handles))
    t0 = time.perf_counter()
    first_token = False
    results: list[GenerationResult | None] = [None] * len(handles)
    texts = [""] * len(handles)
    try:
        for k in range(len(handles)):
            if plan.chat:
                yield _sse({**base, "choices": [{"index": k, "delta": {"role": "assistant", "content": ""},
                                                 "logprobs": None, "finish_reason": None}]})
            elif plan.echo:
                yield _sse(chunk(k, plan.prompt_texts[k // plan.n]))
        try:
            async with aclosing(_events(handles)) as events:
                async for k, ev in events:
                    if isinstance(ev, Delta):
                        if ev.text:
                            if not first_token:
                                first_token = True
                                server.metrics.first_token.labels(plan.mode).observe(time.perf_counter() - t0)
                            texts[k] += ev.text
                        if ev.text or ev.token_ids:  # tokens without text yet (eos, held back) still counted
                            yield _sse(chunk(k, ev.text or None, trimode=event_fields(server.tm, ev)))
                    elif isinstance(ev, BlockState):
                        yield _sse(chunk(k, None, provisional={"token_ids": ev.token_ids, "text": ev.text},
                                         trimode=event_fields(server.tm, ev)))
                    elif isinstance(ev, GenerationResult):
                        results[k] = ev
        except Exception as e:  # the stream has started: report in-band, as OpenAI does
            err = _engine_error(e)
            yield _sse(err.body())
            return
        done = [r for r in results if r is not None]
        try:
            final_texts = [r.text or "" for r in done]
            entries = await _logprob_entries(server, plan, done, final_texts, 0)
            server.finish(plan, done, final_texts, "chat.completions" if plan.chat else "completions",
                          _audit_logprobs(plan, entries))
        except APIError as e:
            yield _sse(e.body())
            return
        for k, r in enumerate(done):
            final = chunk(k, None, finish_reason=finish_reason(r))
            final["trimode"] = {**server.stats_field(plan, [r]), "choice": r.stats.as_dict()}
            yield _sse(final)
        if include_usage:
            yield _sse({**base, "choices": [], "usage": usage(plan, done), "trimode": server.stats_field(plan, done)})
        yield _sse("[DONE]")
    finally:
        watcher.cancel()
        unfinished = [h for h in handles if not h.done]
        for h in unfinished:
            h.cancel()  # the client went away (or the stream failed): free the engine's work
        if unfinished:
            server.abandon(plan, texts, len(unfinished), "chat.completions" if plan.chat else "completions")


def create_app(engine: Engine, config: ServerConfig) -> FastAPI:
    """The app; it starts the engine on start-up and stops it on shut-down."""
    server = Server(engine, config)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        engine.start()
        try:
            yield
        finally:
            await asyncio.to_thread(engine.stop)

    app = FastAPI(title="trimode", version="0.1.0", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.server = server

    @app.exception_handler(APIError)
    async def _api_error(request: Request, e: APIError):
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, e: StarletteHTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code)
        return JSONResponse(APIError(e.status_code, str(e.detail), code=code).body(), status_code=e.status_code)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, e: RequestValidationError):
        return JSONResponse(APIError(400, f"invalid request: {e.errors()[0].get('msg')}").body(), status_code=400)

    def authorize(request: Request) -> None:
        if config.api_key is None:
            return
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), config.api_key.encode()):
            raise APIError(401, "missing or incorrect API key (send 'Authorization: Bearer KEY')",
                           code="invalid_api_key")

    # The bodies are parsed by `protocol.parse_body` (strict, off the event loop), not by FastAPI; the OpenAPI
    # schema still describes them (`openapi_schema`), for clients and for the fuzz test.
    @app.post("/v1/completions", responses=ERROR_RESPONSES)
    async def completions(request: Request):
        authorize(request)
        return await generate(server, request, chat=False)

    @app.post("/v1/chat/completions", responses=ERROR_RESPONSES)
    async def chat_completions(request: Request):
        authorize(request)
        return await generate(server, request, chat=True)

    @app.post("/v1/edits", responses=ERROR_RESPONSES)
    async def edits(request: Request):
        authorize(request)
        return await edit(server, request)

    @app.get("/v1/models")
    async def models(request: Request):
        authorize(request)
        tm = server.tm
        card = {"id": config.model_name, "object": "model", "created": server.started, "owned_by": "trimode",
                "context_length": tm.max_context, "modes": list(MODES), "default_mode": config.default_mode,
                "lossless_modes": [m for m in MODES if MODE_SPECS[m].lossless],
                "has_drafter": tm.has_drafter, "has_chat_template": bool(tm.tokenizer and tm.tokenizer.chat_template)}
        return {"object": "list", "data": [card]}

    @app.get("/health")
    async def health():
        # `auto`: what the auto policy has learned (estimates, slowdowns, picks, cost curve), when it exists
        keys = ("queue_depth", "running_requests", "max_running", "max_queue", "auto")
        return {"status": "ok", "model": config.model_name, **{k: v for k, v in engine.stats().items() if k in keys}}

    @app.get("/metrics")
    async def metrics():
        return Response(server.metrics.exposition(), media_type=CONTENT_TYPE)

    # -- the playground page (trimode/serve/playground.py): static files, no key needed ---------------------
    add_playground(app)
    # -- end of the playground block ---------------------------------------------------------------------------

    app.openapi = lambda: openapi_schema(app)
    # Outermost first: metrics see every status (413 and 500 included); the body limit acts before a route reads.
    app.add_middleware(_Unhandled)
    app.add_middleware(_BodyLimit, limit=config.max_body_bytes)
    app.add_middleware(_RequestMetrics, server=server)
    return app


ERROR_RESPONSES: dict = {status: {"description": what, "content": {"application/json": {"schema": {
    "$ref": "#/components/schemas/ErrorBody"}}}} for status, what in (
    (400, "invalid request"), (401, "missing or wrong API key"), (403, "mode not allowed on the route"),
    (404, "unknown model or route"), (413, "request body too large"), (429, "the engine is full"),
    (500, "internal error"), (503, "engine stopped or out of memory"))}


def openapi_schema(app: FastAPI) -> dict:
    """FastAPI's schema plus the three request bodies (as `parse_body` validates them, with this server's model and
    routes) and the error body."""
    if app.openapi_schema is None:
        config: ServerConfig = app.state.server.config
        schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        components["ErrorBody"] = {"type": "object", "required": ["error"], "properties": {"error": {
            "type": "object", "required": ["message", "type", "param", "code"], "properties": {
                "message": {"type": "string"}, "type": {"type": "string"}, "param": {"type": ["string", "null"]},
                "code": {"type": ["string", "null"]}}}}}
        for path, model in (("/v1/completions", CompletionRequest), ("/v1/chat/completions", ChatCompletionRequest),
                            ("/v1/edits", EditRequest)):
            body = model.model_json_schema(ref_template="#/components/schemas/{model}")
            components.update(body.pop("$defs", {}))
            body["properties"]["model"] = {"type": "string", "enum": [config.model_name]}
            if config.policy is not None and "route" in body["properties"]:
                body["properties"]["route"] = {"anyOf": [{"enum": list(config.policy.routes)}, {"type": "null"}]}
            components[model.__name__] = body
            schema["paths"][path]["post"]["requestBody"] = {"required": True, "content": {"application/json": {
                "schema": {"$ref": f"#/components/schemas/{model.__name__}"}}}}
        app.openapi_schema = schema
    return app.openapi_schema


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


class _BodyLimit:
    """ASGI middleware: a request body over `limit` bytes is a 413, by its Content-Length before the route runs,
    or (chunked uploads) as soon as the bytes received pass the limit; either way nothing of it is kept."""

    def __init__(self, app, limit: int) -> None:
        self.app = app
        self.limit = limit
        # The most of an oversized body read (and dropped) past the limit before the 413: a server that answers
        # and closes with unread bytes in its socket resets the connection, and the client may lose the answer.
        self.drain_bytes = max(limit, 8 * 2**20)

    def error(self) -> APIError:
        return APIError(413, f"the request body is larger than this server's limit of {self.limit} bytes",
                        code="request_too_large", headers={"Connection": "close"})

    async def drain(self, receive, message) -> None:
        """Read and drop what the client is still sending after `message`, at most `drain_bytes`."""
        drained = 0
        while message["type"] == "http.request" and message.get("more_body") and drained < self.drain_bytes:
            message = await receive()
            drained += len(message.get("body", b""))

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = Headers(scope=scope).get("content-length")
        if length is not None and length.isdigit() and int(length) > self.limit:
            if int(length) <= self.limit + self.drain_bytes:
                await self.drain(receive, {"type": "http.request", "more_body": True})
            e = self.error()
            return await JSONResponse(e.body(), status_code=e.status, headers=e.headers)(scope, receive, send)
        received = 0

        async def limited_receive():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit:
                    await self.drain(receive, message)
                    raise self.error()  # raised inside the route's body read: answered by the APIError handler
            return message

        await self.app(scope, limited_receive, send)


class _Unhandled:
    """ASGI middleware: an exception no handler answered becomes a 500 that names no internals.

    Starlette's own last-resort handler answers and then re-raises, and the server resets the connection; here
    the exception ends with the answer, so a keep-alive connection stays usable. After the response has
    started (a stream), the body is ended cleanly instead."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = False

        async def watch(message):
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, receive, watch)
        except Exception:
            log.exception("unhandled error on %s %s", scope.get("method"), scope.get("path"))
            if started:
                try:
                    await send({"type": "http.response.body", "body": b"", "more_body": False})
                except Exception:  # the client is gone too
                    pass
                return
            e = APIError(500, "internal server error (the server log has the details)", type="server_error",
                         code="internal_error")
            await JSONResponse(e.body(), status_code=500)(scope, receive, send)


class _RequestMetrics:
    """ASGI middleware: count answered requests by endpoint and status, and time generation requests."""

    ENDPOINTS = ("/v1/completions", "/v1/chat/completions", "/v1/models", "/health", "/metrics")

    def __init__(self, app, server: Server) -> None:
        self.app = app
        self.server = server

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"] if scope["path"] in self.ENDPOINTS else "other"
        status = {"code": 500}
        t0 = time.perf_counter()
        generating = path.startswith("/v1/") and path != "/v1/models"
        if generating:
            self.server.metrics.in_flight.inc()

        async def send_and_watch(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_watch)
        finally:
            m = self.server.metrics
            m.requests.labels(path, str(status["code"])).inc()
            if generating:
                m.in_flight.dec()
                mode = scope.get("state", {}).get("mode", "none")
                m.latency.labels(path, mode).observe(time.perf_counter() - t0)
