"""Hostile input and bursts against the real server (uvicorn on a free port, the real engine): every malformed
request is a 4xx with the OpenAI error body and the keep-alive connection survives it; big bodies do not stall
the event loop; a 500 names no internals; the queue takes running + waiting capacity and 429s only beyond it."""

from __future__ import annotations

import asyncio
import http.client
import json
import threading
import time

import httpx
import pytest
import torch
from tokenizers import Tokenizer, normalizers

import trimode
from tests.test_serve_api import API_KEY, MODEL, ServerThread, build_checkpoint, chat_body, post
from trimode.engine import Engine
from trimode.serve.app import ServerConfig, create_app
from trimode.serve.respond import engine_error as _engine_error

BIG = 10 * 2**20  # a 10 MB prompt


@pytest.fixture(scope="module")
def tm(tmp_path_factory):
    return trimode.load(build_checkpoint(tmp_path_factory.mktemp("hostile") / MODEL), dtype="float64")


@pytest.fixture(scope="module")
def served(tm):
    """Default engine settings (64 running + 64 waiting), as `trimode serve` starts it."""
    engine = Engine(tm)
    with ServerThread(create_app(engine, ServerConfig(MODEL, api_key=API_KEY, default_max_tokens=8))) as srv:
        srv.engine = engine
        yield srv


class Connection:
    """One keep-alive HTTP/1.1 connection (the standard library's client), so a test can see it survive."""

    def __init__(self, url: str) -> None:
        host, port = url.removeprefix("http://").split(":")
        self.conn = http.client.HTTPConnection(host, int(port), timeout=60)
        self.conn.connect()
        self.sock = self.conn.sock

    def request(self, method: str, path: str, body: bytes | None = None) -> tuple[int, dict, dict]:
        headers = {"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"}
        self.conn.request(method, path, body=body, headers=headers)
        r = self.conn.getresponse()
        data = r.read()
        return r.status, dict(r.getheaders()), json.loads(data) if data else {}

    def alive(self) -> bool:
        """Whether the next request still goes over the very same socket."""
        status, _, _ = self.request("GET", "/health")
        return status == 200 and self.conn.sock is self.sock

    def close(self) -> None:
        self.conn.close()


def raw_completion(prompt: str) -> bytes:  # `prompt` is spliced as written: JSON text, escapes included
    return f'{{"model": "{MODEL}", "max_tokens": 4, "prompt": {prompt}}}'.encode()


def chat(**fields) -> bytes:
    return json.dumps({**chat_body(), **fields}).encode()


