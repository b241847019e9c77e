"""The server as the clients people use call it: scoring with `echo` + `logprobs` (lm-evaluation-harness'
loglikelihood requests), vLLM's `prompt_logprobs` and tokenizer endpoints, logprobs in streams, the Responses
API, and clear answers for what is not served. The bundled model behind a real uvicorn server, the real `openai`
client and raw HTTP."""

from __future__ import annotations

import asyncio
import json

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

import trimode
from tests.test_serve_api import ServerThread, sse_events
from trimode.engine import Engine
from trimode.serve.app import ServerConfig, create_app

API_KEY = "conformance-key"
MODEL = "trimode-default"
QUESTION = [{"role": "user", "content": "Sort: 7 3 9 1 4 2"}]
ANSWER = "1 2 3 4 7 9"


@pytest.fixture(scope="module")
def tm():
    return trimode.load(dtype="float32")


@pytest.fixture(scope="module")
def served(tm):
    with ServerThread(create_app(Engine(tm, max_queue=16, prefill_chunk=7),  # chunked prefills: scores span chunks
                                 ServerConfig(MODEL, api_key=API_KEY, default_max_tokens=16))) as srv:
        yield srv


@pytest.fixture
def client(served) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{served.url}/v1", api_key=API_KEY, max_retries=0, timeout=60)


def post(served, path: str, body: dict, key: str | None = API_KEY) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.post(served.url + path, json=body, headers=headers, timeout=60)


def chat_prompt(tm) -> list[int]:
    return tm.tokenizer.encode_chat(QUESTION)


# -- scoring -------------------------------------------------------------------------------------------------

def test_echo_logprobs_score_the_prompt(client, tm):
    """The answer's tokens scored as prompt tokens get exactly what AR generation gives them (within 1e-3)."""
    chat = client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=16, logprobs=True)
    assert chat.choices[0].message.content == ANSWER
    generated = [t.logprob for t in chat.choices[0].logprobs.content]  # the EOS token included: it was generated
    context = chat_prompt(tm)
    answer = tm.tokenizer.encode(ANSWER) + [tm.config.eos_token_id]
    assert len(generated) == len(answer)
    r = client.completions.create(model=MODEL, prompt=context + answer, max_tokens=1, echo=True, logprobs=2)
    lp = r.choices[0].logprobs
    n = len(context) + len(answer)
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == n + 1
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert lp.token_logprobs[len(context):n] == pytest.approx(generated, abs=1e-3)
    assert all(max(top.values()) == pytest.approx(v, abs=1e-6) for top, v in
               zip(lp.top_logprobs[len(context):n], lp.token_logprobs[len(context):n], strict=True))  # greedy
    text = r.choices[0].text
    assert text.startswith(tm.decode(context + answer))
    assert lp.text_offset == sorted(lp.text_offset) and lp.text_offset[0] == 0
    assert lp.text_offset[len(context)] == len(tm.decode(context)) and lp.text_offset[-1] == len(
        tm.decode(context + answer))  # the generated token's offset is counted over the echoed text


def test_max_tokens_zero_scores_without_generating(client, tm):
    context = chat_prompt(tm) + tm.tokenizer.encode(ANSWER)
    r = client.completions.create(model=MODEL, prompt=context, max_tokens=0, echo=True, logprobs=0)
    choice = r.choices[0]
    assert choice.text == tm.decode(context) and choice.finish_reason == "length"
    assert len(choice.logprobs.token_logprobs) == len(context) and choice.logprobs.top_logprobs is None
    assert r.usage.completion_tokens == 0 and r.model_extra["trimode"]["forward_passes"] == 1
    plain = client.completions.create(model=MODEL, prompt="Sort: 3 1", max_tokens=0, echo=True)
    assert plain.choices[0].text == "Sort: 3 1" and plain.model_extra["trimode"]["forward_passes"] == 0


def test_lm_eval_loglikelihood_batch(served, tm):
    """lm-eval's local-completions request: a batch of token-id prompts, one choice each, sorted by index."""
    context = chat_prompt(tm)
    right, wrong = tm.tokenizer.encode(ANSWER), tm.tokenizer.encode("1 2 3 4 9 7")
    body = {"model": MODEL, "prompt": [context + right, context + wrong], "temperature": 0, "max_tokens": 1,
            "logprobs": 1, "seed": 1234, "echo": True}
    choices = sorted(post(served, "/v1/completions", body).json()["choices"], key=lambda c: c["index"])
    scores = [sum(c["logprobs"]["token_logprobs"][len(context):-1]) for c in choices]
    assert [len(c["logprobs"]["token_logprobs"]) for c in choices] == [len(context) + len(right) + 1,
                                                                        len(context) + len(wrong) + 1]
    assert scores[0] > scores[1] + 1.0 and scores[0] > -0.05


