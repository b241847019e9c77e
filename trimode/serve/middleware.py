"""ASGI middleware of the server, outermost first: request metrics, the local-only checks (method, Host,
content type), the body limit, and the last-resort handler of unhandled errors."""

from __future__ import annotations

import logging
import time

from fastapi.responses import JSONResponse
from starlette.datastructures import Headers
from starlette.requests import ClientDisconnect

from trimode.serve.metrics import ServerMetrics
from trimode.serve.protocol import APIError

log = logging.getLogger("trimode.serve")
METHODS = ("GET", "HEAD", "POST")  # what any route answers; others are 405 before routing
CLIENT_GONE = 499  # the metrics' status of a request whose client left before any answer (nginx's code)


async def answer(e: APIError, scope, receive, send) -> None:
    await JSONResponse(e.body(), status_code=e.status, headers=e.headers)(scope, receive, send)


class LocalOnly:
    """ASGI middleware: what a browser page on another site must not be able to make this server do.

    A method no route has is a 405 with `Allow`. A Host header not in `allowed_hosts` (any port) is a 421: a
    page whose domain was rebound to 127.0.0.1 sends its own name (DNS rebinding). A POST whose body is not
    declared JSON is a 415: a cross-site form or `fetch` can send text/plain without a CORS preflight, never
    application/json."""

    def __init__(self, app, allowed_hosts: tuple[str, ...] | None) -> None:
        self.app = app
        hosts = None if allowed_hosts is None or "*" in allowed_hosts else allowed_hosts
        self.hosts = None if hosts is None else {h.lower().strip("[]") for h in hosts}

    @staticmethod
    def host_name(value: str) -> str:
        """The host of a Host header, without its port: "[::1]:8000" -> "::1", "localhost:80" -> "localhost"."""
        value = value.strip().lower()
        if value.startswith("["):
            return value[1:value.find("]")] if "]" in value else value
        return value.rsplit(":", 1)[0] if value.count(":") == 1 else value

    @staticmethod
    async def drain(receive) -> None:
        """Read and drop the body (the body limit, outside, bounds it): answering with unread bytes in the
        socket resets the connection now and then, and the client loses the answer."""
        try:
            while (await receive()).get("more_body"):
                pass
        except APIError:  # over the body limit: the answer is this one anyway
            pass

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        method, headers = scope["method"], Headers(scope=scope)
        if method not in METHODS:
            return await answer(APIError(405, f"method {method} is not allowed", code="method_not_allowed",
                                         headers={"Allow": ", ".join(METHODS)}), scope, receive, send)
        if self.hosts is not None and self.host_name(headers.get("host", "")) not in self.hosts:
            return await answer(APIError(421, f"this server answers the host names {', '.join(sorted(self.hosts))}"
                                              " only (start it with --allowed-host to add one)",
                                         code="host_not_allowed"), scope, receive, send)
        if method == "POST":
            kind = headers.get("content-type", "").split(";")[0].strip().lower()
            if kind != "application/json":
                await self.drain(receive)
                return await answer(APIError(415, f"the request body must be JSON (Content-Type: application/json"
                                                  f"), got {kind or 'no content type'!r}", param="content-type",
                                             code="unsupported_media_type"), scope, receive, send)
        await self.app(scope, receive, send)


class BodyLimit:
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
            return await answer(e, scope, receive, send)
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


class Unhandled:
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
        except ClientDisconnect:  # the client left mid-upload: nobody to answer, nothing went wrong here
            log.info("client left during %s %s", scope.get("method"), scope.get("path"))
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


class RequestMetrics:
    """ASGI middleware: count answered requests by endpoint and status, and time generation requests."""

    GENERATING = ("/v1/completions", "/v1/chat/completions", "/v1/responses", "/v1/edits")
    ENDPOINTS = (*GENERATING, "/v1/models", "/tokenize", "/detokenize", "/tokenizer_info", "/health", "/metrics")

    def __init__(self, app, metrics: ServerMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"] if scope["path"] in self.ENDPOINTS else "other"
        status = {"code": CLIENT_GONE}  # no answer started: the client left (an exception: 500, below)
        t0 = time.perf_counter()
        generating = path in self.GENERATING
        if generating:
            self.metrics.in_flight.inc()

        async def send_and_watch(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_watch)
        except BaseException:
            if status["code"] == CLIENT_GONE:
                status["code"] = 500
            raise
        finally:
            m = self.metrics
            m.requests.labels(path, str(status["code"])).inc()
            if generating:
                m.in_flight.dec()
                mode = scope.get("state", {}).get("mode", "none")
                m.latency.labels(path, mode).observe(time.perf_counter() - t0)
