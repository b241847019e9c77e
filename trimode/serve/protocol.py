"""The wire format: OpenAI request bodies (strict pydantic models, trimode's extra fields included) and the
OpenAI-style error body. Responses are plain dicts built in `respond.py`.

Extra body fields (sent with the `openai` client as `extra_body={...}`): `mode`, `route`, `risk`, every mode's
knobs (the registry `trimode.decode.modes`: `block_length`, `threshold`, `steps`, `causal_context`,
`remask_threshold`, `unmask`, `use_drafter`, `ar_mix_weight`), the thinking budget `max_thinking_tokens` /
`end_think_token_id`, and `provisional` (stream the diffusion block before it is committed). Unknown fields are
rejected with a 400 that names them.

Types are strict: an integer field takes a JSON integer (not "5", not true, not 5.0), a number field a finite
JSON number (NaN and infinities are named as such), a boolean field true or false. `parse_body` turns raw bytes
into a request or a 400: invalid JSON, nesting deeper than 200 levels, and strings that are not valid Unicode
(a lone surrogate escape such as "\\ud800", invalid UTF-8) are refused by the parser, so nothing downstream
(the tokenizer, the JSON encoder of an error message) meets them.
"""

from __future__ import annotations

import re
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, FiniteFloat, ValidationError, field_validator, model_validator
from pydantic_core import from_json

from trimode.decode.modes import KNOB_NAMES, MODES
from trimode.request.tools import MAX_CALLS
from trimode.serve.structured import (
    MAX_TOOLS,
    ResponsesFormat,
    ResponsesTool,
    StructuredFields,
    ToolFields,
    responses_tool_choice,
)

# What a request's `mode` may name (edits have their own fields and route: `suffix`, /v1/edits).
RequestMode = Literal[tuple(name for name, spec in MODES.items() if not spec.editing)]  # type: ignore[valid-type]
Risk = Literal["low", "medium", "high"]
ROLES = ("system", "developer", "user", "assistant", "tool")
MAX_N = 16
MAX_STOPS = 8
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F][0-9a-fA-F]{2}")
STRICT = ConfigDict(extra="forbid", strict=True)
# What the OpenAPI schema says of the fields validated by hand (their Python type is Any).
_TEXT = {"type": "string", "minLength": 1}
_IDS = {"type": "array", "items": {"type": "integer", "minimum": 0}, "minItems": 1}
_TEXT_PART = {"type": "object", "required": ["type", "text"], "additionalProperties": False,
              "properties": {"type": {"const": "text"}, "text": {"type": "string"}}}
Model = TypeVar("Model", bound=BaseModel)


