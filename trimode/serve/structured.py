"""Structured output and tool calling on the HTTP API: the request fields, what they compile to, and how the
answer shows them.

Request fields (chat and completions unless said):
- `response_format` (OpenAI): `{"type": "text"}`, `{"type": "json_object"}`, or `{"type": "json_schema",
  "json_schema": {"name", "schema", "strict", "description"}}`. The answer's `message.content` is the JSON text
  and `message.refusal` is null. A schema is always enforced (`strict` false too). When the token budget ends
  first, the JSON is cut and `finish_reason` is "length".
- `structured_outputs` (vLLM's extra field): exactly one of `json` (a schema), `json_object: true`, `regex`,
  `choice` (a list of strings), `grammar` (llguidance's Lark syntax: https://github.com/guidance-ai/llguidance,
  e.g. `start: "yes" | "no"`; `%json {...}` embeds a JSON schema).
- chat only: `tools` (`[{"type": "function", "function": {"name", "description", "parameters", "strict"}}]`),
  `tool_choice` ("none", "auto" (the default with tools), "required", or `{"type": "function", "function":
  {"name": ...}}`), `parallel_tool_calls` (default true; false: at most one call). "required" and a named
  function are always written under the call grammar; "auto" lets the model write text, calls, or text then
  calls, a call under the grammar from its `<tool_call>` on. The answer's `message.tool_calls` holds the calls
  (`content` the text outside them, or null) and `finish_reason` is "tool_calls". Messages may carry
  `tool_calls` (assistant) and `role: "tool"` (with `tool_call_id`).
A schema or grammar outside what the engine supports (a dangling `$ref`, a schema too large or too deep, a bad
regex) is a 400 naming the field. Structured output runs in every generation mode (not in edits).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from trimode.decode.grammar import Constraint, compile_constraint, constraint_of
from trimode.request.tools import Function, ToolCallStream, parse_tool_calls, tool_grammar

STRICT = ConfigDict(extra="forbid", strict=True, populate_by_name=True)
MAX_TOOLS = 128


class JSONSchemaFormat(BaseModel):
    model_config = STRICT
    name: str = Field(min_length=1, max_length=64)
    schema_: dict = Field(default_factory=dict, alias="schema")
    strict: bool | None = None
    description: str | None = None


class ResponseFormat(BaseModel):
    model_config = STRICT
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JSONSchemaFormat | None = None


class StructuredOutputs(BaseModel):
    model_config = STRICT
    json_: Any = Field(None, alias="json", json_schema_extra={"anyOf": [{"type": "object"}, {"type": "string"}]})
    json_object: bool | None = None
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None


class FunctionDef(BaseModel):
    model_config = STRICT
    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.\-]+$")
    description: str | None = None
    parameters: dict | None = None
    strict: bool | None = None


class Tool(BaseModel):
    model_config = STRICT
    type: Literal["function"]
    function: FunctionDef


class NamedToolChoice(BaseModel):
    model_config = STRICT

    class Name(BaseModel):
        model_config = STRICT
        name: str

    type: Literal["function"]
    function: Name


class ResponsesTool(BaseModel):
    """A function tool in the Responses API's flat shape (`{"type": "function", "name", "parameters", ...}`)."""

    model_config = STRICT
    type: Literal["function"]
    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.\-]+$")
    description: str | None = None
    parameters: dict | None = None
    strict: bool | None = None

    @property
    def function(self) -> FunctionDef:  # the chat shape's part, which `functions_of` reads
        return FunctionDef(name=self.name, description=self.description, parameters=self.parameters,
                           strict=self.strict)


class ResponsesFormat(BaseModel):
    """The Responses API's `text.format`: text, json_object, or a flat json_schema (`name`, `schema`, `strict`)."""

    model_config = STRICT
    type: Literal["text", "json_object", "json_schema"]
    name: str | None = Field(None, min_length=1, max_length=64)
    schema_: dict | None = Field(None, alias="schema")
    strict: bool | None = None
    description: str | None = None

    def response_format(self) -> ResponseFormat:
        """The chat shape of this format (ValueError when a json_schema lacks its name or schema)."""
        if self.type != "json_schema":
            return ResponseFormat(type=self.type)
        if self.name is None or self.schema_ is None:
            raise ValueError("text.format of type json_schema needs name and schema")
        return ResponseFormat(type="json_schema", json_schema=JSONSchemaFormat(
            name=self.name, schema=self.schema_, strict=self.strict, description=self.description))


def responses_tool_choice(v):
    """The Responses API's `tool_choice` as the chat path reads it: "none", "auto", "required" or a name."""
    if v is None or v in ("none", "auto", "required"):
        return v
    if isinstance(v, dict) and v.get("type") == "function" and set(v) == {"type", "name"} \
            and isinstance(v["name"], str):
        return v["name"]
    raise ValueError('tool_choice must be "none", "auto", "required" or {"type": "function", "name": ...}')


