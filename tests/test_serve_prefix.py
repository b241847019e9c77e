"""The prefix cache behind the HTTP server: a repeated prompt reports its cached tokens in `usage` (JSON and the
streamed usage chunk), /metrics counts lookups and hits and shows the KV pages, the admin route empties the
cache, `ignore_eos` forces the length. A real uvicorn server and real clients; the flags through `trimode serve`
subprocesses (one with its engine in a core process)."""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families
from safetensors.torch import load_file, save_file

import trimode
from tests.test_serve_api import API_KEY, MODEL, ServerThread, build_checkpoint
from tests.test_serve_cli import Served, trimode_cmd
from trimode.engine import Engine
from trimode.serve.app import ServerConfig, create_app

AUTH = {"Authorization": f"Bearer {API_KEY}"}
PAGE = 16  # the engine's default page size


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return build_checkpoint(tmp_path_factory.mktemp("prefix") / MODEL)


@pytest.fixture(scope="module")
def served(ckpt):
    tm = trimode.load(ckpt, dtype="float64")
    with ServerThread(create_app(Engine(tm, max_queue=16), ServerConfig(MODEL, api_key=API_KEY))) as srv:
        yield srv


def prompt_ids(seed: int, n: int = 45) -> list[int]:
    rng = random.Random(seed)
    return [rng.randint(10, 300) for _ in range(n)]


def complete(url: str, prompt, **extra) -> dict:
    body = {"model": MODEL, "prompt": prompt, "max_tokens": 2, "mode": "ar"} | extra
    r = httpx.post(url + "/v1/completions", json=body, headers=AUTH, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()


def cached(body: dict) -> int:
    return body["usage"]["prompt_tokens_details"]["cached_tokens"]


def scrape(url: str) -> dict[str, float]:
    text = httpx.get(url + "/metrics", timeout=10).text
    return {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples if not s.labels}


def test_repeated_prompt_is_cached_counted_and_reset(served):
    ids = prompt_ids(1)
    before = scrape(served.url)
    assert cached(complete(served.url, ids)) == 0
    again = complete(served.url, ids)
    assert cached(again) == (len(ids) - 1) // PAGE * PAGE  # whole pages; the last token is always computed
    after = scrape(served.url)
    assert after["trimode_prefix_cache_queries_total"] - before["trimode_prefix_cache_queries_total"] >= 2 * len(ids)
    assert after["trimode_prefix_cache_hits_total"] - before["trimode_prefix_cache_hits_total"] == cached(again)
    assert after["trimode_preemptions_total"] == 0 and after["trimode_kv_pages_cached"] >= len(ids) // PAGE
    assert after["trimode_kv_pages_used"] >= 0 and after["trimode_kv_pages_free"] > 0

    r = httpx.post(served.url + "/admin/reset_prefix_cache", json={}, timeout=10)
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    r = httpx.post(served.url + "/admin/reset_prefix_cache", json={}, headers=AUTH, timeout=10)
    assert r.status_code == 200 and r.json()["status"] == "ok" and r.json()["pages_dropped"] >= len(ids) // PAGE
    r = httpx.post(served.url + "/reset_prefix_cache", json={}, headers=AUTH, timeout=10)  # vLLM's name
    assert r.status_code == 200 and r.json()["pages_dropped"] == 0
    assert scrape(served.url)["trimode_kv_pages_cached"] == 0
    assert cached(complete(served.url, ids)) == 0  # computed again


def test_cached_tokens_count_each_prompt_once(served):
    a, b = prompt_ids(2), prompt_ids(3, 37)
    complete(served.url, a)
    complete(served.url, b)
    body = complete(served.url, [a, b], n=3)  # six choices, two prompts: usage counts the prompts
    assert body["usage"]["prompt_tokens"] == len(a) + len(b)
    assert cached(body) == (len(a) - 1) // PAGE * PAGE + (len(b) - 1) // PAGE * PAGE


def test_chat_usage_cached_tokens_with_the_openai_client(served):
    client = openai.OpenAI(base_url=served.url + "/v1", api_key=API_KEY)
    messages = [{"role": "system", "content": "You are a careful assistant. " * 6},
                {"role": "user", "content": "Summarise the meeting notes."}]
    first = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=2)
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    whole = first.usage.prompt_tokens
    second = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=2)
    assert second.usage.prompt_tokens_details.cached_tokens == (whole - 1) // PAGE * PAGE > 0
    chunks = list(client.chat.completions.create(model=MODEL, messages=messages, max_tokens=2, stream=True,
                                                 stream_options={"include_usage": True}))
    assert chunks[-1].usage.prompt_tokens_details.cached_tokens == (whole - 1) // PAGE * PAGE