# Hostile bodies: out-of-range and non-integer token ids, lone surrogates, deep nesting, NaN, wrong types, ...
# (path, raw body, status, text in the message).
HOSTILE = [
    ("/v1/completions", raw_completion("[5, -1, 7]"), 400, "token ids must be in [0, "),
    ("/v1/completions", raw_completion(f"[5, {2**40}]"), 400, "token ids must be in [0, "),
    ("/v1/completions", raw_completion(f"[5, {2**70}]"), 400, "token ids must be in [0, "),
    ("/v1/completions", raw_completion(f"[[1, 2], [{2**70}]]"), 400, "token ids must be in [0, "),
    ("/v1/completions", raw_completion('"a\\ud800b"'), 400, "surrogate"),
    ("/v1/completions", raw_completion('"a\\udfffb"'), 400, "surrogate"),
    ("/v1/completions", raw_completion('"ab"').replace(b"ab", b"a\xed\xa0\x80b"), 400, "not valid JSON"),  # raw
    ("/v1/chat/completions", json.dumps(chat_body()).replace("Hello, world!", "a\\ud800b").encode(), 400, "surrogate"),
    ("/v1/chat/completions", json.dumps(chat_body(stop=["x"])).replace('"x"', '"\\udc00"').encode(), 400,
     "surrogate"),
    ("/v1/chat/completions", b'{"model": "%s", "\\ud800": 1}' % MODEL.encode(), 400, "surrogate"),  # in a key
    ("/v1/completions", b"[" * 100_000, 400, "nests too deeply"),
    ("/v1/completions", b'{"a": ' * 5_000 + b"1" + b"}" * 5_000, 400, "nests too deeply"),
    ("/v1/completions", raw_completion("[" * 300 + "1" + "]" * 300), 400, "nests too deeply"),
    ("/v1/completions", raw_completion('"hi", "temperature": NaN'), 400, "temperature: must be a finite number"),
    ("/v1/completions", raw_completion('"hi", "temperature": Infinity'), 400, "temperature: must be a finite"),
    ("/v1/completions", raw_completion('"hi", "top_p": -Infinity'), 400, "top_p: must be a finite number"),
    ("/v1/completions", raw_completion('"hi", "threshold": 1e999'), 400, "threshold: must be a finite number"),
    ("/v1/completions", raw_completion('"hi", "logit_bias": {"5": NaN}'), 400, "must be a finite number"),
    ("/v1/completions", b'{"model": "%s", "prompt": "hi", "max_tokens": "5"}' % MODEL.encode(), 400,
     "max_tokens: Input should be a valid integer"),
    ("/v1/completions", b'{"model": "%s", "prompt": "hi", "max_tokens": true}' % MODEL.encode(), 400,
     "max_tokens: Input should be a valid integer"),
    ("/v1/completions", b'{"model": "%s", "prompt": "hi", "max_tokens": 5.0}' % MODEL.encode(), 400,
     "max_tokens: Input should be a valid integer"),
    ("/v1/completions", raw_completion('"hi", "n": "2"'), 400, "n: Input should be a valid integer"),
    ("/v1/completions", raw_completion('"hi", "seed": 1e3'), 400, "seed: Input should be a valid integer"),
    ("/v1/completions", raw_completion(f'"hi", "seed": {2**64}'), 400, "seed"),
    ("/v1/completions", raw_completion('"hi", "top_k": "1"'), 400, "top_k: Input should be a valid integer"),
    ("/v1/completions", raw_completion('"hi", "block_length": 4.0'), 400, "block_length: Input should be a valid"),
    ("/v1/completions", raw_completion('"hi", "logprobs": true'), 400, "logprobs: Input should be a valid integer"),
    ("/v1/completions", raw_completion('"hi", "echo": "yes"'), 400, "echo: Input should be a valid boolean"),
    ("/v1/completions", raw_completion('"hi", "stream": 1'), 400, "stream: Input should be a valid boolean"),
    ("/v1/completions", raw_completion('"hi", "temperature": "0.5"'), 400, "temperature: Input should be a valid"),
    ("/v1/completions", raw_completion('"hi", "temperature": false'), 400, "temperature: Input should be a valid"),
    ("/v1/completions", raw_completion('"hi", "risk": "extreme"'), 400, "risk"),
    ("/v1/completions", raw_completion('"hi", "n": 16').replace(b'"hi"', json.dumps(list("abcdefghi")).encode()),
     400, "asks for 144 generations"),  # more than running + waiting capacity: 400, as a retry cannot help
    ("/v1/chat/completions", chat(messages=[{"role": "user", "content": 5}]), 400, "content must be a string"),
    ("/v1/chat/completions", chat(messages=[{"role": "user", "content": [{"type": "text", "text": 5}]}]), 400,
     "Input should be a valid string"),
    ("/v1/chat/completions", chat(stream_options={"include_usage": 1}, stream=True), 400, "include_usage"),
    ("/v1/completions", b"\xff\xfe{}", 400, "not valid JSON"),
    ("/v1/completions", b"", 400, "not valid JSON"),
    ("/v1/completions", b"null", 400, "JSON object"),
]


