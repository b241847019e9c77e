"""Fuzzing the real server (uvicorn, the real engine, the article's policy) against its own OpenAPI schema:
schemathesis makes schema-valid and schema-violating requests for every operation, and hypothesis makes raw
bodies (arbitrary bytes, arbitrary JSON, valid requests with hostile values). At least 1,000 requests; not one
may be answered with a 5xx, and the server must be healthy and serving afterwards.

Bounded in time for CI: a tiny model with a 64-token context (every generation is short) and a fixed number of
examples. The examples are derandomized, so CI runs the same 1,000+ requests each time; set TRIMODE_FUZZ_EXAMPLES
to run more, and TRIMODE_FUZZ_RANDOM=1 to draw new ones.
"""

from __future__ import annotations

import json
import os
import time
from collections import Counter
from pathlib import Path

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from schemathesis.generation import GenerationMode

import trimode
from tests.test_serve_api import MODEL, ServerThread, build_checkpoint
from trimode.engine import Engine
from trimode.serve.app import ServerConfig, create_app
from trimode.serve.policy import AuditLog, load_policy

ARTICLE = Path(__file__).parent.parent / "docs" / "policy.article.yaml"
EXAMPLES = int(os.environ.get("TRIMODE_FUZZ_EXAMPLES", "220"))  # per operation and generation mode
SETTINGS = settings(max_examples=EXAMPLES, deadline=None, database=None, phases=[Phase.generate, Phase.shrink],
                    derandomize=not os.environ.get("TRIMODE_FUZZ_RANDOM"), suppress_health_check=list(HealthCheck))


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fuzz")
    tm = trimode.load(build_checkpoint(tmp / MODEL, context=64))
    config = ServerConfig(MODEL, default_max_tokens=4, policy=load_policy(ARTICLE),
                          audit_log=AuditLog(tmp / "audit.jsonl"))
    engine = Engine(tm)
    with ServerThread(create_app(engine, config)) as srv:
        srv.engine = engine
        srv.statuses = Counter()
        yield srv


def record(served, status: int, what) -> None:
    served.statuses[status] += 1
    assert status < 500, f"{status} for {what}"


def operations(served) -> list:
    schema = schemathesis.openapi.from_url(served.url + "/openapi.json")
    return [op.ok() for op in schema.get_all_operations()]


def test_fuzz_the_schema_with_schemathesis(served):
    ops = operations(served)
    assert {op.path for op in ops} >= {"/v1/completions", "/v1/chat/completions", "/v1/models", "/health"}
    with httpx.Client(base_url=served.url, timeout=120) as http:
        for op in ops:
            for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
                takes = op.definition.raw.get("requestBody") or op.definition.raw.get("parameters")
                if mode is GenerationMode.NEGATIVE and (op.method.upper() == "GET" or not takes):
                    continue  # nothing to get wrong (a GET, or a POST without a body such as the cache reset)

                @SETTINGS
                @given(case=op.as_strategy(generation_mode=mode))
                def check(case):
                    kwargs = case.as_transport_kwargs(base_url=served.url)
                    r = http.request(kwargs["method"], kwargs["url"], headers=kwargs.get("headers"),
                                     content=body_bytes(kwargs), params=kwargs.get("params"))
                    record(served, r.status_code, case.as_curl_command())

                check()


def body_bytes(kwargs: dict) -> bytes | None:
    """The body schemathesis means to send, as bytes (it hands JSON bodies over as Python values)."""
    if "json" in kwargs:
        return json.dumps(kwargs["json"], allow_nan=True).encode()
    data = kwargs.get("data")
    return data.encode() if isinstance(data, str) else data


JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(),
                    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
                    max_leaves=12)
HOSTILE = (st.integers() | st.integers(min_value=2**62, max_value=2**80) | st.floats() | st.booleans()
           | st.text(max_size=40) | st.none() | st.lists(st.integers(), max_size=5) | st.just(-1) | st.just(0))
FIELDS = ("max_tokens", "temperature", "top_p", "top_k", "seed", "n", "stop", "stream", "logprobs", "echo",
          "mode", "route", "risk", "block_length", "threshold", "causal_context", "use_drafter", "provisional",
          "frequency_penalty", "presence_penalty", "logit_bias", "user", "best_of", "suffix", "prompt_logprobs")


@st.composite
def mutated(draw) -> tuple[str, bytes]:
    """A valid request with a few fields set to hostile values (and, sometimes, the prompt too)."""
    chat = draw(st.booleans())
    body: dict = {"model": MODEL, "max_tokens": draw(st.integers(1, 8))}
    if chat:
        body["messages"] = [{"role": "user", "content": draw(st.text(min_size=1, max_size=30))}]
    else:
        body["prompt"] = draw(st.text(min_size=1, max_size=30) | st.lists(st.integers(0, 300), min_size=1, max_size=8)
                              | HOSTILE)
    for name in draw(st.lists(st.sampled_from(FIELDS), max_size=3, unique=True)):
        body[name] = draw(HOSTILE | st.sampled_from(["ar", "diffusion", "linear_spec", "quadratic_spec", "auto",
                                                     "coding_autocomplete", "legal_contract_clause", "high"]))
    return ("/v1/chat/completions" if chat else "/v1/completions"), json.dumps(body, allow_nan=True).encode()


@st.composite
def raw_bodies(draw) -> tuple[str, bytes]:
    path = draw(st.sampled_from(["/v1/completions", "/v1/chat/completions"]))
    body = draw(st.binary(max_size=64) | JSON.map(lambda v: json.dumps(v, allow_nan=True).encode()))
    return path, body


def test_fuzz_raw_bodies_with_hypothesis(served):
    with httpx.Client(base_url=served.url, timeout=120) as http:
        for strategy in (raw_bodies(), mutated()):

            @SETTINGS
            @given(request=strategy)
            def check(request):
                path, body = request
                r = http.post(path, content=body, headers={"Content-Type": "application/json"})
                record(served, r.status_code, body[:200])
                if r.status_code >= 400:
                    assert set(r.json()["error"]) == {"message", "type", "param", "code"}

            check()


def test_at_least_1000_requests_no_5xx_and_healthy_after(served):
    total = sum(served.statuses.values())
    assert total >= 1000 or EXAMPLES < 220, served.statuses
    assert not [s for s in served.statuses if s >= 500], served.statuses
    assert served.statuses[200] > 50, served.statuses  # the fuzz also reached generation, not only the validators
    deadline = time.time() + 30
    while served.engine.stats()["running_requests"] or served.engine.stats()["queue_depth"]:
        assert time.time() < deadline, served.engine.stats()
        time.sleep(0.1)
    assert httpx.get(served.url + "/health", timeout=10).json()["status"] == "ok"
    r = httpx.post(served.url + "/v1/completions", json={"model": MODEL, "prompt": "Hello", "max_tokens": 4},
                   timeout=60)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] > 0
    print(f"fuzz: {total} requests, statuses {dict(sorted(served.statuses.items()))}")
