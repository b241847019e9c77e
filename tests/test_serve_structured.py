"""Structured output and tool calling over HTTP with real clients: a real uvicorn server on the bundled model,
the `openai` client (and LangChain when installed)."""

from __future__ import annotations

import asyncio
import json
from typing import Annotated, Literal

import httpx
import jsonschema
import openai
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel, Field

import trimode
from tests.test_serve_api import ServerThread, build_checkpoint
from trimode.engine import Engine
from trimode.engine.auto import CostModel
from trimode.serve.app import ServerConfig, create_app

MODEL = "trimode-default"
MODES = [("ar", {}), ("linear_spec", {"block_length": 4}), ("quadratic_spec", {"block_length": 4}),
         ("diffusion", {"block_length": 8}), ("auto", {"block_length": 4})]
SCHEMA = {"type": "object", "properties": {"answer": {"type": "integer", "minimum": 0, "maximum": 999},
                                           "label": {"enum": ["sum", "list", "word"]},
                                           "note": {"type": "string", "maxLength": 10}},
          "required": ["answer", "label", "note"], "additionalProperties": False}
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"enum": ["Paris", "Oslo", "Lima"]},
                                                    "days": {"type": "integer", "minimum": 1, "maximum": 7}},
                   "required": ["city", "days"], "additionalProperties": False}}}
CLOCK = {"type": "function", "function": {
    "name": "get_time", "parameters": {"type": "object", "properties": {"zone": {"type": "string", "maxLength": 6}},
                                       "required": ["zone"], "additionalProperties": False}}}
QUESTIONS = ["What is 3 + 4?", "Sort 5 2 9.", "Weather in Paris for two days?"]


@pytest.fixture(scope="module")
def served():
    tm = trimode.load()
    engine = Engine(tm, cost=CostModel([(1, 1e-3), (1 << 16, 1e-3)]))
    with ServerThread(create_app(engine, ServerConfig(MODEL, default_max_tokens=120))) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(served):
    return openai.OpenAI(base_url=served.url + "/v1", api_key="none", max_retries=0)


def ask(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


@pytest.mark.parametrize("mode,knobs", MODES)
def test_response_format_json_schema_validates_in_every_mode(client, mode, knobs):
    fmt = {"type": "json_schema", "json_schema": {"name": "answer", "schema": SCHEMA, "strict": True}}
    for q in QUESTIONS:
        r = client.chat.completions.create(model=MODEL, messages=ask(q), response_format=fmt,
                                           extra_body={"mode": mode, **knobs})
        msg = r.choices[0].message
        assert r.choices[0].finish_reason == "stop" and msg.refusal is None
        jsonschema.validate(json.loads(msg.content), SCHEMA)


@pytest.mark.parametrize("mode,knobs", MODES)
def test_structured_outputs_regex_and_choice_in_every_mode(client, mode, knobs):
    for q in QUESTIONS:
        r = client.completions.create(model=MODEL, prompt=q, max_tokens=16,
                                      extra_body={"mode": mode, **knobs,
                                                  "structured_outputs": {"regex": "[A-Z][a-z]{1,5} [0-9]{1,3}"}})
        assert __import__("re").fullmatch("[A-Z][a-z]{1,5} [0-9]{1,3}", r.choices[0].text), r.choices[0].text
        r = client.chat.completions.create(model=MODEL, messages=ask(q), max_tokens=8, extra_body={
            "mode": mode, **knobs, "structured_outputs": {"choice": ["yes", "no", "it depends"]}})
        assert r.choices[0].message.content in ("yes", "no", "it depends")


def test_speculative_modes_answer_what_ar_answers(client):
    fmt = {"type": "json_schema", "json_schema": {"name": "answer", "schema": SCHEMA}}
    for q in QUESTIONS:
        want = client.chat.completions.create(model=MODEL, messages=ask(q), response_format=fmt,
                                              extra_body={"mode": "ar"}).choices[0].message.content
        for mode, knobs in MODES[1:3] + MODES[4:]:
            got = client.chat.completions.create(model=MODEL, messages=ask(q), response_format=fmt,
                                                 extra_body={"mode": mode, **knobs}).choices[0].message.content
            assert got == want, (mode, q)


class Answer(BaseModel):
    label: Literal["sum", "product"]
    value: int = Field(ge=0, le=99)
    word: str = Field(max_length=8)


def test_openai_parse_with_a_pydantic_model(client):
    for mode in ("ar", "diffusion", "linear_spec"):
        r = client.chat.completions.parse(model=MODEL, messages=ask("What is 3 + 4?"), response_format=Answer,
                                          extra_body={"mode": mode})
        parsed = r.choices[0].message.parsed
        assert isinstance(parsed, Answer) and 0 <= parsed.value <= 99


def test_json_object_on_completions(client):
    r = client.completions.create(model=MODEL, prompt="A JSON object:", max_tokens=40,
                                  extra_body={"response_format": {"type": "json_object"}})
    if r.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(r.choices[0].text), dict)
    else:  # the budget cut it: finish_reason says so
        assert r.choices[0].finish_reason == "length"


