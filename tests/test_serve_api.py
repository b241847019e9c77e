"""The OpenAI-compatible server, end to end: a real uvicorn server on a free port, a tiny real-format checkpoint
(random weights, a byte-level BPE tokenizer trained here, a chat template), the real `openai` client and raw
HTTP. Generation goes through the real engine."""

from __future__ import annotations

import asyncio
import hashlib
import json
import socket
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest
import torch
import uvicorn
from prometheus_client.parser import text_string_to_metric_families
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

import trimode
from trimode.engine import Engine
from trimode.model.config import NLDConfig
from trimode.model.loading import save_checkpoint, save_lora
from trimode.model.transformer import NLDTransformer
from trimode.serve.app import ServerConfig, create_app
from trimode.serve.policy import AuditLog, parse_policy

API_KEY = "test-key"
MODEL = "tiny-serve"
CONTEXT = 256
SPECIALS = ["<unk>", "<s>", "</s>", "<|mask|>", "<|system|>", "<|user|>", "<|assistant|>", "</think>"]
CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m.role }}|>{{ m.content }}</s>{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")
CORPUS = ["def add(a, b):\n    return a + b\n", "The quick brown fox jumps over the lazy dog.",
          "Hello, world! How are you today?", "for i in range(10):\n    print(i)\n",
          "A contract clause: the parties agree to the terms below.", "Summarise the meeting notes."] * 4
POLICY = """\
ai_generation_policy:
  coding_autocomplete: {mode: diffusion, priority: latency, human_review: optional,
                        knobs: {block_length: 4, threshold: 0.5}}
  internal_summary:    {mode: self_speculative, priority: cost_and_speed, human_review: sample_based,
                        review_sample_rate: 1.0}
  legal_contract_clause: {mode: autoregressive_verified, priority: accuracy_and_auditability,
                          human_review: required, allow_modes: [linear_spec]}
"""
MODES = ("ar", "diffusion", "linear_spec", "quadratic_spec", "auto")


def build_checkpoint(out: Path, context: int = CONTEXT, extra_tokens: tuple[str, ...] = ()) -> Path:
    """A tiny NLD checkpoint with tokenizer.json, tokenizer_config.json (eos, chat template) and a drafter;
    `extra_tokens`: plain (not special) tokens added to the vocabulary, one id each."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer)
    tok.add_tokens(list(extra_tokens))
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(
        json.dumps({"bos_token": "<s>", "eos_token": "</s>", "chat_template": CHAT_TEMPLATE}))
    ids = [tok.token_to_id(s) for s in SPECIALS]
    torch.manual_seed(0)
    cfg = NLDConfig(vocab_size=tok.get_vocab_size(), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, head_dim=8, eos_token_id=tok.token_to_id("</s>"),
                    mask_token_id=tok.token_to_id("<|mask|>"), bos_token_id=tok.token_to_id("<s>"), block_size=4,
                    max_position_embeddings=context, rope_parameters={"rope_type": "default", "rope_theta": 1e4})
    net = NLDTransformer(cfg)
    with torch.no_grad():
        for p in net.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.3)
        net.diffusion_head.weight.mul_(3.0)  # peaky logits, so drafts are sometimes accepted
        net.diffusion_head.weight[ids] = 0.0  # a random model that rarely emits special tokens: long, visible text
        for layer in net.encoder.layers:
            o = layer.self_attn.o_proj
            o.set_adapter(torch.randn(4, o.weight.shape[1]) * 0.1, torch.randn(o.weight.shape[0], 4) * 0.1, 2.0)
    save_checkpoint(net, out, dtype=torch.float32)
    save_lora(net, out / "linear_spec_lora", r=4, alpha=8.0)
    return out


class ServerThread:
    """uvicorn serving `app` on a free localhost port, in a thread."""

    def __init__(self, app) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self) -> ServerThread:
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started:
            assert time.time() < deadline and self.thread.is_alive(), "the server did not start"
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(30)
        self.sock.close()


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    return build_checkpoint(tmp_path_factory.mktemp("serve") / MODEL)


@pytest.fixture(scope="module")
def tm(ckpt):
    return trimode.load(ckpt, dtype="float64")  # float64: batched rows give exactly the alone-run output


@pytest.fixture(scope="module")
def served(tm, tmp_path_factory):
    audit = tmp_path_factory.mktemp("audit") / "audit.jsonl"
    engine = Engine(tm, max_queue=64)
    config = ServerConfig(MODEL, api_key=API_KEY, default_max_tokens=12, policy=parse_policy(POLICY, "policy.yaml"),
                          audit_log=AuditLog(audit))
    with ServerThread(create_app(engine, config)) as srv:
        srv.engine, srv.audit = engine, audit
        yield srv


@pytest.fixture
def client(served) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{served.url}/v1", api_key=API_KEY, max_retries=0, timeout=60)


def post(served, path: str, body, key: str | None = API_KEY, **kw) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    headers.update(kw.pop("headers", {}))
    kw.setdefault("timeout", 60)
    if isinstance(body, (dict, list)):
        return httpx.post(served.url + path, json=body, headers=headers, **kw)
    return httpx.post(served.url + path, content=body, headers={**headers, "Content-Type": "application/json"}, **kw)


def chat_body(content="Hello, world!", **kw) -> dict:
    return {"model": MODEL, "messages": [{"role": "user", "content": content}], "max_tokens": 8, **kw}


def sse_events(response: httpx.Response) -> list:
    out = []
    for line in response.iter_lines():
        if line.startswith("data: "):
            data = line[len("data: "):]
            out.append(data if data == "[DONE]" else json.loads(data))
    return out


def metric(served, name: str, **labels) -> float:
    text = httpx.get(served.url + "/metrics", timeout=30).text
    total = 0.0
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                total += s.value
    return total


# -- endpoints -----------------------------------------------------------------------------------------------

def test_health_and_models(served, client):
    health = httpx.get(served.url + "/health", timeout=30).json()
    assert health["status"] == "ok" and health["model"] == MODEL
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL]
    assert models.data[0].model_extra["context_length"] == CONTEXT


def test_chat_completion_in_every_mode(client, tm):
    prompt = tm.tokenizer.apply_chat_template([{"role": "user", "content": "Hello, world!"}])
    for mode in MODES:
        r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hello, world!"}],
                                           max_tokens=8, extra_body={"mode": mode})
        stats = r.model_extra["trimode"]
        assert stats["mode"] == mode
        # The server's answer is the engine's generation, token for token the Python API's (auto: AR's).
        ref = tm.generate(prompt, mode="ar" if mode == "auto" else mode, max_new_tokens=8)
        assert r.choices[0].message.content == ref.text
        assert r.choices[0].message.role == "assistant"
        assert r.usage.prompt_tokens == len(tm.encode(prompt))
        assert r.usage.completion_tokens == len(ref.token_ids)
        assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
        assert stats["forward_passes"] > 0
        if mode != "auto":
            assert stats["forward_passes"] == ref.stats.forward_passes
            assert stats["tokens_per_forward"] == pytest.approx(ref.stats.tokens_per_forward, abs=1e-3)
            assert stats["mean_acceptance"] == pytest.approx(ref.stats.mean_acceptance, abs=1e-3)
        assert stats["review"] is None
        assert r.choices[0].finish_reason in ("stop", "length")


def test_completion_knobs_reach_the_decoder(client, tm):
    prompt = "def add(a, b):"
    for knobs in ({"block_length": 4, "threshold": 0.3},
                  {"block_length": 8, "threshold": 1.0, "causal_context": False}):
        r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=10,
                                      extra_body={"mode": "diffusion", **knobs})
        ref = tm.generate(prompt, mode="diffusion", max_new_tokens=10, **knobs)
        assert r.choices[0].text == ref.text
        assert r.model_extra["trimode"]["forward_passes"] == ref.stats.forward_passes
        assert r.model_extra["trimode"]["knobs"]["block_length"] == knobs["block_length"]
    r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=10,
                                  extra_body={"mode": "linear_spec", "use_drafter": False, "block_length": 4})
    assert r.model_extra["trimode"]["knobs"]["use_drafter"] is False
    assert r.choices[0].text == tm.generate(prompt, mode="ar", max_new_tokens=10).text  # verified = AR


def test_every_knob_is_reachable_over_http(client, tm):
    # steps (the fixed-step diffusion schedule), ar_mix_weight and the thinking budget, as in the Python API.
    prompt = "def add(a, b):"
    cases = [("diffusion", {"block_length": 4, "steps": 2}),
             ("quadratic_spec", {"block_length": 3, "ar_mix_weight": 0.5}),
             ("linear_spec", {"block_length": 4, "max_thinking_tokens": 3, "end_think_token_id": 7}),
             ("ar", {"max_thinking_tokens": 2, "end_think_token_id": 9})]
    for mode, knobs in cases:
        r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=10, extra_body={"mode": mode, **knobs})
        ref = tm.generate(prompt, mode=mode, max_new_tokens=10, **knobs)
        assert r.choices[0].text == ref.text, (mode, knobs)
        assert r.model_extra["trimode"]["forward_passes"] == ref.stats.forward_passes
    r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=10,
                                  extra_body={"mode": "diffusion", "block_length": 4, "steps": 2})
    assert r.model_extra["trimode"]["knobs"] == {"block_length": 4, "threshold": None, "steps": 2,
                                                 "remask_threshold": None, "causal_context": True,
                                                 "unmask": "steps"}


def test_completion_token_prompts_batch_and_echo(client, tm):
    ids = tm.encode("The quick brown fox")
    r = client.completions.create(model=MODEL, prompt=[ids, "Hello"], max_tokens=5, echo=True)
    assert [c.index for c in r.choices] == [0, 1]
    assert r.choices[0].text == tm.decode(ids) + tm.generate(ids, max_new_tokens=5).text
    assert r.choices[1].text == "Hello" + tm.generate("Hello", max_new_tokens=5).text
    assert r.usage.prompt_tokens == len(ids) + len(tm.encode("Hello"))


def test_stop_string_inside_a_diffusion_block(client, tm):
    prompt, block = "The quick brown fox", 4
    full = tm.generate(prompt, mode="diffusion", max_new_tokens=24, block_length=block)
    ids = full.token_ids
    # A stop string that starts at a token in the middle of a block and does not occur earlier.
    stop = cut = None
    for k in range(1, len(ids)):
        before = tm.decode(ids[:k])
        piece = tm.decode(ids[: k + 1])[len(before):]
        usable = piece.strip() and piece.isprintable() and "\ufffd" not in piece
        if k % block and usable and full.text.startswith(before) and full.text.find(piece) == len(before):
            stop, cut = piece, len(before)
            break
    assert stop is not None, "no usable stop string in the generated text"
    r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=24, stop=[stop, "never-seen"],
                                  extra_body={"mode": "diffusion", "block_length": block})
    assert r.choices[0].text == full.text[:cut]
    assert r.choices[0].finish_reason == "stop"
    # Streamed, the stop string is never shown either.
    chunks = client.completions.create(model=MODEL, prompt=prompt, max_tokens=24, stop=stop, stream=True,
                                       extra_body={"mode": "diffusion", "block_length": block})
    assert "".join(c.choices[0].text for c in chunks if c.choices) == full.text[:cut]


def test_n_choices_with_derived_seeds(client, tm):
    body = dict(model=MODEL, prompt="Hello", max_tokens=6, n=3, temperature=1.0, seed=11)
    first = client.completions.create(**body)
    again = client.completions.create(**body)
    texts = [c.text for c in first.choices]
    assert texts == [c.text for c in again.choices]  # a seed makes the sample reproducible
    assert texts == [tm.generate("Hello", max_new_tokens=6, temperature=1.0, seed=11 + j).text for j in range(3)]
    assert len(set(texts)) > 1
    assert first.usage.completion_tokens == sum(c.model_extra["trimode"]["generated_tokens"] for c in first.choices)


def test_streaming_chat_matches_the_non_streamed_answer(client):
    messages = [{"role": "user", "content": "for i in range(10):"}]
    whole = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=12,
                                           extra_body={"mode": "linear_spec"})
    stream = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=12, stream=True,
                                            stream_options={"include_usage": True},
                                            extra_body={"mode": "linear_spec"})
    chunks = list(stream)
    content = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(content) > 1  # sent as committed, not all at the end
    assert "".join(content) == whole.choices[0].message.content
    finals = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finals) == 1 and finals[0].choices[0].finish_reason == whole.choices[0].finish_reason
    stats = finals[0].model_extra["trimode"]
    assert stats["mode"] == "linear_spec"
    assert stats["forward_passes"] == whole.model_extra["trimode"]["forward_passes"]
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert chunks[-1].choices == []


def test_provisional_diffusion_blocks_are_opt_in(served, tm):
    body = chat_body(max_tokens=8, mode="diffusion", block_length=4, threshold=0.99, stream=True)
    with httpx.stream("POST", served.url + "/v1/chat/completions", json={**body, "provisional": True},
                      headers={"Authorization": f"Bearer {API_KEY}"}, timeout=60) as r:
        assert r.status_code == 200
        events = sse_events(r)
    assert events[-1] == "[DONE]"
    prov = [e["choices"][0]["provisional"] for e in events[:-1] if e["choices"] and "provisional" in e["choices"][0]]
    assert prov, "no provisional events"
    assert any(None in p["token_ids"] for p in prov)  # a block shown before all its masks were decided
    assert all(len(p["token_ids"]) == 4 for p in prov)
    text = "".join(e["choices"][0]["delta"].get("content") or "" for e in events[:-1] if e["choices"])
    with httpx.stream("POST", served.url + "/v1/chat/completions", json=body,
                      headers={"Authorization": f"Bearer {API_KEY}"}, timeout=60) as r:
        plain = sse_events(r)
    assert not any("provisional" in e["choices"][0] for e in plain[:-1] if e["choices"])
    assert text == "".join(e["choices"][0]["delta"].get("content") or "" for e in plain[:-1] if e["choices"])


def test_logprobs(client, served, tm):
    r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hello"}], max_tokens=6,
                                       logprobs=True, top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert 0 < len(content) <= r.usage.completion_tokens
    for t in content:  # greedy: the chosen token is the most likely one
        assert len(t.top_logprobs) == 3 and t.top_logprobs[0].logprob == pytest.approx(t.logprob, abs=1e-5)
        assert t.logprob <= 0
    c = client.completions.create(model=MODEL, prompt="Hello", max_tokens=5, logprobs=2,
                                  extra_body={"mode": "linear_spec"})
    lp = c.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) > 0
    assert lp.text_offset[0] == 0 and all(len(d) <= 2 for d in lp.top_logprobs)
    # Diffusion reports each token's logprob at the pass that revealed it (the engine's decision stage).
    r = post(served, "/v1/chat/completions", chat_body(mode="diffusion", logprobs=True, top_logprobs=2))
    assert r.status_code == 200
    body = r.json()
    content = body["choices"][0]["logprobs"]["content"]
    assert len(content) == body["usage"]["completion_tokens"] > 0
    assert all(e["logprob"] <= 0 and len(e["top_logprobs"]) == 2 for e in content)


# -- robustness ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("body, status, needle", [
    (b"{not json", 400, "not valid JSON"),
    (b"[1, 2]", 400, "JSON object"),
    ({**chat_body(), "frobnicate": 1}, 400, "unknown field 'frobnicate'"),
    ({**chat_body(), "threshold": 1.5}, 400, "threshold"),
    ({**chat_body(), "threshold": -0.1}, 400, "threshold"),
    ({**chat_body(), "block_length": 0}, 400, "block_length"),
    ({**chat_body(), "mode": "linear_spec", "block_length": 1}, 400, "block_length 1 is too small"),
    ({**chat_body(), "max_tokens": 0}, 400, "max_tokens"),
    ({**chat_body(), "max_tokens": -5}, 400, "max_tokens"),
    ({**chat_body(), "max_tokens": 10_000}, 400, "context"),
    (chat_body("word " * 400), 400, "context"),
    ({**chat_body(), "mode": "turbo"}, 400, "mode"),
    ({**chat_body(), "temperature": -1}, 400, "temperature"),
    ({**chat_body(), "top_p": 0}, 400, "top_p"),
    ({**chat_body(), "n": 0}, 400, "n"),
    ({**chat_body(), "steps": 0}, 400, "steps"),
    ({**chat_body(), "max_thinking_tokens": -1}, 400, "max_thinking_tokens"),
    ({**chat_body(), "provisional": True}, 400, "stream"),
    ({**chat_body(), "stream": True, "provisional": True}, 400, "diffusion"),
    ({**chat_body(), "messages": []}, 400, "messages"),
    ({**chat_body(), "messages": [{"role": "wizard", "content": "x"}]}, 400, "role"),
    ({"messages": [{"role": "user", "content": "x"}]}, 400, "missing required field 'model'"),
    ({**chat_body(), "model": "gpt-4"}, 404, "does not exist"),
    ({**chat_body(), "route": "nowhere"}, 404, "unknown route"),
    ({**chat_body(), "route": "coding_autocomplete", "mode": "ar"}, 403, "does not allow mode"),
])
def test_bad_requests_get_openai_errors(served, body, status, needle):
    r = post(served, "/v1/chat/completions", body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert needle in err["message"]


def test_bad_completion_prompts(served):
    for prompt, needle in (([], "prompt must be"), ([10**6], "token ids must be in"), ("w " * 300, "context"),
                           ("", "empty"), ({"a": 1}, "prompt must be"), ([[1, 2], 3], "prompt must be")):
        r = post(served, "/v1/completions", {"model": MODEL, "prompt": prompt, "max_tokens": 4})
        assert r.status_code == 400 and needle in r.json()["error"]["message"], r.text


def test_api_key_is_required(served):
    for key in (None, "wrong-key"):
        r = post(served, "/v1/chat/completions", chat_body(), key=key)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    r = post(served, "/v1/chat/completions", b"{broken", key="wrong-key")
    assert r.status_code == 401  # the key is checked before the body is read
    bad = openai.OpenAI(base_url=f"{served.url}/v1", api_key="nope", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()


def test_openai_client_raises_for_invalid_params(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}], max_tokens=4,
                                       extra_body={"threshold": 3})
    assert e.value.status_code == 400 and e.value.body["param"] == "threshold"
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}], max_tokens=4)


def wait_until_cancelled(engine, cancelled_before: int) -> None:
    """Until the engine has cancelled one more request and runs nothing (it prunes finished rows at its next step)."""
    deadline = time.time() + 20
    while True:
        stats = engine.stats()
        if stats["counters"].get("cancelled", 0) > cancelled_before and stats["running_requests"] == 0:
            return
        assert time.time() < deadline, f"the engine kept the abandoned request: {stats}"
        time.sleep(0.05)


def test_client_disconnect_frees_the_work(served):
    counters = served.engine.stats()["counters"]
    cancelled, finished = counters.get("cancelled", 0), counters.get("finished", 0)
    body = {"model": MODEL, "prompt": "Hello", "max_tokens": 240, "stream": True}
    with httpx.stream("POST", served.url + "/v1/completions", json=body,
                      headers={"Authorization": f"Bearer {API_KEY}"}, timeout=60) as r:
        got = None
        for line in r.iter_lines():
            if line.startswith("data: ") and json.loads(line[6:])["choices"][0]["text"]:
                got = line
                break  # leave mid-stream: closing the response drops the connection
        assert got
    wait_until_cancelled(served.engine, cancelled)
    assert served.engine.stats()["counters"].get("finished", 0) == finished  # it did not run to the end


def test_client_gone_before_a_non_streamed_answer_frees_the_work(served):
    cancelled = served.engine.stats()["counters"].get("cancelled", 0)
    with pytest.raises(httpx.ReadTimeout):  # the client gives up and closes the connection
        post(served, "/v1/completions", {"model": MODEL, "prompt": "Hello", "max_tokens": 240},
             timeout=httpx.Timeout(10, read=0.05))
    wait_until_cancelled(served.engine, cancelled)


def test_queue_full_gets_429(tm):
    # Capacity: one running and one waiting. The loop is held back until the third request was answered, so the
    # first two cannot finish early (the engine is fast enough to finish a 240-token answer in a blink).
    engine = Engine(tm, max_queue=1, max_running=1)
    start = engine.start
    engine.start = lambda: engine
    with ServerThread(create_app(engine, ServerConfig(MODEL))) as srv:

        async def scenario():
            async with httpx.AsyncClient(base_url=srv.url, timeout=60) as http:
                body = {"model": MODEL, "prompt": "Hello", "max_tokens": 24}
                first = asyncio.create_task(http.post("/v1/completions", json=body))
                second = asyncio.create_task(http.post("/v1/completions", json=body))
                while engine.stats()["counters"].get("submitted", 0) < 2:
                    await asyncio.sleep(0.01)
                full = await http.post("/v1/completions", json=body)
                assert full.status_code == 429, full.text
                assert full.json()["error"]["code"] == "queue_full"
                assert full.headers["retry-after"]
                assert engine.stats()["queue_depth"] == 2
                text = (await http.get("/metrics")).text
                assert 'trimode_requests_rejected_total{reason="queue_full"} 1.0' in text
                start()
                assert [(await t).status_code for t in (first, second)] == [200, 200]

        asyncio.run(scenario())


# -- routing policy, audit log, metrics ----------------------------------------------------------------------

def audit_lines(served) -> list[dict]:
    return [json.loads(line) for line in served.audit.read_text().splitlines()] if served.audit.exists() else []


def test_routes_decide_the_mode_and_reviewed_routes_are_audited(served, client, tm):
    before = len(audit_lines(served))
    r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x = "}], max_tokens=8,
                                       extra_headers={"X-Trimode-Route": "coding_autocomplete"})
    s = r.model_extra["trimode"]
    assert s["mode"] == "diffusion" and s["knobs"]["threshold"] == 0.5 and s["knobs"]["block_length"] == 4
    assert s["review"] == {"route": "coding_autocomplete", "level": "optional", "flagged": False, "risk": None}
    assert len(audit_lines(served)) == before  # optional review: not audited

    r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Summarise"}],
                                       max_tokens=8, extra_body={"route": "internal_summary"})
    s = r.model_extra["trimode"]
    family = ("linear_spec", "quadratic_spec", "auto")  # self_speculative: cost_and_speed measures each
    assert s["mode"] in family and s["review"]["level"] == "sample_based" and s["review"]["flagged"]
    entry = audit_lines(served)[-1]  # written before the response was sent
    assert entry["request_id"] == s["request_id"] == r.id and entry["route"] == "internal_summary"
    assert entry["mode"] == s["mode"] and entry["review_flag"] is True
    prompt = tm.tokenizer.apply_chat_template([{"role": "user", "content": "Summarise"}])
    assert entry["prompt_sha256"] == [hashlib.sha256(prompt.encode()).hexdigest()]
    assert entry["output_sha256"] == [hashlib.sha256(r.choices[0].message.content.encode()).hexdigest()]
    assert {"time", "human_review", "finish_reasons", "endpoint", "model"} <= set(entry)

    # Verified route: AR by default, linear_spec allowed and forced greedy, both exactly the AR output.
    ar = tm.generate(prompt, mode="ar", max_new_tokens=8).text
    for mode, temperature in ((None, 0.0), ("linear_spec", 1.3)):
        extra = {"route": "legal_contract_clause", **({"mode": mode} if mode else {})}
        r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Summarise"}],
                                           max_tokens=8, temperature=temperature, extra_body=extra)
        s = r.model_extra["trimode"]
        assert s["mode"] == (mode or "ar") and s["verified"] and s["review"]["flagged"]
        assert r.choices[0].message.content == ar
        assert audit_lines(served)[-1]["request_id"] == r.id
    assert len(audit_lines(served)) == before + 3

    # A streamed reviewed request is audited before its last chunk, with the streamed text's hash.
    chunks = list(client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Summarise"}],
                                                 max_tokens=8, stream=True,
                                                 extra_body={"route": "legal_contract_clause"}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    entry = audit_lines(served)[-1]
    assert entry["request_id"] == chunks[0].id and entry["output_sha256"] == [hashlib.sha256(text.encode()).hexdigest()]
    assert [c for c in chunks if c.choices and c.choices[0].finish_reason][0].model_extra["trimode"]["review"][
        "flagged"]

    raw = post(served, "/v1/chat/completions", chat_body(), headers={"X-Trimode-Route": "legal_contract_clause"})
    assert raw.headers["X-Trimode-Review"] == "flagged"


def test_metrics_count_what_ran(served, client):
    labels = {"mode": "linear_spec"}
    forwards = metric(served, "trimode_forward_passes_total", **labels)
    generated = metric(served, "trimode_generated_tokens_total", **labels)
    tpf_count = metric(served, "trimode_tokens_per_forward_count", **labels)
    accept_count = metric(served, "trimode_acceptance_length_count", **labels)
    ok = metric(served, "trimode_requests_total", endpoint="/v1/completions", status="200")
    r = client.completions.create(model=MODEL, prompt="Hello", max_tokens=10, extra_body={"mode": "linear_spec"})
    s = r.model_extra["trimode"]
    assert metric(served, "trimode_forward_passes_total", **labels) == forwards + s["forward_passes"]
    assert metric(served, "trimode_generated_tokens_total", **labels) == generated + s["generated_tokens"]
    assert metric(served, "trimode_tokens_per_forward_count", **labels) == tpf_count + 1
    assert metric(served, "trimode_acceptance_length_count", **labels) > accept_count
    assert metric(served, "trimode_requests_total", endpoint="/v1/completions", status="200") == ok + 1
    assert metric(served, "trimode_request_latency_seconds_count", endpoint="/v1/completions") >= ok + 1
    post(served, "/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": 0})
    assert metric(served, "trimode_requests_total", endpoint="/v1/completions", status="400") >= 1
    text = httpx.get(served.url + "/metrics", timeout=30).text
    for name in ("trimode_queue_depth", "trimode_running_requests", "trimode_time_to_first_token_seconds_bucket",
                 "trimode_requests_in_flight"):
        assert name in text


@pytest.mark.parametrize("mode", ["ar", "linear_spec", "quadratic_spec", "diffusion"])
def test_logit_processors_over_http(client, tm, mode):
    """OpenAI's penalties and logit_bias, vLLM's repetition_penalty and min_tokens, through the real client; the
    speculative modes still give AR's tokens."""
    prompt = "def add(a, b):"
    extra = {"mode": mode, "repetition_penalty": 1.4, "min_tokens": 3}
    if mode != "ar":
        extra["block_length"] = 4
    got = client.completions.create(model=MODEL, prompt=prompt, max_tokens=12, frequency_penalty=1.0,
                                    presence_penalty=0.5, logit_bias={"40": -100}, extra_body=extra)
    ids = tm.encode(prompt)
    ref = tm.generate(ids, mode="ar" if mode != "diffusion" else "diffusion", max_new_tokens=12,
                      frequency_penalty=1.0, presence_penalty=0.5, logit_bias={40: -100.0}, repetition_penalty=1.4,
                      min_tokens=3, **({"block_length": 4} if mode == "diffusion" else {}))
    assert got.choices[0].text == ref.text
    chat = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=6,
                                          frequency_penalty=-1.0, extra_body=extra)
    assert chat.choices[0].message.content is not None


@pytest.mark.parametrize("field, value, needle", [
    ("frequency_penalty", 2.5, "frequency_penalty"), ("presence_penalty", -2.1, "presence_penalty"),
    ("repetition_penalty", 0, "repetition_penalty"), ("logit_bias", {"40": 150}, "logit_bias"),
    ("logit_bias", {"99999": 1}, "logit_bias"), ("logit_bias", {"x": 1}, "logit_bias"),
    ("min_tokens", 9, "min_tokens")])
def test_bad_logit_processor_settings_are_400(served, field, value, needle):
    for path, body in (("/v1/completions", {"model": MODEL, "prompt": "hi", "max_tokens": 4}),
                       ("/v1/chat/completions", {**chat_body(), "max_tokens": 4})):
        r = post(served, path, {**body, field: value})
        assert r.status_code == 400 and needle in r.json()["error"]["message"], r.text
