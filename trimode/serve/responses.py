"""OpenAI's Responses API on the chat path: a chat answer (JSON or its stream of chunks) in the shapes of
`POST /v1/responses` (the openai package's `openai.types.responses`).

The plan and the engine are the chat route's (`plan.py`, `respond.py`); this module only reshapes: a chat body
into a `response` object, and chat chunks into the Responses events, in OpenAI's order:

    response.created, response.in_progress, response.output_item.added, response.content_part.added,
    response.output_text.delta ..., response.output_text.done, response.content_part.done,
    response.output_item.done, response.completed (response.incomplete when max_output_tokens cut it)

With tools, the message item opens at the answer's first text (an answer of calls only has none), and each call
is a `function_call` item: response.output_item.added (its call_id and name), response.function_call_arguments
.delta, then at the end response.function_call_arguments.done and response.output_item.done. The text items
and function calls are what `serve/structured.py` made of the chat answer (`message.tool_calls`).

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


def _call_item(call: dict, status: str) -> dict:
    """A chat tool call as a Responses `function_call` output item."""
    return {"type": "function_call", "id": "fc_" + call["id"].removeprefix("call_"), "call_id": call["id"],
            "name": call["function"]["name"], "arguments": call["function"]["arguments"], "status": status}


def response_body(plan: Plan, model: str, chat: dict) -> dict:
    """The `response` object of a finished chat answer: its text as a message item (none when the answer is
    calls only), then one `function_call` item per tool call."""
    choice = chat["choices"][0]
    status = "incomplete" if choice["finish_reason"] == "length" else "completed"
    message, calls = choice["message"], choice["message"].get("tool_calls") or []
    output = [] if calls and message["content"] is None else [_message(plan, message["content"] or "", status)]
    output += [_call_item(c, "completed") for c in calls]
    return _response(plan, model, status, output, _usage(chat["usage"]), chat["trimode"])


class _Events:
    """The Responses events of one streamed answer, numbered in order: the message item opens at its first text
    (or at the end when the answer made no call), each call's item at its first delta."""

    def __init__(self, plan: Plan, model: str) -> None:
        self.plan, self.model, self.seq = plan, model, 0
        self.text, self.output, self.message = "", [], None  # message: its output index once opened
        self.calls: dict[int, dict] = {}  # chat tool_calls index -> its function_call item

    def event(self, kind: str, **fields) -> bytes:
        self.seq += 1
        data = {"type": kind, "sequence_number": self.seq - 1, **fields}
        return f"event: {kind}\ndata: {json.dumps(data, ensure_ascii=False)}\n\n".encode()

    def _item(self) -> dict:
        return {"output_index": self.message, "item_id": "msg_" + self.plan.request_id.removeprefix("resp_")}

    def open_message(self) -> list[bytes]:
        if self.message is not None:
            return []
        self.message = len(self.output)
        self.output.append(None)
        return [self.event("response.output_item.added", output_index=self.message,
                           item=_message(self.plan, "", "in_progress")),
                self.event("response.content_part.added", **self._item(), content_index=0, part=_part(""))]

    def text_delta(self, delta: str) -> list[bytes]:
        self.text += delta
        return [*self.open_message(), self.event("response.output_text.delta", **self._item(), content_index=0,
                                                 delta=delta, logprobs=[])]

    def call_delta(self, d: dict) -> list[bytes]:
        item = self.calls.get(d["index"])
        if item is None:  # its first delta: the id and the name
            item = self.calls[d["index"]] = _call_item({"id": d["id"], "function": d["function"]}, "in_progress")
            item["output_index"] = len(self.output)
            self.output.append(item)
            return [self.event("response.output_item.added", output_index=item["output_index"],
                               item={k: v for k, v in item.items() if k != "output_index"})]
        args = d["function"].get("arguments") or ""
        item["arguments"] += args
        return [self.event("response.function_call_arguments.delta", output_index=item["output_index"],
                           item_id=item["id"], delta=args)] if args else []

    def close(self, status: str) -> list[bytes]:
        """The closing events of every item, in output order; the output list of the final response."""
        out = [] if self.calls else self.open_message()
        if self.message is not None:
            message = self.output[self.message] = _message(self.plan, self.text, status)
            out += [self.event("response.output_text.done", **self._item(), content_index=0, text=self.text,
                               logprobs=[]),
                    self.event("response.content_part.done", **self._item(), content_index=0, part=_part(self.text)),
                    self.event("response.output_item.done", output_index=self.message, item=message)]
        for item in self.calls.values():
            k = item.pop("output_index")
            item["status"] = "completed"
            out += [self.event("response.function_call_arguments.done", output_index=k, item_id=item["id"],
                               name=item["name"], arguments=item["arguments"]),
                    self.event("response.output_item.done", output_index=k, item=item)]
        return out


async def response_events(chunks: AsyncIterator[dict | str], plan: Plan, model: str) -> AsyncIterator[bytes]:
    """The Responses API's server-sent events of a chat stream's chunks."""
    ev = _Events(plan, model)
    finish, usage, trimode = None, None, None
    yield ev.event("response.created", response=_response(plan, model, "in_progress", []))
    yield ev.event("response.in_progress", response=_response(plan, model, "in_progress", []))
    if not plan.tools:  # plain text: the message opens at once, as before any token
        for e in ev.open_message():
            yield e
    async for chunk in chunks:
        if chunk == "[DONE]":
            break
        if "error" in chunk:  # an engine error after the stream began
            error = chunk["error"]
            yield ev.event("error", code=error["code"], message=error["message"], param=error["param"])
            failed = _response(plan, model, "failed", [])
            failed["error"] = {"code": error["code"] or "server_error", "message": error["message"]}
            yield ev.event("response.failed", response=failed)
            return
        for choice in chunk["choices"]:
            delta = choice.get("delta", {})
            for e in ev.text_delta(delta["content"]) if delta.get("content") else []:
                yield e
            for d in delta.get("tool_calls") or []:
                for e in ev.call_delta(d):
                    yield e
            if choice.get("finish_reason") is not None:
                finish, trimode = choice["finish_reason"], chunk.get("trimode")
        if chunk.get("usage") is not None:
            usage = _usage(chunk["usage"])
    status = "incomplete" if finish == "length" else "completed"
    for e in ev.close(status):
        yield e
    yield ev.event(f"response.{status}", response=_response(plan, model, status, ev.output, usage, trimode))