@pytest.mark.parametrize("mode,knobs", MODES)
@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "get_weather"}}])
def test_forced_tool_calls_validate_and_stream_the_same(client, mode, knobs, choice):
    schema = WEATHER["function"]["parameters"]
    for q in QUESTIONS:
        kw = dict(model=MODEL, messages=ask(q), tools=[WEATHER, CLOCK], tool_choice=choice, max_tokens=120,
                  extra_body={"mode": mode, **knobs}, parallel_tool_calls=False)
        r = client.chat.completions.create(**kw)
        c = r.choices[0]
        assert c.finish_reason == "tool_calls", c.message
        calls = c.message.tool_calls
        assert len(calls) == 1
        if isinstance(choice, dict):
            assert calls[0].function.name == "get_weather"
        if calls[0].function.name == "get_weather":
            jsonschema.validate(json.loads(calls[0].function.arguments), schema)
        if mode in ("diffusion", "auto"):
            continue  # the stream runs again; diffusion is not keyed to a single answer across batching
        assembled: dict = {}
        finish = None
        for chunk in client.chat.completions.create(**kw, stream=True):
            for d in chunk.choices[0].delta.tool_calls or []:
                slot = assembled.setdefault(d.index, {"name": "", "arguments": "", "id": None})
                slot["id"] = d.id or slot["id"]
                slot["name"] += (d.function.name or "") if d.function else ""
                slot["arguments"] += (d.function.arguments or "") if d.function else ""
            finish = chunk.choices[0].finish_reason or finish
        assert finish == "tool_calls"
        assert [(v["name"], json.loads(v["arguments"])) for v in assembled.values()] == \
            [(calls[0].function.name, json.loads(calls[0].function.arguments))]
        assert all(v["id"] for v in assembled.values())


def test_tool_results_in_the_history_and_auto(client):
    history = ask("Weather in Paris?") + [
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function",
             "function": {"name": "get_weather", "arguments": json.dumps({"city": "Paris", "days": 1})}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "18 C and sunny"}]
    for mode in ("ar", "diffusion", "linear_spec"):
        r = client.chat.completions.create(model=MODEL, messages=history, tools=[WEATHER], tool_choice="auto",
                                           max_tokens=30, extra_body={"mode": mode})
        c = r.choices[0]
        if c.message.tool_calls:
            assert c.finish_reason == "tool_calls"
            jsonschema.validate(json.loads(c.message.tool_calls[0].function.arguments),
                                WEATHER["function"]["parameters"])
        else:
            assert "<tool_call>" not in (c.message.content or "")
        r = client.chat.completions.create(model=MODEL, messages=history, tools=[WEATHER], tool_choice="none",
                                           max_tokens=8)
        assert r.choices[0].message.tool_calls is None