class APIError(Exception):
    """An error answered as `{"error": {"message", "type", "param", "code"}}` with an HTTP status."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def parse_body(raw: bytes, model: type[Model]) -> Model:
    """The request body as `model`, or an APIError (400) that says what is wrong with it.

    pydantic-core's JSON parser, not the standard library's: it refuses strings that are not valid Unicode
    (lone surrogate escapes, invalid UTF-8) and nesting beyond 200 levels, where `json.loads` accepts the first
    and raises RecursionError on the second; it is several times faster on a body of millions of tokens, and
    lets other threads (the event loop) run meanwhile. Still linear in the body: the server calls this off the
    event loop."""
    try:
        data = from_json(raw)
    except ValueError as e:
        message = str(e)
        if "recursion limit" in message:
            message = "it nests too deeply"
        elif "surrogate" in message or _SURROGATE_ESCAPE.search(raw):
            message += " (a string holds a lone UTF-16 surrogate escape such as \\ud800: not valid Unicode)"
        raise APIError(400, f"the request body is not valid JSON: {message}", code="invalid_json") from None
    if not isinstance(data, dict):
        raise APIError(400, "the request body must be a JSON object", code="invalid_json")
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise validation_error(e) from None


def validation_error(e: ValidationError) -> APIError:
    """The first pydantic error as a 400 naming the field (OpenAI answers invalid parameters with 400)."""
    err = e.errors(include_url=False)[0]
    loc = ".".join(str(p) for p in err["loc"] if not (isinstance(p, str) and p.startswith(("function-", "list["))))
    if err["type"] == "extra_forbidden":
        message = f"unknown field {loc!r}"
    elif err["type"] == "missing":
        message = f"missing required field {loc!r}"
    elif err["type"] == "finite_number":
        message = f"{loc}: must be a finite number (not NaN or infinity)"
    else:
        msg = err["msg"].removeprefix("Value error, ")
        message = f"{loc}: {msg}" if loc else msg
    return APIError(400, message, param=loc or None, code="invalid_value")


class StreamOptions(BaseModel):
    model_config = STRICT
    include_usage: bool = False


class GenerationFields(StructuredFields):
    """Fields shared by /v1/completions and /v1/chat/completions (`response_format`, `structured_outputs`:
    serve/structured.py)."""

    model_config = STRICT

    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: FiniteFloat | None = Field(None, ge=0, le=2)
    top_p: FiniteFloat | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=0)
    seed: int | None = Field(None, ge=-(2**63), lt=2**63 - MAX_N)  # n choices use seed, seed + 1, ...
    stop: Any = Field(None, json_schema_extra={"anyOf": [  # checked below, for a clear message
        {"type": "string", "minLength": 1}, {"type": "array", "items": {"type": "string", "minLength": 1},
                                             "maxItems": MAX_STOPS}, {"type": "null"}]})
    n: int = Field(1, ge=1, le=MAX_N)
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    # Logit processors (trimode.decode.decide), in every mode: OpenAI's penalties and logit_bias (token id ->
    # bias; ids outside the vocabulary are rejected by the engine), vLLM's repetition_penalty and min_tokens.
    frequency_penalty: FiniteFloat = Field(0.0, ge=-2, le=2)
    presence_penalty: FiniteFloat = Field(0.0, ge=-2, le=2)
    logit_bias: dict[str, FiniteFloat] | None = None
    repetition_penalty: FiniteFloat = Field(1.0, gt=0)
    min_tokens: int = Field(0, ge=0)
    # trimode's extra fields.
    mode: RequestMode | None = None
    route: str | None = None
    risk: Risk | None = None  # for routes whose review depends on it (or the X-Trimode-Risk header)
    block_length: int | None = Field(None, ge=1)
    threshold: FiniteFloat | None = Field(None, ge=0, le=1)
    causal_context: bool | None = None
    steps: int | None = Field(None, ge=1)
    use_drafter: bool | None = None
    ar_mix_weight: FiniteFloat | None = Field(None, ge=0, le=1)
    remask_threshold: FiniteFloat | None = Field(None, ge=0, le=1)
    unmask: Literal["threshold", "steps", "learned"] | None = None  # diffusion / linear_spec draft policy
    hole_window: int | None = Field(None, ge=0, le=4096)  # `suffix`: the hole's first window (see the edit mode)
    max_thinking_tokens: int | None = Field(None, ge=0)
    end_think_token_id: int | None = Field(None, ge=0)
    provisional: bool = False
    # vLLM's: the logprob of every prompt token as a continuation, with this many alternatives per position.
    prompt_logprobs: int | None = Field(None, ge=0, le=20)
    # vLLM's: generate exactly the budget (max_tokens); an end-of-sequence token does not end it.
    ignore_eos: bool = False

    @field_validator("stop")
    @classmethod
    def _stops(cls, v):
        if v is None:
            return None
        stops = [v] if isinstance(v, str) else v
        if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
            raise ValueError("stop must be a string or a list of strings")
        if len(stops) > MAX_STOPS:
            raise ValueError(f"at most {MAX_STOPS} stop sequences")
        if any(not s for s in stops):
            raise ValueError("stop sequences must be non-empty")
        return stops

    @field_validator("logit_bias")
    @classmethod
    def _bias(cls, v):
        if v is None:
            return None
        out = {}
        for key, bias in v.items():
            if not key.isdigit() or len(key) > 12:
                raise ValueError(f"logit_bias keys must be token ids, got {key[:20]!r}")
            if not -100 <= bias <= 100:
                raise ValueError(f"logit_bias values must be in [-100, 100], got {bias} for token {key}")
            out[key] = bias
        return out

    @property
    def processors(self) -> dict:
        """The logit processor settings as `EngineRequest` takes them."""
        bias = {int(k): float(b) for k, b in self.logit_bias.items()} if self.logit_bias else None
        return {"repetition_penalty": self.repetition_penalty, "frequency_penalty": self.frequency_penalty,
                "presence_penalty": self.presence_penalty, "logit_bias": bias, "min_tokens": self.min_tokens}

    @model_validator(mode="after")
    def _unsupported(self):
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise ValueError(f"min_tokens ({self.min_tokens}) exceeds max_tokens ({self.max_tokens})")
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options needs stream=true")
        if self.provisional and not self.stream:
            raise ValueError("provisional events need stream=true")
        return self

    @property
    def stop_list(self) -> list[str] | None:
        return self.stop  # normalised to a list by the validator

    @property
    def knobs(self) -> dict:
        """The mode knobs the request sets (the registry's names; each is a field above)."""
        return {k: getattr(self, k) for k in KNOB_NAMES if getattr(self, k, None) is not None}

    @property
    def thinking(self) -> dict:
        return {k: getattr(self, k) for k in ("max_thinking_tokens", "end_think_token_id")
                if getattr(self, k) is not None}


def _is_ids(x) -> bool:
    return isinstance(x, list) and bool(x) and all(isinstance(t, int) and not isinstance(t, bool) for t in x)


class CompletionRequest(GenerationFields):
    # A string, a token-id list, or a list of those; normalised to a list of prompts below.
    prompt: Any = Field(json_schema_extra={"anyOf": [_TEXT, _IDS, {"type": "array", "minItems": 1,
                                                                   "items": {"anyOf": [_TEXT, _IDS]}}]})
    max_tokens: int | None = Field(None, ge=0)  # 0: no generation (with echo / prompt_logprobs: scoring)
    logprobs: int | None = Field(None, ge=0, le=20)
    echo: bool = False
    suffix: str | None = None  # fill in the middle: the text after the hole (max_tokens is the hole's budget)
    best_of: int | None = None

    @field_validator("prompt")
    @classmethod
    def _prompts(cls, p):
        if isinstance(p, str) or _is_ids(p):
            return [p]
        if isinstance(p, list) and p and all(isinstance(x, str) or _is_ids(x) for x in p):
            return p
        raise ValueError("prompt must be a string, a list of token ids, or a non-empty list of those")

    @model_validator(mode="after")
    def _completion(self):
        if self.best_of is not None and self.best_of != self.n:
            raise ValueError("best_of other than n is not supported")
        return self

    @property
    def prompts(self) -> list[str | list[int]]:
        """The prompt(s) as a list: one text or token-id list per entry."""
        return self.prompt


class TextPart(BaseModel):
    model_config = STRICT
    type: Literal["text"]
    text: str


class ToolCallFunction(BaseModel):
    model_config = STRICT
    name: str
    arguments: str  # a JSON object as text, as OpenAI sends it


class ToolCall(BaseModel):
    model_config = STRICT
    id: str
    type: Literal["function"] = "function"
    function: ToolCallFunction


class ChatMessage(BaseModel):
    model_config = STRICT
    # `developer` is OpenAI's newer name for `system` and is rendered as one; `tool` answers a tool call.
    role: str = Field(json_schema_extra={"enum": list(ROLES)})
    content: Any = Field(None, json_schema_extra={"anyOf": [  # a string, or a list of text parts
        {"type": "string"}, {"type": "array", "items": _TEXT_PART}, {"type": "null"}]})
    name: str | None = None
    tool_calls: list[ToolCall] | None = None  # an assistant message's calls
    tool_call_id: str | None = None  # a tool message: the call it answers

    @field_validator("role")
    @classmethod
    def _role(cls, v):
        if v not in ROLES:
            raise ValueError(f"role {v!r} is not supported; use one of {', '.join(ROLES)}")
        return v

    @model_validator(mode="after")
    def _tool_fields(self):
        if self.tool_calls is not None and self.role != "assistant":
            raise ValueError("tool_calls belong to assistant messages")
        return self

    @field_validator("content")
    @classmethod
    def _content(cls, v):
        if v is None or isinstance(v, str):
            return v
        if isinstance(v, list):
            return [TextPart.model_validate(part) for part in v]
        raise ValueError("content must be a string or a list of text parts")

    def as_template_input(self) -> dict:
        content = self.content
        if isinstance(content, list):
            content = "".join(part.text for part in content)
        message = {"role": "system" if self.role == "developer" else self.role, "content": content or ""}
        if self.name is not None:
            message["name"] = self.name
        if self.tool_calls:
            message["tool_calls"] = [c.model_dump() for c in self.tool_calls]
        if self.tool_call_id is not None:
            message["tool_call_id"] = self.tool_call_id
        return message


class ChatCompletionRequest(GenerationFields, ToolFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)

    @model_validator(mode="after")
    def _chat(self):
        if self.max_tokens is not None and self.max_completion_tokens is not None:
            raise ValueError("give max_tokens or max_completion_tokens, not both")
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs=true")
        return self

    @property
    def token_budget(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


class EditRequest(BaseModel):
    """POST /v1/edits: revise a draft or fill a template (fill in the middle is `suffix` on /v1/completions).

    kind "revise": `draft` written after the context (`prompt`, or `messages` rendered with the chat template as
    the assistant's turn); `spans` ([start, end] character ranges of the draft) to rewrite, or none to let the
    model find what to rewrite (`rounds`, `revise_threshold`). kind "fill": `template` with `[[hole]]` /
    `[[hole:N]]` placeholders (`hole_tokens` for a hole without N; `hole_window`: a hole starts that many slots
    long and doubles while the model fills it to the end)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    model: str
    kind: Literal["revise", "fill"]
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    draft: str | None = None
    spans: list[list[int]] | None = None
    template: str | None = None
    hole_tokens: int = Field(8, ge=1, le=4096)
    threshold: FiniteFloat | None = Field(None, ge=0, le=1)
    rounds: int | None = Field(None, ge=1, le=64)
    revise_threshold: FiniteFloat | None = Field(None, ge=0, le=1)
    hole_window: int | None = Field(None, ge=0, le=4096)
    temperature: FiniteFloat | None = Field(None, ge=0, le=2)
    top_p: FiniteFloat | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=0)
    seed: int | None = Field(None, ge=-(2**63), lt=2**63)
    stream: bool = False
    provisional: bool = False
    user: str | None = None
    route: str | None = None  # the route's review and audit apply; its mode and knobs do not (an edit is an edit)
    risk: Risk | None = None

    @model_validator(mode="after")
    def _fields(self):
        if self.kind == "revise":
            if self.draft is None:
                raise ValueError("a revision needs a draft")
            if self.template is not None:
                raise ValueError("template belongs to kind fill")
            if self.prompt is not None and self.messages is not None:
                raise ValueError("give prompt or messages as the draft's context, not both")
            if self.spans is not None and any(len(s) != 2 for s in self.spans):
                raise ValueError("spans are [start, end] character ranges")
        else:
            if self.template is None:
                raise ValueError("kind fill needs a template")
            if self.draft is not None or self.spans is not None or self.messages is not None:
                raise ValueError("draft, spans and messages belong to kind revise")
        if self.provisional and not self.stream:
            raise ValueError("provisional events need stream=true")
        return self

    @property
    def knobs(self) -> dict:
        names = ("threshold", "rounds", "revise_threshold", "hole_window")
        return {k: getattr(self, k) for k in names if getattr(self, k) is not None}


class TokenizeRequest(BaseModel):
    """vLLM's POST /tokenize: a `prompt` (special-token text such as "</s>" read as those tokens, as vLLM does)
    or chat `messages` rendered with the template (their contents stay text)."""

    model_config = STRICT
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = Field(None, min_length=1)
    add_special_tokens: bool = True
    add_generation_prompt: bool = True
    return_token_strs: bool = False

    @model_validator(mode="after")
    def _one(self):
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give prompt or messages (one of them)")
        return self


class DetokenizeRequest(BaseModel):
    """vLLM's POST /detokenize: token ids -> text."""

    model_config = STRICT
    model: str | None = None
    tokens: list[int]


class ResponsesStreamOptions(BaseModel):
    model_config = STRICT
    include_obfuscation: bool | None = None  # padding of stream events against length side channels: none here


class ResponsesRequest(GenerationFields):
    """POST /v1/responses (OpenAI's Responses API) over the chat path: `instructions` and `input` (a string, or
    message items whose content is a string or input_text / output_text parts, `function_call` items and
    `function_call_output` items) become the conversation; `max_output_tokens` its budget. `text.format`
    (json_object, json_schema) and function `tools` / `tool_choice` run the chat path's structured output
    (serve/structured.py). trimode's extra fields apply as on the other routes. What would change the answer's
    meaning and is not served (stored conversations, reasoning settings) is a 400 naming the field; settings
    without effect here (store=false, metadata, user) are accepted."""

    input: Any = Field(json_schema_extra={"anyOf": [{"type": "string"}, {"type": "array", "items": {
        "type": "object"}}]})
    instructions: str | None = None
    max_output_tokens: int | None = Field(None, ge=1)
    stream_options: ResponsesStreamOptions | None = None  # type: ignore[assignment]
    metadata: dict[str, str] | None = None
    store: bool | None = None
    include: list[str] | None = None
    tools: list[ResponsesTool] | None = Field(None, max_length=MAX_TOOLS)
    tool_choice: Any = Field(None, json_schema_extra={"anyOf": [
        {"enum": ["none", "auto", "required"]}, {"type": "object"}]})
    parallel_tool_calls: bool | None = None
    max_tool_calls: int | None = None
    text: dict | None = None
    truncation: Literal["auto", "disabled"] | None = None
    reasoning: dict | None = None
    previous_response_id: str | None = None
    conversation: Any = None
    prompt: Any = None
    background: bool | None = None
    top_logprobs: int | None = None
    safety_identifier: str | None = None
    prompt_cache_key: str | None = None
    prompt_cache_retention: str | None = None
    service_tier: str | None = None

    @model_validator(mode="after")
    def _served(self):
        refused = {
            "max_tokens": (self.max_tokens is not None, "the Responses API's budget is max_output_tokens"),
            "n": (self.n != 1, "a response has one output"),
            "store": (self.store is True, "responses are not stored here (send store=false or leave it out)"),
            "previous_response_id": (self.previous_response_id is not None, "responses are not stored here: send "
                                     "the whole conversation as input"),
            "conversation": (self.conversation is not None, "conversations are not stored here"),
            "prompt": (self.prompt is not None, "stored prompt templates are not supported"),
            "background": (bool(self.background), "background responses are not supported"),
            "max_tool_calls": (self.max_tool_calls is not None and not 1 <= self.max_tool_calls <= MAX_CALLS,
                               f"the most function calls in the response: between 1 and {MAX_CALLS} (leave it out "
                               "for any number)"),
            "include": (bool(self.include), "no extra output data (such as logprobs) is served on this route yet"),
            "top_logprobs": (self.top_logprobs not in (None, 0), "logprobs are not served on this route yet"),
            "prompt_logprobs": (self.prompt_logprobs is not None, "prompt scores are served by /v1/completions"),
            "text": (set(self.text or {}) - {"format", "verbosity"} or (self.text or {}).get("verbosity")
                     is not None, "text takes format (text, json_object or json_schema); verbosity is not served"),
            "truncation": (self.truncation == "auto", "the input is never truncated here (use disabled)"),
            "reasoning": (any(v is not None for v in (self.reasoning or {}).values()),
                          "this model has no reasoning settings"),
        }
        for name, (bad, why) in refused.items():
            if bad:
                raise APIError(400, f"{name}: {why}", param=name, code="unsupported_parameter")
        fmt = (self.text or {}).get("format")
        if fmt is not None:
            try:
                chat_format = ResponsesFormat.model_validate(fmt).response_format()
            except (ValueError, ValidationError) as e:
                raise APIError(400, f"text.format: {_first_error(e)}", param="text", code="invalid_value") from None
            if chat_format.type != "text":
                if self.response_format is not None:
                    raise APIError(400, "give text.format or response_format, not both", param="text")
                self.response_format = chat_format
        return self

    @field_validator("tool_choice")
    @classmethod
    def _tool_choice(cls, v):
        return responses_tool_choice(v)

    @field_validator("input")
    @classmethod
    def _input(cls, v):
        if isinstance(v, str):
            return [ChatMessage(role="user", content=v)]
        if not isinstance(v, list) or not v:
            raise ValueError("input must be a string or a non-empty list of message items")
        messages: list[ChatMessage] = []
        for i, item in enumerate(v):
            kind = item.get("type", "message") if isinstance(item, dict) else None
            if kind == "function_call":  # joins the assistant message before it, as chat's tool_calls
                call = _input_call(item, i)
                last = messages[-1] if messages else None
                if last is not None and last.role == "assistant":
                    messages[-1] = last.model_copy(update={"tool_calls": [*(last.tool_calls or []), call]})
                else:
                    messages.append(ChatMessage(role="assistant", content=None, tool_calls=[call]))
            elif kind == "function_call_output":
                messages.append(_input_output(item, i))
            else:
                messages.append(_input_message(item, i))
        return messages

    @property
    def messages(self) -> list[ChatMessage]:
        system = [ChatMessage(role="system", content=self.instructions)] if self.instructions else []
        return system + self.input

    # What the chat path reads of a chat request.
    @property
    def max_completion_tokens(self) -> None:
        return None

    @property
    def logprobs(self) -> bool:
        return False

    @property
    def token_budget(self) -> int | None:
        return self.max_output_tokens


def _first_error(e: Exception) -> str:
    if isinstance(e, ValidationError):
        err = e.errors()[0]
        return f"{'.'.join(map(str, err['loc'])) or 'value'}: {err['msg']}"
    return str(e)


def _input_fields(item: dict, i: int, required: tuple[str, ...], optional: tuple[str, ...]) -> None:
    for name in required:
        if not isinstance(item.get(name), str):
            raise ValueError(f"input[{i}].{name} must be a string")
    extra = set(item) - {"type", *required, *optional}
    if extra:
        raise ValueError(f"input[{i}]: unknown field {sorted(extra)[0]!r}")


def _input_call(item: dict, i: int) -> ToolCall:
    """A `function_call` item (a call the model made in an earlier turn) as a chat tool call."""
    _input_fields(item, i, ("call_id", "name", "arguments"), ("id", "status"))
    return ToolCall(id=item["call_id"], function=ToolCallFunction(name=item["name"], arguments=item["arguments"]))


def _input_output(item: dict, i: int) -> ChatMessage:
    """A `function_call_output` item (what a call returned) as a chat `tool` message."""
    output = item.get("output")
    if isinstance(output, list):  # output parts: their texts
        output = "".join(p.get("text", "") for p in output if isinstance(p, dict))
    _input_fields({**item, "output": output}, i, ("call_id", "output"), ("id", "status"))
    return ChatMessage(role="tool", tool_call_id=item["call_id"], content=output)


def _input_message(item, i: int) -> ChatMessage:
    """One input item (a message) as a chat message; other item kinds are named in a 400."""
    if not isinstance(item, dict):
        raise ValueError(f"input[{i}] must be a message item (an object)")
    kind = item.get("type", "message")
    if kind != "message":
        raise ValueError(f"input[{i}]: items of type {kind!r} are not supported (message, function_call, "
                         "function_call_output)")
    extra = set(item) - {"type", "role", "content", "id", "status", "phase"}
    if extra:
        raise ValueError(f"input[{i}]: unknown field {sorted(extra)[0]!r}")
    content = item.get("content")
    if isinstance(content, list):
        texts = []
        for j, part in enumerate(content):
            kind = part.get("type") if isinstance(part, dict) else None
            if kind not in ("input_text", "output_text") or not isinstance(part.get("text"), str):
                raise ValueError(f"input[{i}].content[{j}]: only input_text and output_text parts are supported "
                                 f"(got {kind!r})")
            texts.append(part["text"])
        content = "".join(texts)
    if not isinstance(content, str):
        raise ValueError(f"input[{i}].content must be a string or a list of text parts")
    return ChatMessage(role=item.get("role"), content=content)
