"""Tool calling as text: the call format a model writes, the grammar that holds it to it, and the parser that
turns what it wrote into OpenAI `tool_calls`.

The format (Hermes / Qwen style, plain text: no special token, so no change to the vocabulary):

    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call>

one block per call, blocks separated by a newline. The bundled model's chat template renders a request's `tools`
in the system part (a `# Tools` block listing each function as JSON between `<tools>` and `</tools>`), an
assistant message's `tool_calls` in this format, and a `role: "tool"` message as a user turn holding
`<tool_response>...</tool_response>`. A checkpoint whose chat template knows nothing of tools (it never mentions
`tools`) gets the same text through `default_tool_messages`, which folds it into plain system / user /
assistant contents before the template runs.

`tool_grammar` builds the llguidance grammar for a `tool_choice`: "required" and a named function write calls
only (each call's arguments follow that function's JSON schema); "auto" writes text without `<tool_call>` in it,
calls, or text followed by calls (constrained from the first `<tool_call>` on); "none" is unconstrained.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass

from trimode.decode.grammar import JSON_FORMAT, Constraint

OPEN, CLOSE = "<tool_call>\n", "\n</tool_call>"
_CALL = re.compile(r"<tool_call>\s*(\{.*?\})\s*</tool_call>", re.DOTALL)
TOOLS_PREAMBLE = ("# Tools\n\nYou may call one or more functions to assist with the user query. The functions "
                  "are listed as JSON between <tools> and </tools>. For each call, write a JSON object with the "
                  "function's name and arguments between <tool_call> and </tool_call>:\n<tool_call>\n"
                  "{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call>\n")


@dataclass(frozen=True)
class Function:
    name: str
    parameters: dict
    description: str = ""
    strict: bool = False

    def as_tool(self) -> dict:
        fn = {"name": self.name, "description": self.description, "parameters": self.parameters}
        return {"type": "function", "function": fn}


def tools_block(functions: list[Function]) -> str:
    """What the system part says of the tools."""
    listed = "\n".join(json.dumps(f.as_tool(), ensure_ascii=False) for f in functions)
    return f"{TOOLS_PREAMBLE}<tools>\n{listed}\n</tools>"


def call_text(name: str, arguments: dict | str) -> str:
    """One call as the model writes it."""
    args = _args(arguments)
    return OPEN + json.dumps({"name": name, "arguments": args}, ensure_ascii=False) + CLOSE


def calls_text(tool_calls: list[dict]) -> str:
    """An assistant message's OpenAI `tool_calls` as the model writes them."""
    return "\n".join(call_text(c["function"]["name"], c["function"].get("arguments") or "{}") for c in tool_calls)


def response_text(content: str) -> str:
    return f"<tool_response>\n{content}\n</tool_response>"


def default_tool_messages(messages: list[dict], functions: list[Function]) -> list[dict]:
    """`messages` (OpenAI shape: tool_calls on assistant messages, role "tool") as plain system / user /
    assistant messages carrying the tool format in their contents, for a template without tool support."""
    out: list[dict] = []
    for m in messages:
        if m["role"] == "tool":
            out.append({"role": "user", "content": response_text(m.get("content") or "")})
        elif m["role"] == "assistant" and m.get("tool_calls"):
            text = m.get("content") or ""
            out.append({"role": "assistant", "content": text + calls_text(m["tool_calls"])})
        else:
            out.append({k: v for k, v in m.items() if k not in ("tool_calls", "tool_call_id")})
    if functions:
        if out and out[0]["role"] == "system":
            out[0] = {**out[0], "content": out[0]["content"] + "\n\n" + tools_block(functions)}
        else:
            out.insert(0, {"role": "system", "content": tools_block(functions)})
    return out


def chat_inputs(tokenizer, messages: list[dict], functions: list[Function]) -> tuple[list[dict], list[dict] | None]:
    """The messages and `tools` to render with `tokenizer`'s chat template: as they are (arguments given as JSON
    text parsed, so the template writes them with `tojson`) for a template that knows tools, else folded into
    plain contents by `default_tool_messages`."""
    if not tokenizer.knows_tools:
        return default_tool_messages(messages, functions), None
    out = []
    for m in messages:
        if m.get("tool_calls"):
            calls = [{**c, "function": {**c["function"], "arguments": _args(c["function"].get("arguments"))}}
                     for c in m["tool_calls"]]
            m = {**m, "tool_calls": calls}
        out.append(m)
    return out, [f.as_tool() for f in functions] or None


def _args(arguments) -> dict:
    if isinstance(arguments, dict):
        return arguments
    try:
        value = json.loads(arguments or "{}")
    except ValueError:
        raise ValueError("a tool call's arguments must be a JSON object (as text)") from None
    if not isinstance(value, dict):
        raise ValueError("a tool call's arguments must be a JSON object (as text)")
    return value


def _call_schema(f: Function) -> dict:
    params = f.parameters or {"type": "object"}
    return {"type": "object", "properties": {"name": {"const": f.name}, "arguments": params},
            "required": ["name", "arguments"], "additionalProperties": False}


MAX_CALLS = 128  # the largest bound on calls a request may set (the grammar nests one optional call per call)