def test_prompt_logprobs_field(served, tm, client):
    """vLLM's `prompt_logprobs`: per prompt token None (the first) or {id: {logprob, rank, decoded_token}}."""
    ids = chat_prompt(tm) + tm.tokenizer.encode(ANSWER)
    r = post(served, "/v1/completions", {"model": MODEL, "prompt": ids, "max_tokens": 1, "prompt_logprobs": 2}).json()
    scores = r["choices"][0]["prompt_logprobs"]
    assert len(scores) == len(ids) and scores[0] is None
    for tid, entry in zip(ids[1:], scores[1:], strict=True):
        assert str(tid) in entry and len(entry) in (2, 3)
        assert {e["rank"] for e in entry.values()} >= {1}
    chat = client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=4,
                                          extra_body={"prompt_logprobs": 0})
    assert len(chat.model_extra["prompt_logprobs"]) == len(chat_prompt(tm))
    bad = post(served, "/v1/completions", {"model": MODEL, "prompt": "a", "prompt_logprobs": 21})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "prompt_logprobs"


def test_logprobs_stream(client, served, tm):
    plain = client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=16, logprobs=True,
                                           top_logprobs=2)
    chunks = list(client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=16, logprobs=True,
                                                 top_logprobs=2, stream=True))
    streamed = [t for c in chunks for ch in c.choices if ch.logprobs and ch.logprobs.content
                for t in ch.logprobs.content]
    assert [(t.token, round(t.logprob, 4)) for t in streamed] == [
        (t.token, round(t.logprob, 4)) for t in plain.choices[0].logprobs.content]
    assert "".join(ch.delta.content or "" for c in chunks for ch in c.choices) == ANSWER
    events = sse_events(httpx.post(served.url + "/v1/completions", headers={"Authorization": f"Bearer {API_KEY}"},
                                   json={"model": MODEL, "prompt": chat_prompt(tm), "max_tokens": 16, "logprobs": 1,
                                         "stream": True}, timeout=60))
    lps = [c["choices"][0]["logprobs"] for c in events[:-1] if c["choices"] and c["choices"][0]["logprobs"]]
    assert len(lps) == 1 and len(lps[0]["tokens"]) == len(tm.tokenizer.encode(ANSWER)) + 1


# -- tokenizer endpoints ---------------------------------------------------------------------------------------

def test_tokenizer_endpoints(served, tm):
    info = httpx.get(served.url + "/tokenizer_info", headers={"Authorization": f"Bearer {API_KEY}"}, timeout=30)
    info = info.json()
    assert info["eos_token"] == "</s>" and info["bos_token"] == "<s>" and "<|assistant|>" in info["chat_template"]
    text = "Sort: 7 3 9 1 4 2"
    r = post(served, "/tokenize", {"prompt": text, "add_special_tokens": False}).json()
    assert r["tokens"] == tm.tokenizer.encode(text) and r["count"] == len(r["tokens"])
    assert r["max_model_len"] == tm.max_context
    assert post(served, "/tokenize", {"prompt": "</s>", "add_special_tokens": False}).json()["tokens"] == [
        tm.config.eos_token_id]  # lm-eval reads the EOS id so
    chat = post(served, "/tokenize", {"model": MODEL, "messages": QUESTION}).json()
    assert chat["tokens"] == chat_prompt(tm)
    assert post(served, "/detokenize", {"tokens": r["tokens"]}).json() == {"prompt": text}
    assert post(served, "/tokenize", {"prompt": text}, key=None).status_code == 401
    assert httpx.get(served.url + "/tokenizer_info", timeout=30).status_code == 401
    for body, param in (({"tokens": [10**9]}, "tokens"), ({"prompt": "x", "messages": QUESTION}, None),
                        ({"prompt": "x", "model": "other"}, "model")):
        bad = post(served, "/detokenize" if "tokens" in body else "/tokenize", body)
        assert bad.status_code in (400, 404) and bad.json()["error"]["param"] == param


# -- what is not served, and small conventions ----------------------------------------------------------------

def test_unserved_answers(served, client):
    with pytest.raises(openai.NotFoundError) as e:
        client.embeddings.create(model=MODEL, input="hello")
    assert "/v1/chat/completions" in e.value.body["message"] and "embeddings" in e.value.body["message"]
    r = post(served, "/v1/nothing", {})
    assert r.status_code == 404 and "/v1/completions" in r.json()["error"]["message"]
    card = client.models.retrieve(MODEL)
    assert card.id == MODEL and card.model_extra["max_model_len"] == card.model_extra["context_length"]
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4")
    assert client.models.list().data[0].model_extra["max_model_len"] > 0
    assert httpx.head(served.url + "/health", timeout=30).status_code == 200
    text = httpx.get(served.url + "/metrics", timeout=30).text
    assert not [s for f in text_string_to_metric_families(text) for s in f.samples if s.name.endswith("_created")]


