"""The OpenAI-compatible HTTP server: `create_app(engine, ServerConfig(...))` -> a FastAPI app.

    POST /v1/completions, /v1/chat/completions, /v1/responses, /v1/edits   (JSON or SSE with "stream": true)
    POST /tokenize, /detokenize; GET /tokenizer_info          (vLLM's tokenizer endpoints, tokens.py)
    GET  /v1/models, /v1/models/{id}, /health, /metrics
    POST /admin/reset_prefix_cache, /reset_prefix_cache      (the engine forgets its cached KV pages)
    GET  /, /playground                                       (the playground page, playground.py)

This module is the factory and the routes. Every generation endpoint takes one path: the body is planned
(`plan.py`: model, route, risk, mode, sizes, tokens) and submitted to the engine in a worker thread, and the
engine's events become OpenAI JSON or server-sent events (`respond.py`). The middleware (`middleware.py`)
counts every request, refuses what a cross-site page could send (other methods, foreign Host names, non-JSON
bodies), caps the body and turns an unhandled error into a 500 that names no internals.
"""

from __future__ import annotations

import asyncio
import hmac
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from trimode.decode.modes import names
from trimode.engine import Engine
from trimode.engine.client import EngineClient
from trimode.engine.request import EngineStopped
from trimode.serve.metrics import CONTENT_TYPE, ServerMetrics
from trimode.serve.middleware import CLIENT_GONE, BodyLimit, LocalOnly, RequestMetrics, Unhandled
from trimode.serve.openapi import ERROR_RESPONSES, openapi_schema
from trimode.serve.plan import LOOPBACK_HOSTS, MODES, Plan, Planner, ServerConfig, prompt_char_limit
from trimode.serve.playground import add_playground
from trimode.serve.priority import ModeMeter
from trimode.serve.protocol import APIError
from trimode.serve.respond import Responder, engine_error
from trimode.serve.tokens import Tokens

# What an unknown path's 404 lists.
SERVED = ("POST /v1/completions, /v1/chat/completions, /v1/responses, /v1/edits, /tokenize, /detokenize; GET "
          "/v1/models, /v1/models/{id}, /tokenizer_info, /health, /metrics (no embeddings: this server generates text)")

__all__ = ["LOOPBACK_HOSTS", "Plan", "ServerConfig", "create_app", "engine_error", "prompt_char_limit"]


@dataclass
class Server:
    """What the routes share: the engine, the planner, the responder and the metrics."""

    engine: Engine | EngineClient
    config: ServerConfig
    planner: Planner
    responder: Responder
    metrics: ServerMetrics

    @property
    def max_prompt_chars(self) -> int | None:
        return self.planner.max_prompt_chars

    async def generate(self, request: Request, endpoint: str) -> Response:
        raw = await request.body()
        # Parsing, validating, tokenizing (and, in `respond`, the engine's preparation) cost time linear in the
        # body: worker threads do it, so the event loop keeps serving /health and the other requests meanwhile.
        plan = await run_in_threadpool(self.planner.prepare, raw, request.headers, endpoint)
        request.state.mode = plan.mode
        return await self.responder.respond(request, plan)


def create_app(engine: Engine | EngineClient, config: ServerConfig) -> FastAPI:
    """The app; it starts the engine on start-up and stops it on shut-down. `engine`: an in-process `Engine`, or an
    `EngineClient` of engine-core processes (trimode/engine/client.py): the routes use only what both offer."""
    meter, metrics = ModeMeter(), ServerMetrics(engine.stats)
    server = Server(engine, config, Planner(engine, config, meter), Responder(engine, config, metrics, meter),
                    metrics)
    started = int(time.time())

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        engine.start()
        try:
            yield
        finally:
            await asyncio.to_thread(engine.stop)

    app = FastAPI(title="trimode", version="0.1.0", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.server = server
    add_error_handlers(app)

    def authorize(request: Request) -> None:
        if config.api_key is None:
            return
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), config.api_key.encode()):
            raise APIError(401, "missing or incorrect API key (send 'Authorization: Bearer KEY')",
                           code="invalid_api_key")

    # The bodies are parsed by `protocol.parse_body` (strict, off the event loop), not by FastAPI; the OpenAPI
    # document still describes them (`openapi.py`), for clients and for the fuzz tests.
    @app.post("/v1/completions", responses=ERROR_RESPONSES)
    async def completions(request: Request):
        authorize(request)
        return await server.generate(request, "completions")

    @app.post("/v1/chat/completions", responses=ERROR_RESPONSES)
    async def chat_completions(request: Request):
        authorize(request)
        return await server.generate(request, "chat.completions")

    @app.post("/v1/responses", responses=ERROR_RESPONSES)
    async def responses(request: Request):
        authorize(request)
        return await server.generate(request, "responses")

    @app.post("/v1/edits", responses=ERROR_RESPONSES)
    async def edits(request: Request):
        authorize(request)
        return await server.generate(request, "edits")

    tm = engine.tm
    card = {"id": config.model_name, "object": "model", "created": started, "owned_by": "trimode",
            "context_length": tm.max_context, "max_model_len": tm.max_context, "modes": list(MODES),
            "default_mode": config.default_mode, "lossless_modes": [m for m in MODES if m in names(lossless=True)],
            "has_drafter": tm.has_drafter, "has_chat_template": bool(tm.tokenizer and tm.tokenizer.chat_template)}

    @app.get("/v1/models")
    async def models(request: Request):
        authorize(request)
        return {"object": "list", "data": [card]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str, request: Request):
        authorize(request)
        if model_id != config.model_name:
            raise APIError(404, f"the model {model_id!r} does not exist; this server serves {config.model_name!r}",
                           param="model", code="model_not_found")
        return card

    add_tokenizer_routes(app, Tokens(server.planner, config.model_name), authorize)
    add_admin_routes(app, engine, authorize)

    add_status_routes(app, engine, config, metrics)
    add_playground(app)  # the playground page (trimode/serve/playground.py): static files, no key needed
    app.openapi = lambda: openapi_schema(app, config)
    # Added innermost first: metrics see every status (405, 413, 415, 421, 500 included); the body limit and the
    # local-only checks act before a route reads anything.
    app.add_middleware(Unhandled)
    app.add_middleware(LocalOnly, allowed_hosts=config.allowed_hosts)
    app.add_middleware(BodyLimit, limit=config.max_body_bytes)
    app.add_middleware(RequestMetrics, metrics=metrics)
    return app