def test_every_hostile_request_is_a_4xx_and_the_connection_survives(served):
    conn = Connection(served.url)
    try:
        for path, body, status, needle in HOSTILE:
            t0 = time.perf_counter()
            got, _, answer = conn.request("POST", path, body)
            assert got == status, (body[:80], answer)
            assert set(answer["error"]) == {"message", "type", "param", "code"}
            assert needle in answer["error"]["message"], (body[:80], answer)
            assert time.perf_counter() - t0 < 5, body[:80]
            assert conn.alive(), f"the connection was reset after {body[:80]!r}"
        got, _, answer = conn.request("POST", "/v1/completions", raw_completion('"Hello"'))
        assert got == 200 and answer["usage"]["completion_tokens"] > 0  # still serving, on the same connection
    finally:
        conn.close()


def test_a_500_names_no_internals_and_keeps_the_connection(tm):
    app = create_app(Engine(tm), ServerConfig(MODEL))

    @app.get("/boom")
    async def boom():  # a bug in a handler, with the kind of message an allocator writes
        raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB; 1.5 GiB reserved in total by PyTorch")

    with ServerThread(app) as srv:
        conn = Connection(srv.url)
        try:
            status, _, answer = conn.request("GET", "/boom")
            assert status == 500 and answer["error"]["type"] == "server_error"
            assert "GiB" not in answer["error"]["message"] and "PyTorch" not in answer["error"]["message"]
            assert conn.alive()
        finally:
            conn.close()