@pytest.fixture(scope="module")
def eos_served(ckpt, tmp_path_factory):
    """A checkpoint that ends early: EOS's head row copies the row of the token greedy decoding emits 4th
    (slightly larger), so EOS wins where that token would have. Written to disk, so that an engine process loads
    it too."""
    path = tmp_path_factory.mktemp("eos") / MODEL
    shutil.copytree(ckpt, path)
    ids = prompt_ids(4, 8)
    fourth = trimode.load(path, dtype="float64").generate(ids, mode="ar", max_new_tokens=8).token_ids[3]
    weights = load_file(str(path / "model.safetensors"))
    head = weights["diffusion_head.weight"]
    head[json.loads((path / "config.json").read_text())["eos_token_id"]] = head[fourth] * 1.05
    save_file(weights, str(path / "model.safetensors"), metadata={"format": "pt"})
    tm = trimode.load(path, dtype="float64")
    with ServerThread(create_app(Engine(tm, max_queue=16), ServerConfig(MODEL, api_key=API_KEY))) as srv:
        yield srv, ids


def test_ignore_eos_generates_exactly_max_tokens(eos_served):
    srv, ids = eos_served
    plain = complete(srv.url, ids, max_tokens=30)
    assert plain["choices"][0]["finish_reason"] == "stop" and plain["usage"]["completion_tokens"] < 30
    forced = complete(srv.url, ids, max_tokens=30, ignore_eos=True)
    assert forced["choices"][0]["finish_reason"] == "length" and forced["usage"]["completion_tokens"] == 30
    client = openai.OpenAI(base_url=srv.url + "/v1", api_key=API_KEY)
    chat = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=25,
                                          extra_body={"ignore_eos": True})
    assert chat.usage.completion_tokens == 25 and chat.choices[0].finish_reason == "length"


def test_ignore_eos_bad_values_are_400(served):
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    r = httpx.post(served.url + "/v1/chat/completions", json=body | {"ignore_eos": "sometimes"}, headers=AUTH)
    assert r.status_code == 400 and "ignore_eos" in r.text
    r = httpx.post(served.url + "/v1/chat/completions", headers=AUTH, json=body | {
        "ignore_eos": True, "response_format": {"type": "json_object"}})
    assert r.status_code == 400 and r.json()["error"]["param"] == "ignore_eos"


def test_serve_flags_reach_the_engine_process_and_the_in_process_engine(tmp_path):
    ckpt = build_checkpoint(tmp_path / MODEL)
    auto = ["--auto-config", '{"modes": ["ar"], "smaller_blocks": false}', "--log-level", "warning"]
    ids = prompt_ids(5)
    srv = Served(["--model", str(ckpt), "--kv-cache-tokens", "2048", *auto], cwd=tmp_path)  # a core process
    try:
        assert srv.wait_ready(), srv.stop()[1]
        assert cached(complete_open(srv.url, ids)) == 0
        assert cached(complete_open(srv.url, ids)) == (len(ids) - 1) // PAGE * PAGE
        assert scrape(srv.url)["trimode_prefix_cache_hits_total"] == (len(ids) - 1) // PAGE * PAGE
        r = httpx.post(srv.url + "/admin/reset_prefix_cache", json={}, timeout=30)  # reaches the core
        assert r.status_code == 200 and r.json()["pages_dropped"] >= len(ids) // PAGE
        m = scrape(srv.url)
        assert m["trimode_kv_pages_cached"] == 0 and m["trimode_kv_pages_free"] == 2048 // PAGE
        assert cached(complete_open(srv.url, ids)) == 0
    finally:
        code, err = srv.stop()
    assert "Traceback" not in err, err
    srv = Served(["--model", str(ckpt), "--no-prefix-cache", "--no-engine-process", *auto], cwd=tmp_path)
    try:
        assert srv.wait_ready(), srv.stop()[1]
        complete_open(srv.url, ids)
        assert cached(complete_open(srv.url, ids)) == 0
        assert scrape(srv.url)["trimode_prefix_cache_hits_total"] == 0
    finally:
        code, err = srv.stop()
    assert "Traceback" not in err, err


def complete_open(url: str, prompt) -> dict:
    r = httpx.post(url + "/v1/completions", json={"model": MODEL, "prompt": prompt, "max_tokens": 2, "mode": "ar"},
                   timeout=120)
    assert r.status_code == 200, r.text
    return r.json()


def test_bench_serve_agent_workload_compares_cache_off_and_on(tmp_path):
    ckpt = build_checkpoint(tmp_path / MODEL, context=4096)  # the agent prompts are longer than the default context
    out = tmp_path / "agent.md"
    r = subprocess.run(trimode_cmd("bench", "serve", "--workload", "agent", "--model", str(ckpt), "--max-tokens",
                                   "4", "--conversations", "2", "--turns", "2", "--threads", "1", "--out", str(out)),
                       capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-2000:]
    rows = {line.split("|")[2].strip(): [c.strip() for c in line.split("|")[1:-1]]
            for line in out.read_text().splitlines() if line.startswith("| ar |")}
    off, on = rows["off"], rows["on"]
    assert off[2] == on[2] and off[3] == off[2] and off[4] == "0%"  # the same prompts; off computes them all
    # the second turns come from the cache (their first turn's pages); the shared system prompt too when the two
    # first turns do not start in the same step (then both compute it: about 54% of `off`, as on a loaded machine)
    assert int(on[3]) < 0.6 * int(off[3]) and on[8] == off[8] == "yes"
    bad = subprocess.run(trimode_cmd("bench", "serve", "--workload", "agents"), capture_output=True, text=True)
    assert bad.returncode == 2 and "--workload: choose load or agent" in bad.stderr
