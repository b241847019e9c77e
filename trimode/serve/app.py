"""The OpenAI-compatible HTTP server: `create_app(engine, ServerConfig(...))` -> a FastAPI app.

    POST /v1/completions, POST /v1/chat/completions   (JSON or SSE with "stream": true)
    GET  /v1/models, /health, /metrics
    GET  /, /playground                                 (the playground page, playground.py)

Every generation goes through the engine (`trimode.engine`). A request is turned into a `Plan` (prompt ids,
the mode and knobs that will run, sampling, the route and its review flag), the plan into one engine request
per choice, and the engine's events into OpenAI JSON or server-sent events. Each response carries the
statistics of what ran in an extra `trimode` field. Errors are OpenAI-style bodies with a 4xx status.
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

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from trimode.decode.modes import MODES as MODE_SPECS
from trimode.decode.result import BlockState, Delta, GenerationResult
from trimode.engine import Engine, EngineRequest, EngineStopped, QueueFull, RequestHandle
from trimode.model.tokenizer import TemplateError
from trimode.serve.logprobs import LOGPROB_MODES, chat_logprobs, completion_logprobs, token_logprobs
from trimode.serve.metrics import CONTENT_TYPE, ServerMetrics
from trimode.serve.playground import add_playground, event_fields
from trimode.serve.policy import AuditLog, Policy, Route
from trimode.serve.protocol import (
    APIError,
    ChatCompletionRequest,
    CompletionRequest,
    GenerationFields,
    validation_error,
)

log = logging.getLogger("trimode.serve")

ROUTE_HEADER = "x-trimode-route"
MODES = tuple(MODE_SPECS)


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

    def __post_init__(self) -> None:
        if self.default_mode not in MODES:
            raise ValueError(f"unknown default mode {self.default_mode!r}; choose one of {', '.join(MODES)}")
        if self.default_max_tokens < 1:
            raise ValueError("default_max_tokens must be >= 1")


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
    created: int = field(default_factory=lambda: int(time.time()))

    def engine_requests(self) -> list[EngineRequest]:
        out = []
        for p, ids in enumerate(self.prompts):
            for j in range(self.n):
                seed = None if self.seed is None else self.seed + j  # n samples, n different derived seeds
                out.append(EngineRequest(ids, self.mode, self.max_tokens[p], self.temperature, self.top_p,
                                         self.top_k, seed, self.stop, self.provisional, dict(self.knobs)))
        return out

    def review(self) -> dict | None:
        if self.route is None:
            return None
        return {"route": self.route.name, "level": self.route.human_review, "flagged": bool(self.review_flag)}


class Server:
    """Request handling behind the HTTP routes; one per app."""

    def __init__(self, engine: Engine, config: ServerConfig) -> None:
        self.engine = engine
        self.tm = engine.tm
        self.config = config
        self.metrics = ServerMetrics(engine.stats)
        self.started = int(time.time())

    # -- request -> plan -----------------------------------------------------------------------------------
    def plan(self, body: GenerationFields, request: Request, chat: bool) -> Plan:
        cfg = self.config
        if body.model != cfg.model_name:
            raise APIError(404, f"the model {body.model!r} does not exist; this server serves {cfg.model_name!r}",
                           param="model", code="model_not_found")
        route = self._route(body, request)
        mode, knobs, verified = self._mode(body, route)
        knobs.update(body.thinking)
        if body.provisional and mode != "diffusion":
            raise APIError(400, f"provisional events exist only in diffusion mode, and this request runs {mode}",
                           param="provisional")

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
        max_tokens = [self._budget(len(p), budget, budget_param, "messages" if chat else "prompt") for p in prompts]

        temperature = body.temperature if body.temperature is not None else cfg.default_temperature
        if verified and mode != "ar":
            temperature = 0.0  # self-speculation emits exactly the AR output only when verification is greedy
        request_id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        plan = Plan(request_id, chat, prompts, texts, mode, knobs, max_tokens, temperature,
                    body.top_p if body.top_p is not None else 1.0, body.top_k or 0, body.seed, body.stop_list,
                    body.n, route, None, logprobs, body.provisional, echo)
        if route is not None:
            plan.review_flag = route.flags_for_review(request_id)
        return plan

    def _route(self, body: GenerationFields, request: Request) -> Route | None:
        name = request.headers.get(ROUTE_HEADER)
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

    def _mode(self, body: GenerationFields, route: Route | None) -> tuple[str, dict, bool]:
        """The mode, knobs (server < route < request) and verified flag this request runs with."""
        knobs = dict(self.config.default_knobs)
        if route is None:
            mode = body.mode or self.config.default_mode
            verified = False
        else:
            mode = route.mode
            if body.mode is not None and body.mode != route.mode:
                if not route.permits(body.mode):
                    allowed = sorted({route.mode, *route.allow_modes})
                    raise APIError(403, f"route {route.name!r} does not allow mode {body.mode!r} (allowed: "
                                        f"{', '.join(allowed)})", type="permission_error", param="mode",
                                   code="mode_not_allowed")
                mode = body.mode
            knobs.update(route.knobs)
            verified = route.verified
        knobs.update(body.knobs)
        # A knob another mode reads does not apply here (it may come from the server's or the route's defaults).
        return mode, {k: v for k, v in knobs.items() if k in MODE_SPECS[mode].knob_names}, verified

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
        return self.tm.tokenizer.encode(text)

    def _budget(self, prompt_len: int, asked: int | None, param: str, prompt_param: str) -> int:
        context = self.tm.max_context
        if prompt_len >= context:
            raise APIError(400, f"the prompt has {prompt_len} tokens; this model's context is {context} tokens",
                           param=prompt_param, code="context_length_exceeded")
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
        except QueueFull as e:
            self.metrics.rejected.labels("queue_full").inc()
            raise APIError(429, f"the server is busy: {e}", type="rate_limit_error", code="queue_full",
                           headers={"Retry-After": "1"}) from None
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

    def finish(self, plan: Plan, results: list[GenerationResult], texts: list[str], endpoint: str) -> None:
        """Metrics and, for reviewed routes, the audit entry: done before the client sees the end."""
        for r in results:
            self.metrics.observe_generation(r)
            if r.finish_reason == "cancelled":
                self.metrics.cancelled.inc()  # a non-streamed request whose client went away
        route = plan.route
        if route is None:
            return
        if plan.review_flag:
            self.metrics.reviews.labels(route.name).inc()
        if route.human_review != "optional" and self.config.audit_log is not None:
            try:
                self.config.audit_log.record(
                    route=route.name, mode=results[0].mode if results else plan.mode, request_id=plan.request_id,
                    prompts=plan.prompt_texts, outputs=texts, review=route.human_review,
                    flagged=bool(plan.review_flag), finish_reasons=[r.finish_reason for r in results],
                    endpoint=endpoint, model=self.config.model_name,
                )
            except OSError as e:  # no audit entry, no answer: the route requires the record
                log.exception("audit log write failed for %s", plan.request_id)
                raise APIError(500, f"the audit log could not be written ({e.strerror}); the answer is withheld",
                               type="server_error", code="audit_failed") from None

    def abandon(self, plan: Plan, texts: list[str], count: int, endpoint: str) -> None:
        """A stream cut off before the end (client gone): count it, and audit what a reviewed route produced."""
        self.metrics.cancelled.inc(count)
        route = plan.route
        if route is None or route.human_review == "optional" or self.config.audit_log is None:
            return
        try:
            self.config.audit_log.record(
                route=route.name, mode=plan.mode, request_id=plan.request_id, prompts=plan.prompt_texts,
                outputs=texts, review=route.human_review, flagged=bool(plan.review_flag),
                finish_reasons=["cancelled"] * len(texts), endpoint=endpoint, model=self.config.model_name,
            )
        except OSError:
            log.exception("could not write the audit entry of the cancelled request %s", plan.request_id)

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
    if isinstance(e, APIError):
        return e
    if isinstance(e, ValueError):
        return APIError(400, str(e))
    if isinstance(e, EngineStopped):
        return APIError(503, str(e), type="server_error", code="engine_stopped")
    log.exception("generation failed", exc_info=e)
    return APIError(500, f"generation failed: {type(e).__name__}: {e}", type="server_error")


async def _parse(request: Request, model: type[BaseModel]):
    raw = await request.body()
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise APIError(400, f"the request body is not valid JSON: {e}", code="invalid_json") from None
    if not isinstance(data, dict):
        raise APIError(400, "the request body must be a JSON object", code="invalid_json")
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise validation_error(e) from None


def _sse(obj: dict | str) -> bytes:
    return f"data: {obj if isinstance(obj, str) else json.dumps(obj, ensure_ascii=False)}\n\n".encode()


async def generate(server: Server, request: Request, chat: bool) -> Response:
    body = await _parse(request, ChatCompletionRequest if chat else CompletionRequest)
    plan = server.plan(body, request, chat)
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
    if plan.logprobs is not None:
        if any(r.mode not in LOGPROB_MODES for r in done):
            raise APIError(400, f"logprobs not supported for mode {done[0].mode} (auto chose it); name a mode")
        for k, r in enumerate(done):
            entries = await asyncio.to_thread(token_logprobs, server.tm, plan.prompts[k // plan.n], r.token_ids,
                                              texts[k], plan.logprobs)
            lps[k] = chat_logprobs(entries) if plan.chat else completion_logprobs(entries, plan.logprobs)
    endpoint = "chat.completions" if plan.chat else "completions"
    server.finish(plan, done, texts, endpoint)

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
            server.finish(plan, done, [r.text or "" for r in done], "chat.completions" if plan.chat else "completions")
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

    @app.exception_handler(Exception)
    async def _internal_error(request: Request, e: Exception):
        log.exception("unhandled error", exc_info=e)
        return JSONResponse(APIError(500, "internal server error", type="server_error").body(), status_code=500)

    def authorize(request: Request) -> None:
        if config.api_key is None:
            return
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), config.api_key.encode()):
            raise APIError(401, "missing or incorrect API key (send 'Authorization: Bearer KEY')",
                           code="invalid_api_key")

    @app.post("/v1/completions")
    async def completions(request: Request):
        authorize(request)
        return await generate(server, request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        authorize(request)
        return await generate(server, request, chat=True)

    @app.get("/v1/models")
    async def models(request: Request):
        authorize(request)
        tm = server.tm
        card = {"id": config.model_name, "object": "model", "created": server.started, "owned_by": "trimode",
                "context_length": tm.max_context, "modes": list(MODES), "default_mode": config.default_mode,
                "has_drafter": tm.has_drafter, "has_chat_template": bool(tm.tokenizer and tm.tokenizer.chat_template)}
        return {"object": "list", "data": [card]}

    @app.get("/health")
    async def health():
        # `auto`: what the auto policy has learned (estimates, slowdowns, picks, cost curve), when it exists
        return {"status": "ok", "model": config.model_name, **{k: v for k, v in engine.stats().items()
                                                                 if k in ("queue_depth", "running_requests", "auto")}}

    @app.get("/metrics")
    async def metrics():
        return Response(server.metrics.exposition(), media_type=CONTENT_TYPE)

    # -- the playground page (trimode/serve/playground.py): static files, no key needed ---------------------
    add_playground(app)
    # -- end of the playground block ---------------------------------------------------------------------------

    app.add_middleware(_RequestMetrics, server=server)
    return app


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