@pytest.mark.parametrize("mode,knobs", MODES)
def test_auto_tool_choice_streams_content_then_calls(client, mode, knobs):
    """`tool_choice="auto"`: text, calls, or text then calls; streamed, every content delta comes before the
    first tool_calls delta, and finish_reason is "tool_calls" exactly when a call was made ("stop" for text)."""
    for q in QUESTIONS:
        kw = dict(model=MODEL, messages=ask(q), tools=[WEATHER, CLOCK], tool_choice="auto", max_tokens=64,
                  extra_body={"mode": mode, **knobs})
        c = client.chat.completions.create(**kw).choices[0]
        assert "<tool_call>" not in (c.message.content or "")
        assert c.finish_reason in (("tool_calls",) if c.message.tool_calls else ("stop", "length")), c
        content, kinds, calls, finish = "", [], {}, None
        for chunk in client.chat.completions.create(**kw, stream=True):
            d = chunk.choices[0].delta
            if d.content:
                content, kinds = content + d.content, kinds + ["content"]
            for t in d.tool_calls or []:
                kinds.append("tool_calls")
                slot = calls.setdefault(t.index, {"name": "", "arguments": ""})
                slot["name"] += (t.function.name or "") if t.function else ""
                slot["arguments"] += (t.function.arguments or "") if t.function else ""
            finish = chunk.choices[0].finish_reason or finish
        if calls:
            assert finish == "tool_calls" and "content" not in kinds[kinds.index("tool_calls"):], kinds
        else:
            assert finish in ("stop", "length")
        if mode != "ar":
            continue  # the stream runs again; only AR's greedy answer is the same text whatever the batch
        assert content.strip() == (c.message.content or "").strip()
        assert [(v["name"], json.loads(v["arguments"])) for v in calls.values()] == \
            [(t.function.name, json.loads(t.function.arguments)) for t in c.message.tool_calls or []]


@pytest.fixture(scope="module")
def call_token_client(tmp_path_factory):
    """A tiny random checkpoint whose vocabulary has `<tool_call>` as one plain token (as Qwen-style ones do),
    served: a logit_bias on that token makes the model write some text, then open a call."""
    path = build_checkpoint(tmp_path_factory.mktemp("calls") / MODEL, context=1024, extra_tokens=("<tool_call>",))
    tm = trimode.load(path)
    engine = Engine(tm, cost=CostModel([(1, 1e-3), (1 << 16, 1e-3)]))
    with ServerThread(create_app(engine, ServerConfig(MODEL, default_max_tokens=150))) as srv:
        yield openai.OpenAI(base_url=srv.url + "/v1", api_key="none", max_retries=0), tm.tokenizer


@pytest.mark.parametrize("mode,knobs", MODES)
def test_auto_tool_choice_writes_text_then_a_call(call_token_client, mode, knobs):
    """Under "auto" the model writes text, then its `<tool_call>` token, and the call grammar takes over: the
    answer is the text as `content` and the call as `tool_calls` (finish_reason "tool_calls"); streamed, the
    content deltas come first, then the call's; the lossless modes answer what AR answers."""
    client, tok = call_token_client
    kw = dict(model=MODEL, messages=ask("Weather in Oslo?"), tools=[WEATHER], tool_choice="auto",
              parallel_tool_calls=False, max_tokens=150, logit_bias={str(tok.token_id("<tool_call>")): 10},
              extra_body={"mode": mode, **knobs})
    c = client.chat.completions.create(**kw).choices[0]
    assert c.finish_reason == "tool_calls" and len(c.message.tool_calls) == 1, c
    assert c.message.content and "<tool_call>" not in c.message.content
    jsonschema.validate(json.loads(c.message.tool_calls[0].function.arguments), WEATHER["function"]["parameters"])
    content, kinds, calls, finish = "", [], {}, None
    for chunk in client.chat.completions.create(**kw, stream=True):
        d = chunk.choices[0].delta
        if d.content:
            content, kinds = content + d.content, kinds + ["content"]
        for t in d.tool_calls or []:
            kinds.append("tool_calls")
            slot = calls.setdefault(t.index, {"name": "", "arguments": ""})
            slot["name"] += (t.function.name or "") if t.function else ""
            slot["arguments"] += (t.function.arguments or "") if t.function else ""
        finish = chunk.choices[0].finish_reason or finish
    assert finish == "tool_calls" and kinds[0] == "content" and len(calls) == 1, kinds
    assert "content" not in kinds[kinds.index("tool_calls"):], kinds
    if mode in ("ar", "linear_spec", "quadratic_spec"):
        assert content.strip() == c.message.content
        assert [(v["name"], v["arguments"]) for v in calls.values()] == \
            [(t.function.name, t.function.arguments) for t in c.message.tool_calls]
        ar = client.chat.completions.create(**{**kw, "extra_body": {"mode": "ar"}}).choices[0]
        assert (ar.message.content, ar.message.tool_calls[0].function.arguments) == \
            (c.message.content, c.message.tool_calls[0].function.arguments)
    required = client.chat.completions.create(**{**kw, "tool_choice": "required"}).choices[0]
    assert required.finish_reason == "tool_calls" and required.message.content is None, required