class StructuredFields(BaseModel):
    """The fields a generation request adds (mixed into the request models)."""

    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputs | None = None


class ToolFields(BaseModel):
    tools: list[Tool] | None = Field(None, max_length=MAX_TOOLS)
    tool_choice: Any = Field(None, json_schema_extra={"anyOf": [
        {"enum": ["none", "auto", "required"]}, {"type": "object"}]})
    parallel_tool_calls: bool | None = None

    @field_validator("tool_choice")
    @classmethod
    def _tool_choice(cls, v):
        if v is None or v in ("none", "auto", "required"):
            return v
        if isinstance(v, dict):
            return NamedToolChoice.model_validate(v).function.name
        raise ValueError('tool_choice must be "none", "auto", "required" or {"type": "function", "function": '
                         '{"name": ...}}')


def functions_of(body) -> list[Function]:
    tools = getattr(body, "tools", None) or []
    return [Function(t.function.name, t.function.parameters or {"type": "object"}, t.function.description or "",
                     bool(t.function.strict)) for t in tools]


def requested_constraint(body, open_token: int | None = None) -> tuple[Constraint | None, str | None, str]:
    """(the constraint the body asks for, the tool choice that applies or None, the field that asked) or a
    ValueError naming the field. `open_token`: the vocabulary's `<tool_call>` token, if it has one."""
    fmt, so = body.response_format, body.structured_outputs
    functions = functions_of(body)
    choice = getattr(body, "tool_choice", None)
    if choice is not None and not functions and choice != "none":
        raise _named("tool_choice", "tool_choice needs tools")
    given = [name for name, v in (("response_format", fmt if fmt and fmt.type != "text" else None),
                                  ("structured_outputs", so), ("tools", functions or None)) if v is not None]
    if len(given) > 1:
        raise _named(given[1], f"give one of response_format, structured_outputs and tools, not {' and '.join(given)}")
    try:
        if fmt is not None and fmt.type == "json_object":
            return Constraint.json_object(), None, "response_format"
        if fmt is not None and fmt.type == "json_schema":
            if fmt.json_schema is None:
                raise ValueError("response_format of type json_schema needs json_schema")
            return Constraint.json_schema(fmt.json_schema.schema_), None, "response_format"
        if so is not None:
            c = constraint_of(json_schema=so.json_, json_object=bool(so.json_object), regex=so.regex,
                              choice=so.choice, grammar=so.grammar)
            if c is None:
                raise ValueError("structured_outputs needs one of json, json_object, regex, choice, grammar")
            return c, None, "structured_outputs"
        if functions:
            names = [f.name for f in functions]
            if len(set(names)) != len(names):
                raise ValueError("tools: function names must be unique")
            choice = choice or "auto"
            parallel = body.parallel_tool_calls is not False
            max_calls = getattr(body, "max_tool_calls", None)  # /v1/responses: at most this many calls
            return tool_grammar(functions, choice, parallel, open_token, max_calls), choice, "tools"
    except ValueError as e:
        raise _named(given[0] if given else "tool_choice", str(e)) from None
    return None, None, ""


def compile_for(tm, constraint: Constraint, field: str, eos_ids) -> None:
    """Compile now (the planner runs off the event loop; the engine then finds it cached): ValueError naming
    `field` when the engine cannot hold it."""
    try:
        compile_constraint(tm.tokenizer, tm.config.vocab_size, eos_ids, constraint)
    except ValueError as e:
        raise _named(field, f"{field}: {e}") from None


class FieldError(ValueError):
    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


def _named(field: str, message: str) -> FieldError:
    return FieldError(field, message)


def chat_message(text: str, finish: str, tools: bool, structured: bool) -> tuple[dict, str]:
    """The assistant message of a chat answer and its finish reason (tool calls parsed when tools were given)."""
    message: dict = {"role": "assistant", "content": text}
    if structured or tools:
        message["refusal"] = None
    if tools:
        content, calls = parse_tool_calls(text)
        if calls:
            message["content"], message["tool_calls"] = content, calls
            if finish == "stop":
                finish = "tool_calls"
    return message, finish


class ChoiceDeltas:
    """One streamed chat choice's deltas: content as it comes, or (with tools) content and `tool_calls` deltas."""

    def __init__(self, tools: bool) -> None:
        self.calls = ToolCallStream() if tools else None

    def feed(self, text: str) -> list[dict]:
        if self.calls is None:
            return [{"content": text}] if text else []
        return self.calls.feed(text)

    def close(self) -> list[dict]:
        return [] if self.calls is None else self.calls.close()

    def finish(self, finish: str) -> str:
        return "tool_calls" if self.calls is not None and self.calls.count and finish == "stop" else finish
