"""Responding, the same for every generation endpoint: a `Plan` -> engine requests -> JSON or server-sent events.

`Responder.submit` hands the plan's requests to the engine (in a worker thread: the engine validates and
prepares each, which is linear in the request); `respond` follows their events to one JSON body or an SSE
stream. Before the client sees the end, `finish` records the metrics, the mode meter and (audited routes) the
audit entry; a client that leaves early is counted as cancelled, and an audited route's partial answer is
recorded. `engine_error` is the one place an engine's exception becomes an HTTP error.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator
from contextlib import aclosing

import torch
from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool

from trimode.api import TriMode
from trimode.decode.result import BlockState, Delta, GenerationResult
from trimode.engine import Engine, EngineStopped, QueueFull, RequestHandle
from trimode.engine.client import EngineClient
from trimode.serve.logprobs import (
    chat_logprobs,
    completion_logprobs,
    prompt_logprobs,
    shifted,
    token_logprobs,
    vllm_prompt_logprobs,
)
from trimode.serve.metrics import ServerMetrics
from trimode.serve.plan import Plan, ServerConfig
from trimode.serve.playground import event_fields
from trimode.serve.priority import ModeMeter
from trimode.serve.protocol import APIError
from trimode.serve.responses import response_body, response_events
from trimode.serve.structured import ChoiceDeltas, chat_message

log = logging.getLogger("trimode.serve")


def engine_error(e: BaseException) -> APIError:
    """The client's view of a refused or failed generation: the cause's class only where it is the client's
    business; the details (an allocator's message, a traceback) go to the server log."""
    if isinstance(e, APIError):
        return e
    if isinstance(e, QueueFull):  # every running row and waiting place is taken
        return APIError(429, f"the server is busy: {e}; retry shortly", type="rate_limit_error", code="queue_full",
                        headers={"Retry-After": "1"})
    if isinstance(e, EngineStopped):
        return APIError(503, str(e), type="server_error", code="engine_stopped")
    if isinstance(e, ValueError):
        return APIError(400, str(e))
    log.error("generation failed", exc_info=e)
    if isinstance(e, (MemoryError, torch.OutOfMemoryError)):
        return APIError(503, "the server ran out of memory for this request; retry later or ask for fewer tokens",
                        type="server_error", code="out_of_memory", headers={"Retry-After": "5"})
    return APIError(500, "generation failed (an internal error; the server log has the details)",
                    type="server_error", code="internal_error")


def sse(obj: dict | str) -> bytes:
    return f"data: {obj if isinstance(obj, str) else json.dumps(obj, ensure_ascii=False)}\n\n".encode()


def finish_reason(result: GenerationResult) -> str:
    return result.finish_reason if result.finish_reason in ("stop", "length") else "stop"


def usage(plan: Plan, results: list[GenerationResult]) -> dict:
    """OpenAI's usage: each prompt counted once (not once per choice), its cached tokens those its first choice
    found in the engine's prefix cache."""
    prompt = sum(len(p) for p in plan.prompts)
    completion = sum(len(r.token_ids) for r in results)
    cached = sum(r.stats.cached_tokens for r in results[::max(1, plan.n)])
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": cached}}


class Responder:
    """Engine requests of a plan -> the HTTP answer; one per app."""

    def __init__(self, engine: Engine | EngineClient, config: ServerConfig, metrics: ServerMetrics,
                 meter: ModeMeter) -> None:
        self.engine, self.tm, self.config, self.metrics, self.meter = engine, engine.tm, config, metrics, meter

    # -- plan -> engine -------------------------------------------------------------------------------------
    def submit(self, plan: Plan) -> list[RequestHandle]:
        """Submit every choice (all or none). Linear in the request: call it off the event loop."""
        handles: list[RequestHandle] = []
        try:
            requests = plan.engine_requests()
            if isinstance(self.engine, EngineClient):  # engine processes: one round trip for all the choices
                handles = self.engine.submit_all(requests)
            else:
                for req in requests:
                    handles.append(self.engine.submit(req))
        except (QueueFull, ValueError) as e:
            self.metrics.rejected.labels("queue_full" if isinstance(e, QueueFull) else "invalid").inc()
            raise engine_error(e) from None
        except EngineStopped as e:
            raise engine_error(e) from None
        finally:
            if len(handles) < plan.n * len(plan.prompts):
                for h in handles:
                    h.cancel()
        return handles

    async def respond(self, request: Request, plan: Plan) -> Response:
        handles = await run_in_threadpool(self.submit, plan)
        headers = {"X-Request-Id": plan.request_id}
        if plan.route is not None:
            headers["X-Trimode-Review"] = "flagged" if plan.review_flag else plan.route.human_review
        if plan.endpoint == "responses":  # the chat path's answer in the Responses API's shapes
            if plan.stream:
                events = response_events(self._chunks(request, plan, handles), plan, self.config.model_name)
                return StreamingResponse(events, media_type="text/event-stream", headers=headers)
            chat = await self._complete(request, plan, handles)
            return JSONResponse(response_body(plan, self.config.model_name, chat), headers=headers)
        if plan.stream:
            return StreamingResponse(self._stream(request, plan, handles), media_type="text/event-stream",
                                     headers=headers)
        return JSONResponse(await self._complete(request, plan, handles), headers=headers)

    # -- bookkeeping ----------------------------------------------------------------------------------------
    def finish(self, plan: Plan, results: list[GenerationResult], texts: list[str],
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
            self._audit(plan, results[0].mode if results else plan.mode, texts, [r.finish_reason for r in results],
                        logprobs)
        except OSError as e:  # no audit entry, no answer: the route requires the record
            log.exception("audit log write failed for %s", plan.request_id)
            raise APIError(500, f"the audit log could not be written ({e.strerror}); the answer is withheld",
                           type="server_error", code="audit_failed") from None

    def abandon(self, plan: Plan, texts: list[str], count: int) -> None:
        """A stream cut off before the end (client gone): count it, and audit what an audited route produced."""
        self.metrics.cancelled.inc(count)
        try:
            self._audit(plan, plan.mode, texts, ["cancelled"] * len(texts), None)
        except OSError:
            log.exception("could not write the audit entry of the cancelled request %s", plan.request_id)

    def _audit(self, plan: Plan, mode: str, texts: list[str], finish_reasons: list[str],
               logprobs: list[list[float]] | None) -> None:
        route = plan.route
        if route is None or not route.audited or self.config.audit_log is None:
            return
        self.config.audit_log.record(
            route=route.name, mode=mode, request_id=plan.request_id, prompts=plan.prompt_texts, outputs=texts,
            review=route.human_review, flagged=bool(plan.review_flag), finish_reasons=finish_reasons,
            endpoint=plan.endpoint, model=self.config.model_name, priority=route.priority,
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

    def edit_body(self, plan: Plan, r: GenerationResult, obj: str = "edit") -> dict:
        """/v1/edits' answer (and its stream's last chunk): the edited text and the spans written."""
        choice = {"index": 0, "text": r.text or "", "spans": [list(s) for s in r.spans],
                  "finish_reason": finish_reason(r)}
        extra = {"review": plan.review(), "policy": plan.policy()} if plan.route is not None else {}
        return {"id": plan.request_id, "object": obj, "created": plan.created, "model": self.config.model_name,
                "choices": [choice], "usage": usage(plan, [r]),
                "trimode": r.stats.as_dict() | {"knobs": r.knobs} | extra}

    # -- JSON -----------------------------------------------------------------------------------------------
    async def _complete(self, request: Request, plan: Plan, handles: list[RequestHandle]) -> dict:
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
                raise engine_error(e) from None
            raise
        finally:
            watcher.cancel()
        done = [r for r in results if r is not None]
        if len(done) != len(handles):
            raise APIError(500, "the engine ended a request without a result", type="server_error")
        texts = [r.text or "" for r in done]
        if plan.endpoint == "edits":
            self.finish(plan, done, texts)
            return self.edit_body(plan, done[0])
        lps, entries, scores = await self.logprobs(plan, done, texts)
        self.finish(plan, done, texts, _audit_logprobs(plan, entries))
        choices = []
        for k, r in enumerate(done):
            choice: dict = {"index": k}
            finish = finish_reason(r)
            if plan.chat:
                choice["message"], finish = chat_message(texts[k], finish, plan.tools, plan.structured)
            else:
                choice["text"] = (plan.prompt_texts[k // plan.n] if plan.echo else "") + texts[k]
            choice |= {"logprobs": lps[k], "finish_reason": finish, "trimode": r.stats.as_dict()}
            if plan.show_prompt_logprobs and not plan.chat:
                choice["prompt_logprobs"] = scores[k]
            choices.append(choice)
        body = {"id": plan.request_id, "object": "chat.completion" if plan.chat else "text_completion",
                "created": plan.created, "model": self.config.model_name, "system_fingerprint": None,
                "choices": choices, "usage": usage(plan, done), "trimode": self.stats_field(plan, done)}
        if plan.show_prompt_logprobs and plan.chat:  # vLLM's place for a chat's (one conversation: one prompt)
            body["prompt_logprobs"] = scores[0]
        return body

    async def logprobs(self, plan: Plan, done: list[GenerationResult],
                       texts: list[str]) -> tuple[list[dict | None], list, list[list | None]]:
        """Per choice its `logprobs` object (None when not asked), the generated tokens' entries (for the audit)
        and vLLM's `prompt_logprobs` (None when not asked). With `echo`, the prompt's entries (the engine's
        scores) come first, offsets over the echoed text. The text work runs in a worker thread."""
        entries = await _logprob_entries(self.tm, plan, done, texts, plan.logprobs or 0)
        scores: list[list | None] = [None] * len(done)
        if plan.show_prompt_logprobs:
            scores = await asyncio.to_thread(lambda: [vllm_prompt_logprobs(
                self.tm, plan.prompts[k // plan.n], r.prompt_logprobs or []) for k, r in enumerate(done)])
        if plan.logprobs is None:
            return [None] * len(done), entries, scores
        if plan.chat:
            return [chat_logprobs(e) for e in entries], entries, scores
        shown = entries
        if plan.echo:
            shown = []
            for k, (r, e) in enumerate(zip(done, entries, strict=True)):
                prompt = plan.prompts[k // plan.n]
                head = await asyncio.to_thread(prompt_logprobs, self.tm, prompt, r.prompt_logprobs, plan.logprobs)
                shown.append(head + shifted(e, len(plan.prompt_texts[k // plan.n])))
        return [completion_logprobs(e, plan.logprobs) for e in shown], entries, scores

    # -- server-sent events ---------------------------------------------------------------------------------
    def _chunk(self, plan: Plan, k: int, text: str | None = None, **extra) -> dict:
        kind = "edit.chunk" if plan.endpoint == "edits" else "chat.completion.chunk" if plan.chat else "text_completion"
        base = {"id": plan.request_id, "object": kind,
                "created": plan.created, "model": self.config.model_name}
        if plan.endpoint == "edits":
            return {**base, **extra}
        if plan.chat:
            base["system_fingerprint"] = None
            choice = {"index": k, "delta": {} if text is None else {"content": text}, "logprobs": None,
                      "finish_reason": None}
        else:
            choice = {"index": k, "text": text or "", "logprobs": None, "finish_reason": None}
        return {**base, "choices": [choice | extra]}

    async def _stream(self, request: Request, plan: Plan, handles: list[RequestHandle]) -> AsyncIterator[bytes]:
        async for chunk in self._chunks(request, plan, handles):
            yield sse(chunk)

    async def _chunks(self, request: Request, plan: Plan, handles: list[RequestHandle]) -> AsyncIterator[dict | str]:
        """SSE chunks: text as soon as it is committed (optionally provisional blocks); the finish chunks (with the
        `trimode` statistics) only once every choice is done and any audit entry is on disk."""
        watcher = asyncio.create_task(_cancel_on_disconnect(request, handles))
        t0, first_token = time.perf_counter(), False
        results: list[GenerationResult | None] = [None] * len(handles)
        texts = [""] * len(handles)
        deltas = [ChoiceDeltas(plan.tools) for _ in handles]  # chat: content and tool_calls deltas
        try:
            for k in range(len(handles) if plan.endpoint != "edits" else 0):
                if plan.chat:
                    yield self._chunk(plan, k, None) | {"choices": [{
                        "index": k, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                        "finish_reason": None}]}
                elif plan.echo:
                    yield self._chunk(plan, k, plan.prompt_texts[k // plan.n])
            try:
                async with aclosing(_events(handles)) as events:
                    async for k, ev in events:
                        if isinstance(ev, Delta) and (ev.text or ev.token_ids) and plan.endpoint != "edits":
                            if ev.text and not first_token:
                                first_token = True
                                self.metrics.first_token.labels(plan.mode).observe(time.perf_counter() - t0)
                            texts[k] += ev.text or ""
                            if plan.chat and plan.tools:
                                for delta in deltas[k].feed(ev.text or ""):
                                    yield self._chunk(plan, k, None, delta=delta)
                                continue
                            yield self._chunk(plan, k, ev.text or None, trimode=event_fields(self.tm, ev))
                        elif isinstance(ev, BlockState):
                            forced = {} if ev.forced is None else {"forced": ev.forced}  # under a grammar
                            yield self._chunk(plan, k, None, trimode=event_fields(self.tm, ev), provisional={
                                "token_ids": ev.token_ids, "text": ev.text, **forced})
                        elif isinstance(ev, GenerationResult):
                            results[k] = ev
            except Exception as e:  # the stream has started: report in-band, as OpenAI does
                yield engine_error(e).body()
                return
            async for part in self._stream_end(plan, [r for r in results if r is not None], deltas):
                yield part
        finally:
            watcher.cancel()
            unfinished = [h for h in handles if not h.done]
            for h in unfinished:
                h.cancel()  # the client went away (or the stream failed): free the engine's work
            if unfinished:
                self.abandon(plan, texts, len(unfinished))

    async def _stream_end(self, plan: Plan, done: list[GenerationResult],
                          deltas: list[ChoiceDeltas]) -> AsyncIterator[dict | str]:
        try:
            final_texts = [r.text or "" for r in done]
            lps, entries, scores = await self.logprobs(plan, done, final_texts)
            self.finish(plan, done, final_texts, _audit_logprobs(plan, entries))
        except APIError as e:
            yield e.body()
            return
        if plan.endpoint == "edits":
            yield self.edit_body(plan, done[0], "edit.chunk")
        else:
            for k, r in enumerate(done):
                for delta in deltas[k].close():
                    yield self._chunk(plan, k, None, delta=delta)
                # The decoders report no logprobs as they go: a choice's come in one chunk after its text (the
                # concatenation of the chunks' logprobs is the whole list, as when OpenAI sends them piecewise).
                extra = {"prompt_logprobs": scores[k]} if (
                    plan.show_prompt_logprobs and not plan.chat) else {}
                if lps[k] is not None or extra:
                    chunk = self._chunk(plan, k, None, **extra)
                    chunk["choices"][0]["logprobs"] = lps[k]
                    yield chunk
                final = self._chunk(plan, k, None, finish_reason=deltas[k].finish(finish_reason(r)))
                if plan.show_prompt_logprobs and plan.chat:
                    final["prompt_logprobs"] = scores[k]
                final["trimode"] = {**self.stats_field(plan, [r]), "choice": r.stats.as_dict()}
                yield final
            if plan.include_usage:
                yield self._chunk(plan, 0) | {"choices": [], "usage": usage(plan, done),
                                              "trimode": self.stats_field(plan, done)}
        yield "[DONE]"


async def _events(handles: list[RequestHandle]) -> AsyncIterator[tuple[int, object]]:
    """(choice index, event) from all handles as they come; an engine error is re-raised here."""
    if len(handles) == 1:  # the common case (n = 1, one prompt): no pump task and queue hop per event
        async for ev in handles[0].aiter():
            yield 0, ev
        return
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


async def _logprob_entries(tm: TriMode, plan: Plan, done: list[GenerationResult], texts: list[str],
                           top: int) -> list:
    """Per choice, its tokens' logprobs, when the client or the audit record wants them (else empty)."""
    if plan.edit is not None or (plan.logprobs is None and not plan.audit_logprobs):
        return []
    return [await asyncio.to_thread(token_logprobs, tm, r, texts[k], top) for k, r in enumerate(done)]


def _audit_logprobs(plan: Plan, entries: list) -> list[list[float]] | None:
    return [[e.logprob for e in choice] for choice in entries] if plan.audit_logprobs else None