def test_developer_role_is_system(client, served, tm):
    as_dev = [{"role": "developer", "content": "Be brief."}, *QUESTION]
    as_sys = [{"role": "system", "content": "Be brief."}, *QUESTION]
    a = post(served, "/tokenize", {"messages": as_dev}).json()["tokens"]
    assert a == post(served, "/tokenize", {"messages": as_sys}).json()["tokens"]
    out = client.chat.completions.create(model=MODEL, messages=as_dev, max_tokens=16)
    assert out.choices[0].message.content == client.chat.completions.create(
        model=MODEL, messages=as_sys, max_tokens=16).choices[0].message.content


def test_openapi_lists_new_routes(served):
    paths = json.loads(httpx.get(served.url + "/openapi.json", timeout=30).text)["paths"]
    assert {"/tokenize", "/detokenize", "/tokenizer_info", "/v1/models/{model_id}"} <= set(paths)


# -- the Responses API -------------------------------------------------------------------------------------------

def test_responses_api(client, served):
    r = client.responses.create(model=MODEL, input="Sort: 7 3 9 1 4 2", max_output_tokens=16)
    assert r.output_text == ANSWER and r.status == "completed" and r.usage.output_tokens == len(
        ANSWER.split()) * 2  # digits and spaces, then EOS
    assert r.id.startswith("resp_") and r.model_extra["trimode"]["mode"] == "ar"
    items = client.responses.create(model=MODEL, instructions="Answer.", max_output_tokens=2, input=[
        {"role": "user", "content": [{"type": "input_text", "text": "Sort: 7 3 9 1 4 2"}]}])
    assert items.status == "incomplete" and items.incomplete_details.reason == "max_output_tokens"
    assert items.output_text == "1 " and items.instructions == "Answer."
    events = list(client.responses.create(model=MODEL, input="Sort: 7 3 9 1 4 2", max_output_tokens=16,
                                          stream=True))
    kinds = [e.type for e in events]
    assert kinds[:4] == ["response.created", "response.in_progress", "response.output_item.added",
                         "response.content_part.added"]
    assert kinds[-4:] == ["response.output_text.done", "response.content_part.done", "response.output_item.done",
                          "response.completed"]
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == ANSWER
    assert events[-1].response.output_text == ANSWER and events[-1].response.usage.total_tokens > 0
    assert [e.sequence_number for e in events] == list(range(len(events)))
    diffusion = client.responses.create(model=MODEL, input="Sort: 7 3 9 1 4 2", max_output_tokens=16,
                                        extra_body={"mode": "diffusion"})
    assert diffusion.model_extra["trimode"]["mode"] == "diffusion"


@pytest.mark.parametrize("extra, param", [
    ({"tools": [{"type": "web_search"}]}, "tools"),
    ({"previous_response_id": "resp_1"}, "previous_response_id"),
    ({"store": True}, "store"),
    ({"text": {"verbosity": "high"}}, "text"),
    ({"input": [{"type": "reasoning", "summary": []}]}, "input"),
    ({"max_tokens": 5}, "max_tokens"),
    ({"bogus": 1}, "bogus"),
])
def test_responses_refuses_what_it_does_not_serve(served, extra, param):
    r = post(served, "/v1/responses", {"model": MODEL, "input": "hi", **extra})
    assert r.status_code == 400 and r.json()["error"]["param"].split(".")[0] == param, r.text


def test_openai_agents_plain_agent(served):
    """openai-agents' default model (the Responses API) runs a plain agent against the server, also streamed."""
    agents = pytest.importorskip("agents")
    agents.set_tracing_disabled(True)

    async def run() -> tuple[str, str, list]:
        client = openai.AsyncOpenAI(base_url=f"{served.url}/v1", api_key=API_KEY, max_retries=0)
        agent = agents.Agent(name="sorter", instructions="Sort the numbers.",
                             model=agents.OpenAIResponsesModel(model=MODEL, openai_client=client),
                             model_settings=agents.ModelSettings(max_tokens=16))
        plain = await agents.Runner.run(agent, "Sort: 7 3 9 1 4 2")
        streamed = agents.Runner.run_streamed(agent, "Sort: 7 3 9 1 4 2")
        events = [e async for e in streamed.stream_events()]
        return plain.final_output, streamed.final_output, events

    plain, streamed, events = asyncio.run(run())
    # The same conversation through chat completions: the agent's instructions are its system turn.
    chat = openai.OpenAI(base_url=f"{served.url}/v1", api_key=API_KEY, max_retries=0).chat.completions.create(
        model=MODEL, max_tokens=16, messages=[{"role": "system", "content": "Sort the numbers."},
                                              {"role": "user", "content": "Sort: 7 3 9 1 4 2"}])
    expected = chat.choices[0].message.content
    assert expected.split() == ANSWER.split()  # the model sorts under the system turn too
    assert plain == streamed == expected
    deltas = [e.data.delta for e in events if e.type == "raw_response_event" and
              e.data.type == "response.output_text.delta"]
    assert "".join(deltas) == expected