@pytest.mark.parametrize("body,field", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {
        "type": "object", "properties": {"a": {"$ref": "#/$defs/nowhere"}}, "required": ["a"]}}}},
     "response_format"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {
        "enum": [f"v{i}" for i in range(10_000)]}}}}, "response_format"),
    ({"structured_outputs": {"regex": "([a-z]"}}, "structured_outputs"),
    ({"structured_outputs": {"grammar": "start: nowhere"}}, "structured_outputs"),
    ({"structured_outputs": {"regex": "a", "choice": ["a"]}}, "structured_outputs"),
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tools"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": [WEATHER], "response_format": {"type": "json_object"}}, "tools"),
    ({"response_format": {"type": "json_schema"}}, "response_format"),
])
def test_unsupported_constraints_are_400_naming_the_field(served, body, field):
    r = httpx.post(served.url + "/v1/chat/completions", timeout=60,
                   json={"model": MODEL, "messages": ask("hi"), "max_tokens": 4, **body})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == field or field in err["message"], err


def test_langchain_structured_output_and_tools(served):
    lc = pytest.importorskip("langchain_openai")
    llm = lc.ChatOpenAI(model=MODEL, base_url=served.url + "/v1", api_key="none", max_tokens=80, max_retries=0)
    out = llm.with_structured_output(Answer).invoke("What is 3 + 4?")
    assert isinstance(out, Answer)

    class get_weather(BaseModel):  # noqa: N801 - the tool's name
        """The weather in a city for some days."""

        city: Literal["Paris", "Oslo"]
        days: int = Field(ge=1, le=7)

    msg = llm.bind_tools([get_weather], tool_choice="get_weather", strict=True).invoke("Weather in Oslo?")
    assert msg.tool_calls and msg.tool_calls[0]["name"] == "get_weather"
    assert msg.tool_calls[0]["args"]["city"] in ("Paris", "Oslo")


def test_openai_agents_loop_calls_the_tool_and_finishes(served):
    agents = pytest.importorskip("agents")
    calls: list[tuple[str, int]] = []

    @agents.function_tool(strict_mode=True)
    def get_weather(city: Literal["Paris", "Oslo"], days: Annotated[int, Field(ge=1, le=7)]) -> str:
        """The weather in a city for some days."""
        calls.append((city, days))
        return "sunny"

    client = openai.AsyncOpenAI(base_url=served.url + "/v1", api_key="none", max_retries=0)
    model = agents.OpenAIChatCompletionsModel(model=MODEL, openai_client=client)
    agent = agents.Agent(name="weather", instructions="Answer with the weather.", tools=[get_weather],
                         model=model, model_settings=agents.ModelSettings(tool_choice="required", max_tokens=60))
    result = agents.Runner.run_sync(agent, "Weather in Oslo for two days?", max_turns=4,
                                    run_config=agents.RunConfig(tracing_disabled=True))
    assert calls and calls[0][0] in ("Paris", "Oslo") and 1 <= calls[0][1] <= 7, result.final_output
    assert isinstance(result.final_output, str)


def test_structured_outputs_json_as_text_as_the_playground_sends_it(served):
    for schema, status in ((json.dumps(SCHEMA), 200), ('{"type": "object",', 400)):
        r = httpx.post(served.url + "/v1/chat/completions", timeout=60, json={
            "model": MODEL, "messages": ask("What is 3 + 4?"), "structured_outputs": {"json": schema},
            "mode": "diffusion", "stream": True, "provisional": True})
        assert r.status_code == status, r.text
        if status == 400:
            assert r.json()["error"]["param"] == "structured_outputs"
            continue
        text = "".join(json.loads(line[6:])["choices"][0]["delta"].get("content", "")
                       for line in r.text.splitlines()
                       if line.startswith("data: {") and json.loads(line[6:]).get("choices"))
        jsonschema.validate(json.loads(text), SCHEMA)


JSONISH = st.recursive(st.one_of(st.none(), st.booleans(), st.integers(-5, 10**20), st.text(max_size=8)),
                       lambda inner: st.one_of(st.lists(inner, max_size=4),
                                               st.dictionaries(st.sampled_from(
                                                   ["type", "properties", "items", "enum", "$ref", "$defs",
                                                    "required", "anyOf", "maxLength", "pattern", "const", "x"]),
                                                   inner, max_size=4)), max_leaves=12)