def tool_grammar(functions: list[Function], choice: str, parallel: bool = True,
                 open_token: int | None = None, max_calls: int | None = None) -> Constraint | None:
    """The constraint of a `tool_choice`: "none" (None: free text), "auto", "required", or a function's name.
    `parallel` false or `max_calls` 1: one call; `max_calls` N: at most N calls (None: any number).
    `open_token`: the id of a vocabulary token that is `<tool_call>` whole (Qwen-style vocabularies add one),
    which opens a call as well as the text does (llguidance reads such a token as special, never as text, so
    without this a model could not write its own call token)."""
    if choice == "none" or not functions:
        return None
    chosen = functions if choice in ("auto", "required") else [f for f in functions if f.name == choice]
    if not chosen:
        raise ValueError(f"tool_choice names {choice!r}, which is not among the tools")
    schemas = [_call_schema(f) for f in chosen]
    schema = schemas[0] if len(schemas) == 1 else {"anyOf": schemas}
    schema = {**schema, "x-guidance": JSON_FORMAT}
    if max_calls is not None and not 1 <= max_calls <= MAX_CALLS:
        raise ValueError(f"max_tool_calls must be between 1 and {MAX_CALLS}, got {max_calls}")
    many = parallel and choice in ("auto", "required") and max_calls != 1
    by_token = "" if open_token is None else f' | <[{int(open_token)}]> "\\n"'
    more = 'more: ""'
    if many and max_calls is None:
        more = 'more: ("\\n" open call)*'
    elif many:  # up to max_calls - 1 more calls: each optional call may be followed by the next
        more = "more: " + "".join('("\\n" open call ' for _ in range(max_calls - 1)) + ")?" * (max_calls - 1)
    lines = [f"open: {json.dumps(OPEN)}{by_token}", f"call: %json {json.dumps(schema)} {json.dumps(CLOSE)}", more]
    if choice == "auto":
        # Free text that never holds `<tool_call>`, or text (maybe none) up to the first `<tool_call>\n` and
        # calls from there: `head` is lazy, so it ends at the first `<tool_call>\n` and the call grammar takes
        # over (a greedy text terminal could not end where a call begins). A `<tool_call>` token is no text, so
        # text before it ends where it comes.
        start = "start: TEXT | head call more" + ("" if open_token is None else
                                                  f' | TEXT? <[{int(open_token)}]> "\\n" call more')
        lines[:0] = [start, "head[lazy]: /(.|\\n)*<tool_call>\\n/",
                     "TEXT: /(.|\\n)+/ & ~/(.|\\n)*<tool_call>(.|\\n)*/"]
    else:
        lines.insert(0, "start: open call more")
    return Constraint.grammar("\n".join(lines))


def parse_tool_calls(text: str) -> tuple[str | None, list[dict]]:
    """(the content outside the calls, or None when there is none; the calls in OpenAI's shape). A block whose
    JSON does not parse, or lacks a name, stays text."""
    calls, kept, last = [], [], 0
    for m in _CALL.finditer(text):
        try:
            obj = json.loads(m.group(1))
        except ValueError:
            continue
        if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
            continue
        args = obj.get("arguments", {})
        kept.append(text[last : m.start()])
        last = m.end()
        calls.append({"id": "call_" + uuid.uuid4().hex[:24], "type": "function",
                      "function": {"name": obj["name"], "arguments": json.dumps(args, ensure_ascii=False)}})
    kept.append(text[last:])
    content = "".join(kept).strip()
    return (content or None) if calls else text, calls


class ToolCallStream:
    """Streams one choice's text as OpenAI chat deltas: text outside calls as `content` as soon as it cannot be
    the start of a call, each call as a `tool_calls` delta (id, name) followed by one with its arguments, once
    its closing tag is written."""

    def __init__(self) -> None:
        self.pending = ""
        self.count = 0

    def feed(self, text: str) -> list[dict]:
        self.pending += text
        deltas: list[dict] = []
        while True:
            start = self.pending.find("<tool_call>")
            if start < 0:
                keep = _partial_open(self.pending)
                if len(self.pending) > keep:
                    deltas.append({"content": self.pending[: len(self.pending) - keep]})
                    self.pending = self.pending[len(self.pending) - keep:]
                return deltas
            if start > 0:
                deltas.append({"content": self.pending[:start]})
                self.pending = self.pending[start:]
            m = _CALL.match(self.pending)
            if m is None:
                return deltas  # a call being written: wait for its end
            self.pending = self.pending[m.end():].lstrip("\n")
            deltas += self._call(m.group(0))

    def _call(self, block: str) -> list[dict]:
        _, calls = parse_tool_calls(block)
        if not calls:
            return [{"content": block}]
        call = calls[0]
        k, self.count = self.count, self.count + 1
        head = {"index": k, "id": call["id"], "type": "function",
                "function": {"name": call["function"]["name"], "arguments": ""}}
        return [{"tool_calls": [head]},
                {"tool_calls": [{"index": k, "function": {"arguments": call["function"]["arguments"]}}]}]

    def close(self) -> list[dict]:
        """What is left at the end (an unfinished call stays text)."""
        rest, self.pending = self.pending, ""
        return [{"content": rest}] if rest.strip() else []


def _partial_open(text: str) -> int:
    """How many characters at the end of `text` could begin `<tool_call>`."""
    for n in range(min(len(text), len("<tool_call>") - 1), 0, -1):
        if "<tool_call>".startswith(text[-n:]):
            return n
    return 0
