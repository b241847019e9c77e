"""OpenAI's Responses API on the chat path: a chat answer (JSON or its stream of chunks) in the shapes of
`POST /v1/responses` (the openai package's `openai.types.responses`).

The plan and the engine are the chat route's (`plan.py`, `respond.py`); this module only reshapes: a chat body
into a `response` object, and chat chunks into the Responses events, in OpenAI's order:

    response.created, response.in_progress, response.output_item.added, response.content_part.added,
    response.output_text.delta ..., response.output_text.done, response.content_part.done,
    response.output_item.done, response.completed (response.incomplete when max_output_tokens cut it)

An engine error in the stream is an `error` event, then `response.failed`.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator

from trimode.serve.plan import Plan


def _usage(chat_usage: dict | None) -> dict | None:
    if chat_usage is None:
        return None
    return {"input_tokens": chat_usage["prompt_tokens"], "output_tokens": chat_usage["completion_tokens"],
            "total_tokens": chat_usage["total_tokens"],
            "input_tokens_details": {"cached_tokens": chat_usage["prompt_tokens_details"]["cached_tokens"],
                                     "cache_write_tokens": 0},
            "output_tokens_details": {"reasoning_tokens": 0}}


def _message(plan: Plan, text: str, status: str) -> dict:
    content = [] if status == "in_progress" else [_part(text)]
    return {"type": "message", "id": "msg_" + plan.request_id.removeprefix("resp_"), "status": status,
            "role": "assistant", "content": content}


def _part(text: str) -> dict:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


def _response(plan: Plan, model: str, status: str, output: list, usage: dict | None = None,
              trimode: dict | None = None) -> dict:
    body = {"id": plan.request_id, "object": "response", "created_at": plan.created, "status": status,
            "background": False, "error": None,
            "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
            "model": model, "output": output, "previous_response_id": None, "reasoning": {"effort": None,
                                                                                          "summary": None},
            "store": False, "text": {"format": {"type": "text"}}, "tools": [], "truncation": "disabled",
            "usage": usage, **plan.settings}
    if status in ("completed", "incomplete"):
        body["completed_at"] = int(time.time())
    if trimode is not None:
        body["trimode"] = trimode
    return body


def response_body(plan: Plan, model: str, chat: dict) -> dict:
    """The `response` object of a finished chat answer."""
    choice = chat["choices"][0]
    status = "incomplete" if choice["finish_reason"] == "length" else "completed"
    message = _message(plan, choice["message"]["content"], status)
    return _response(plan, model, status, [message], _usage(chat["usage"]), chat["trimode"])


async def response_events(chunks: AsyncIterator[dict | str], plan: Plan, model: str) -> AsyncIterator[bytes]:
    """The Responses API's server-sent events of a chat stream's chunks."""
    seq = 0

    def event(kind: str, **fields) -> bytes:
        nonlocal seq
        seq += 1
        data = {"type": kind, "sequence_number": seq - 1, **fields}
        return f"event: {kind}\ndata: {json.dumps(data, ensure_ascii=False)}\n\n".encode()

    item = {"output_index": 0, "item_id": "msg_" + plan.request_id.removeprefix("resp_")}
    text, finish, usage, trimode = "", None, None, None
    yield event("response.created", response=_response(plan, model, "in_progress", []))
    yield event("response.in_progress", response=_response(plan, model, "in_progress", []))
    yield event("response.output_item.added", output_index=0, item=_message(plan, "", "in_progress"))
    yield event("response.content_part.added", **item, content_index=0, part=_part(""))
    async for chunk in chunks:
        if chunk == "[DONE]":
            break
        if "error" in chunk:  # an engine error after the stream began
            error = chunk["error"]
            yield event("error", code=error["code"], message=error["message"], param=error["param"])
            failed = _response(plan, model, "failed", [])
            failed["error"] = {"code": error["code"] or "server_error", "message": error["message"]}
            yield event("response.failed", response=failed)
            return
        for choice in chunk["choices"]:
            delta = choice.get("delta", {}).get("content")
            if delta:
                text += delta
                yield event("response.output_text.delta", **item, content_index=0, delta=delta, logprobs=[])
            if choice.get("finish_reason") is not None:
                finish, trimode = choice["finish_reason"], chunk.get("trimode")
        if chunk.get("usage") is not None:
            usage = _usage(chunk["usage"])
    status = "incomplete" if finish == "length" else "completed"
    message = _message(plan, text, status)
    yield event("response.output_text.done", **item, content_index=0, text=text, logprobs=[])
    yield event("response.content_part.done", **item, content_index=0, part=_part(text))
    yield event("response.output_item.done", output_index=0, item=message)
    yield event(f"response.{status}", response=_response(plan, model, status, [message], usage, trimode))