def test_engine_failures_are_reported_without_their_details():
    e = _engine_error(RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 8589934592"))
    assert e.status == 500 and "allocate" not in e.message and e.code == "internal_error"
    e = _engine_error(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (GPU 0; 79 GiB total)"))
    assert e.status == 503 and e.code == "out_of_memory" and "GiB" not in e.message and e.headers["Retry-After"]


def test_body_limit_is_413_declared_or_chunked(served):
    big = json.dumps({**chat_body(), "user": "u" * (17 * 2**20)}).encode()  # over the default 16 MiB
    r = post(served, "/v1/chat/completions", big)
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"

    def chunks():  # no Content-Length: the limit is enforced on the bytes as they arrive
        yield big[: 2**20]
        for i in range(2**20, len(big), 2**20):
            yield big[i : i + 2**20]

    r = httpx.post(served.url + "/v1/chat/completions", content=chunks(), timeout=60,
                   headers={"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"})
    assert r.status_code == 413 and "16777216 bytes" in r.json()["error"]["message"]
    assert httpx.get(served.url + "/health", timeout=10).status_code == 200


def health_while(served, send) -> tuple[httpx.Response, float]:
    """Run `send()` in a thread; meanwhile poll /health. Returns its response and the slowest /health."""
    out = {}
    thread = threading.Thread(target=lambda: out.setdefault("r", send()))
    thread.start()
    slowest = 0.0
    polls = 0
    while thread.is_alive() or polls < 3:
        t0 = time.perf_counter()
        assert httpx.get(served.url + "/health", timeout=30).status_code == 200
        slowest = max(slowest, time.perf_counter() - t0)
        polls += 1
        time.sleep(0.02)
    thread.join()
    return out["r"], slowest


def test_health_answers_while_a_10mb_prompt_is_refused(served):
    r, slowest = health_while(served, lambda: post(served, "/v1/completions", {"model": MODEL, "max_tokens": 4,
                                                                              "prompt": "hello world " * (BIG // 12)}))
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
    assert slowest < 1.0
    ids = {"model": MODEL, "max_tokens": 4, "prompt": [1] * (BIG // 3)}  # about 10 MB of token ids
    r, slowest = health_while(served, lambda: post(served, "/v1/completions", ids))
    assert r.status_code == 400 and "context is" in r.json()["error"]["message"]
    assert slowest < 1.0


def test_a_prompt_is_tokenized_off_the_event_loop(tmp_path):
    """A tokenizer that normalizes text gives no character bound, so a long prompt is tokenized (seconds of work)
    before it is refused: the server does it in a worker thread, with the GIL released, while /health answers."""
    ckpt = build_checkpoint(tmp_path / "nfc")
    tok = Tokenizer.from_file(str(ckpt / "tokenizer.json"))
    tok.normalizer = normalizers.NFC()
    tok.save(str(ckpt / "tokenizer.json"))
    engine = Engine(trimode.load(ckpt))
    with ServerThread(create_app(engine, ServerConfig("nfc"))) as srv:
        assert srv.server.config.app.state.server.max_prompt_chars is None  # really the tokenizing path
        body = {"model": "nfc", "max_tokens": 4, "prompt": "hello world " * (BIG // 36)}  # 3 MB: seconds of work
        r, slowest = health_while(srv, lambda: httpx.post(srv.url + "/v1/completions", json=body, timeout=120))
    assert r.status_code == 400 and "tokens; this model's context is" in r.json()["error"]["message"]
    assert slowest < 1.0


def burst(url: str, n: int, body: dict, key: str | None = API_KEY) -> list[httpx.Response]:
    async def run():
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        limits = httpx.Limits(max_connections=n)
        async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits, headers=headers) as http:
            return await asyncio.gather(*(http.post("/v1/completions", json=body) for _ in range(n)))

    return asyncio.run(run())


def test_a_burst_of_100_at_default_settings_is_all_answered(served):
    responses = burst(served.url, 100, {"model": MODEL, "prompt": "Hello", "max_tokens": 8})
    assert [r.status_code for r in responses] == [200] * 100
    assert all(r.json()["usage"]["completion_tokens"] > 0 for r in responses)


def test_capacity_is_running_plus_waiting_and_429_only_beyond_it(tm):
    engine = Engine(tm, max_running=3, max_queue=2)
    long = {"model": MODEL, "prompt": "Hello", "max_tokens": 200}
    with ServerThread(create_app(engine, ServerConfig(MODEL))) as srv:
        # Exactly the capacity at once: all served, however the arrivals interleave with admission.
        assert [r.status_code for r in burst(srv.url, 5, long, key=None)] == [200] * 5
        # Beyond it: the extra ones (and only those, at most) are refused with Retry-After.
        responses = burst(srv.url, 9, long, key=None)
        codes = [r.status_code for r in responses]
        assert set(codes) <= {200, 429} and codes.count(200) >= 5, codes
        for r in responses:
            if r.status_code == 429:
                assert r.headers["Retry-After"] == "1" and r.json()["error"]["code"] == "queue_full"
        health = httpx.get(srv.url + "/health", timeout=10).json()
        assert (health["max_running"], health["max_queue"]) == (3, 2)


def test_max_queue_zero_is_no_waiting_room(tm):
    engine = Engine(tm, max_running=2, max_queue=0)
    with ServerThread(create_app(engine, ServerConfig(MODEL))) as srv:
        # An idle server answers (max_queue 0 once meant every request got 429).
        r = httpx.post(srv.url + "/v1/completions", json={"model": MODEL, "prompt": "Hello", "max_tokens": 4})
        assert r.status_code == 200
        assert [r.status_code for r in burst(srv.url, 2, {"model": MODEL, "prompt": "Hi", "max_tokens": 4},
                                             key=None)] == [200, 200]

        async def two_running_then_one_more():
            long = {"model": MODEL, "prompt": "Hello", "max_tokens": 240, "stream": True}
            async with httpx.AsyncClient(base_url=srv.url, timeout=60) as http:
                async with http.stream("POST", "/v1/completions", json=long) as a, \
                        http.stream("POST", "/v1/completions", json=long) as b:
                    assert a.status_code == b.status_code == 200
                    third = await http.post("/v1/completions", json={**long, "stream": False})
                    assert third.status_code == 429 and third.headers["Retry-After"] == "1", third.text

        asyncio.run(two_running_then_one_more())