HOSTILE = st.one_of(
    st.builds(lambda s: {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": s}}},
              st.dictionaries(st.text(max_size=6), JSONISH, max_size=4)),
    st.builds(lambda r: {"structured_outputs": {"regex": r}}, st.text(max_size=12)),
    st.builds(lambda g: {"structured_outputs": {"grammar": g}}, st.text(max_size=20)),
    st.builds(lambda c: {"structured_outputs": {"choice": c}}, st.lists(st.text(max_size=5), max_size=4)),
    st.builds(lambda p, c: {"tools": [{"type": "function", "function": {"name": "f", "parameters": p}}],
                            "tool_choice": c},
              st.dictionaries(st.sampled_from(["type", "properties", "required", "x"]), JSONISH, max_size=3),
              st.sampled_from(["auto", "required", "none", {"type": "function", "function": {"name": "g"}}])))


@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
@given(body=HOSTILE)
def test_random_constraints_never_5xx(served, body):
    r = httpx.post(served.url + "/v1/chat/completions", timeout=60,
                   json={"model": MODEL, "messages": ask("hi"), "max_tokens": 6, "mode": "diffusion", **body})
    assert r.status_code in (200, 400), (body, r.text)


# -- the Responses API -------------------------------------------------------------------------------------------

RESPONSES_WEATHER = {"type": "function", "name": "get_weather", "description": "The weather in a city",
                     "parameters": WEATHER["function"]["parameters"], "strict": True}


@pytest.mark.parametrize("mode,knobs", MODES)
def test_responses_text_format_json_schema_in_every_mode(client, mode, knobs):
    fmt = {"type": "json_schema", "name": "answer", "schema": SCHEMA, "strict": True}
    r = client.responses.create(model=MODEL, input="What is 3 + 4?", text={"format": fmt}, max_output_tokens=120,
                                extra_body={"mode": mode, **knobs})
    assert r.status == "completed", r
    jsonschema.validate(json.loads(r.output_text), SCHEMA)
    assert r.text.format.type == "json_schema"
    r = client.responses.create(model=MODEL, input="Name a fruit.", text={"format": {"type": "json_object"}},
                                max_output_tokens=120, extra_body={"mode": mode, **knobs})
    assert r.status == "incomplete" or isinstance(json.loads(r.output_text), dict)


def test_responses_parse_with_a_pydantic_model(client):
    r = client.responses.parse(model=MODEL, input="What is 3 + 4?", text_format=Answer, max_output_tokens=120)
    assert isinstance(r.output_parsed, Answer)


@pytest.mark.parametrize("mode,knobs", MODES)
def test_responses_function_calls_and_their_outputs(client, mode, knobs):
    """Function tools on /v1/responses: a forced call comes back as a function_call item (call_id, name,
    arguments under the tool's schema), streamed as the same item; its output goes back as a
    function_call_output item in the next turn, whose answer under "none" is text."""
    schema = RESPONSES_WEATHER["parameters"]
    kw = dict(model=MODEL, input="Weather in Paris for two days?", tools=[RESPONSES_WEATHER], max_output_tokens=80,
              tool_choice={"type": "function", "name": "get_weather"}, extra_body={"mode": mode, **knobs})
    r = client.responses.create(**kw)
    calls = [o for o in r.output if o.type == "function_call"]
    assert r.status == "completed" and len(calls) == 1, r.output
    call = calls[0]
    assert call.name == "get_weather" and call.call_id.startswith("call_") and call.status == "completed"
    jsonschema.validate(json.loads(call.arguments), schema)
    assert r.tool_choice.name == "get_weather" and r.tools[0].name == "get_weather"
    events = list(client.responses.create(**kw, stream=True))
    kinds = [e.type for e in events]
    assert kinds[:3] == ["response.created", "response.in_progress", "response.output_item.added"], kinds
    assert events[2].item.type == "function_call" and kinds[-1] == "response.completed"
    done = [e for e in events if e.type == "response.function_call_arguments.done"]
    assert len(done) == 1 and done[0].arguments == "".join(
        e.delta for e in events if e.type == "response.function_call_arguments.delta")
    jsonschema.validate(json.loads(done[0].arguments), schema)
    final = [o for o in events[-1].response.output if o.type == "function_call"]
    assert [(o.name, o.arguments) for o in final] == [("get_weather", done[0].arguments)]
    if mode == "ar":
        assert done[0].arguments == call.arguments
    history = [{"role": "user", "content": "Weather in Paris for two days?"},
               {"type": "function_call", "call_id": call.call_id, "name": call.name, "arguments": call.arguments},
               {"type": "function_call_output", "call_id": call.call_id, "output": "18 C and sunny"}]
    r = client.responses.create(model=MODEL, input=history, tools=[RESPONSES_WEATHER], tool_choice="none",
                                max_output_tokens=8, extra_body={"mode": mode, **knobs})
    assert all(o.type == "message" for o in r.output) and r.output_text is not None


def test_responses_refuse_bad_tools_and_formats_by_name(served):
    for body, param in (({"text": {"format": {"type": "json_schema", "name": "x"}}}, "text"),
                        ({"text": {"format": {"type": "xml"}}}, "text"),
                        ({"tools": [{"type": "function", "name": "f", "parameters": {}}],
                          "tool_choice": {"type": "function", "name": "g"}}, "tools"),
                        ({"tools": [{"type": "web_search"}]}, "tools"),
                        ({"input": [{"type": "function_call_output", "output": "x"}]}, "input")):
        r = httpx.post(served.url + "/v1/responses", timeout=60,
                       json={"model": MODEL, "input": "hi", "max_output_tokens": 4, **body})
        assert r.status_code == 400, (body, r.text)
        assert r.json()["error"]["param"].startswith(param), (body, r.text)


def test_openai_agents_responses_model_calls_the_tool_and_finishes(served):
    agents = pytest.importorskip("agents")
    calls: list[tuple[str, int]] = []

    @agents.function_tool(strict_mode=True)
    def get_weather(city: Literal["Paris", "Oslo"], days: Annotated[int, Field(ge=1, le=7)]) -> str:
        """The weather in a city for some days."""
        calls.append((city, days))
        return "sunny"

    async def run(streamed: bool):
        client = openai.AsyncOpenAI(base_url=served.url + "/v1", api_key="none", max_retries=0)
        model = agents.OpenAIResponsesModel(model=MODEL, openai_client=client)
        # One call, and the tool's answer ends the run: the bundled model's own text (or further calls) would run
        # to the budget, which the Responses model takes as a failed turn (status "incomplete").
        settings = agents.ModelSettings(tool_choice="required", max_tokens=60, parallel_tool_calls=False)
        agent = agents.Agent(name="weather", instructions="Answer with the weather.", tools=[get_weather],
                             model=model, model_settings=settings, tool_use_behavior="stop_on_first_tool")
        kw = dict(max_turns=4, run_config=agents.RunConfig(tracing_disabled=True))
        if not streamed:
            return await agents.Runner.run(agent, "Weather in Oslo for two days?", **kw)
        result = agents.Runner.run_streamed(agent, "Weather in Oslo for two days?", **kw)
        _ = [e async for e in result.stream_events()]
        return result

    for streamed in (False, True):
        calls.clear()
        result = asyncio.run(run(streamed))
        assert calls and calls[0][0] in ("Paris", "Oslo") and 1 <= calls[0][1] <= 7, result.final_output
        assert result.final_output == "sunny"


def test_responses_max_tool_calls_bounds_the_calls(call_token_client):
    """`max_tool_calls` N on /v1/responses: the call grammar ends after the N-th call. With a bias towards a next
    call (the newline after `</tool_call>` and the `<tool_call>` token), the model calls again and again
    unbounded; bounded, it makes exactly N calls."""
    client, tok = call_token_client
    bias = {str(tok.token_id("<tool_call>")): 10, **{str(t): 10 for t in tok.encode("\n")}}
    kw = dict(model=MODEL, input="Weather in Oslo?", tools=[RESPONSES_WEATHER], tool_choice="required",
              max_output_tokens=400)
    free = client.responses.create(**kw, extra_body={"logit_bias": bias})
    assert len([o for o in free.output if o.type == "function_call"]) > 2, free.output
    for n in (1, 2):
        r = client.responses.create(**kw, max_tool_calls=n, extra_body={"logit_bias": bias})
        calls = [o for o in r.output if o.type == "function_call"]
        assert r.status == "completed" and len(calls) == n and r.max_tool_calls == n, r.output
    for bad in (0, 129):
        with pytest.raises(openai.BadRequestError) as e:
            client.responses.create(**kw, max_tool_calls=bad)
        assert e.value.body["param"] == "max_tool_calls", e.value.body