def add_tokenizer_routes(app: FastAPI, tokens: Tokens, authorize) -> None:
    """vLLM's /tokenize, /detokenize and /tokenizer_info (`tokens.py`), behind the API key like /v1."""

    @app.post("/tokenize")
    async def tokenize(request: Request):
        authorize(request)
        return await run_in_threadpool(tokens.tokenize, await request.body())

    @app.post("/detokenize")
    async def detokenize(request: Request):
        authorize(request)
        return await run_in_threadpool(tokens.detokenize, await request.body())

    @app.get("/tokenizer_info")
    async def tokenizer_info(request: Request):
        authorize(request)
        return tokens.info()


def add_status_routes(app: FastAPI, engine: Engine | EngineClient, config: ServerConfig,
                      metrics: ServerMetrics) -> None:
    """/health (a load balancer's probe) and /metrics (Prometheus), open without the API key."""

    @app.head("/health", include_in_schema=False)  # a load balancer's probe
    @app.get("/health")
    async def health():
        # `auto`: what the auto policy has learned (estimates, slowdowns, picks, cost curve), when it exists
        # `engines`: the engine processes' pids and states (--engine-process); 503 while one is down
        keys = ("queue_depth", "running_requests", "max_running", "max_queue", "auto", "engines")
        stats = engine.stats()
        body = {"status": "ok", "model": config.model_name, **{k: v for k, v in stats.items() if k in keys}}
        if not stats.get("healthy", True):
            return JSONResponse(body | {"status": "unavailable"}, status_code=503)
        return body

    @app.get("/metrics")
    async def metrics_page():
        return Response(metrics.exposition(), media_type=CONTENT_TYPE)


def add_admin_routes(app: FastAPI, engine: Engine | EngineClient, authorize) -> None:
    """POST /admin/reset_prefix_cache (and vLLM's /reset_prefix_cache): every engine forgets its cached KV pages
    (after changing weights, or to measure cold prompts); behind the API key like /v1."""

    async def reset_prefix_cache(request: Request):
        authorize(request)
        try:
            dropped = await asyncio.to_thread(engine.reset_prefix_cache)
        except EngineStopped as e:  # no engine process ready (503)
            raise engine_error(e) from None
        return {"status": "ok", "pages_dropped": dropped}

    for path in ("/admin/reset_prefix_cache", "/reset_prefix_cache"):
        app.add_api_route(path, reset_prefix_cache, methods=["POST"], responses=ERROR_RESPONSES)


def add_error_handlers(app: FastAPI) -> None:
    """Every error a route raises as an OpenAI error body; a client gone mid-upload as no answer at all."""

    @app.exception_handler(APIError)
    async def _api_error(request: Request, e: APIError):
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, e: StarletteHTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code)
        message = str(e.detail)
        if e.status_code == 404 and e.detail == "Not Found":  # no such route: say what is served
            message = f"{request.method} {request.url.path} is not served here; this server serves {SERVED}"
        return JSONResponse(APIError(e.status_code, message, code=code).body(), status_code=e.status_code,
                            headers=getattr(e, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, e: RequestValidationError):
        return JSONResponse(APIError(400, f"invalid request: {e.errors()[0].get('msg')}").body(), status_code=400)

    @app.exception_handler(ClientDisconnect)
    async def _client_gone(request: Request, e: ClientDisconnect):
        # Nothing reaches the client; the status is what /metrics counts (not a 500: nothing failed here).
        return Response(status_code=CLIENT_GONE)
