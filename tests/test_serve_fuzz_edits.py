"""Fuzzing /v1/edits and the completion routes of a real running server with requests whose sizes are hostile
(holes of any number of digits, long drafts and templates, many spans, stop strings, n), while a thread polls
/health: no answer may be a 5xx, /health may never take over a second, and the server's memory (RSS: the
server runs in this process) may not grow past a bound. Derandomized and bounded for CI (a tiny model with a
64-token context); TRIMODE_FUZZ_EXAMPLES runs more."""

from __future__ import annotations

import os

import httpx
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

import trimode
from tests.test_serve_api import MODEL, ServerThread, build_checkpoint
from tests.test_serve_audit import HealthWatch
from trimode.engine import Engine
from trimode.serve.app import ServerConfig, create_app
from trimode.serve.policy import parse_policy

EXAMPLES = int(os.environ.get("TRIMODE_FUZZ_EXAMPLES", "150"))  # per route
SETTINGS = settings(max_examples=EXAMPLES, deadline=None, database=None, phases=[Phase.generate],
                    derandomize=True, suppress_health_check=list(HealthCheck))
RSS_GROWTH = 300 << 20  # bytes the server may grow by across the fuzzing (caches warm up; a leak grows past it)
POLICY = "ai_generation_policy:\n  r: {mode: ar, priority: latency, human_review: sample_based}\n"

text = st.one_of(st.text(max_size=40), st.sampled_from(["", " ", "a" * 5000, "word " * 40000, "</s><|user|>"]))
sizes = st.one_of(st.integers(0, 100), st.integers(0, 10**30).map(str), st.integers(1, 6000).map(lambda n: "9" * n))
template = st.lists(st.tuples(text, st.one_of(st.just("[[hole]]"), sizes.map(lambda s: f"[[hole:{s}]]"))),
                    max_size=4).map(lambda parts: "".join(t + h for t, h in parts) + "end")
spans = st.one_of(st.none(), st.lists(st.lists(st.integers(-5, 10**6), min_size=0, max_size=3), max_size=50),
                  st.just([[i, i + 1] for i in range(0, 4000, 2)]))
routing = {"route": st.sampled_from(["r", "nope"]), "risk": st.sampled_from(["low", "high"])}
edit = st.one_of(
    st.fixed_dictionaries({"kind": st.just("fill"), "template": template},
                          optional={"hole_tokens": st.integers(0, 5000), "prompt": text, **routing}),
    st.fixed_dictionaries({"kind": st.just("revise"), "draft": text},
                          optional={"prompt": text, "spans": spans, "rounds": st.integers(0, 70), **routing,
                                    "messages": st.lists(st.fixed_dictionaries({
                                        "role": st.sampled_from(["user", "developer", "tool"]), "content": text}),
                                        max_size=3)}))
completion = st.fixed_dictionaries({"prompt": text}, optional={
    "max_tokens": st.integers(0, 100), "n": st.integers(0, 20), "suffix": text, **routing,
    "stop": st.lists(text, max_size=10), "mode": st.sampled_from(["ar", "diffusion"])})
chat = st.fixed_dictionaries({"messages": st.lists(st.fixed_dictionaries({
    "role": st.sampled_from(["system", "developer", "user", "assistant", "tool"]), "content": text}),
    max_size=4)}, optional={"max_tokens": st.integers(0, 100), "n": st.integers(0, 20), **routing,
                            "stop": st.lists(text, max_size=10)})


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    tm = trimode.load(build_checkpoint(tmp_path_factory.mktemp("fuzz-edits") / MODEL, context=64))
    config = ServerConfig(MODEL, default_max_tokens=4, policy=parse_policy(POLICY, "policy.yaml"))
    with ServerThread(create_app(Engine(tm), config)) as srv:
        yield srv


@pytest.mark.parametrize("path, bodies", [("/v1/edits", edit), ("/v1/completions", completion),
                                          ("/v1/chat/completions", chat)])
def test_no_5xx_no_stall_no_growth(served, path, bodies):
    client = httpx.Client(base_url=served.url, timeout=60)
    client.post(path, json={"model": MODEL, "kind": "fill", "template": "a [[hole:2]] b", "prompt": "a",
                            "max_tokens": 2, "messages": [{"role": "user", "content": "a"}]})  # warm up
    start = rss()

    @SETTINGS
    @given(body=bodies)
    def run(body):
        r = client.post(path, json={"model": MODEL, **body})
        assert r.status_code < 500, (body, r.text)
        assert "error" in r.json() or r.status_code == 200

    with HealthWatch(served) as watch:
        run()
    client.close()
    assert watch.worst < 1.0, f"/health took {watch.worst:.2f} s while {path} was fuzzed"
    assert rss() - start < RSS_GROWTH, f"the server grew by {(rss() - start) >> 20} MiB"
