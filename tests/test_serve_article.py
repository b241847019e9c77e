"""The article's routing policy (docs/policy.article.yaml) on the real server with the real `openai` client:
its four routes load as written, each priority decides the mode as documented (`self_speculative` is the
self-speculative family), the per-request risk decides the review of `required_for_high_risk_cases`, and the
route, priority and decision reach the response and the audit
log (with the log-probabilities of accuracy_and_auditability answers)."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import openai
import pytest

import trimode
from tests.test_serve_api import MODEL, ServerThread, build_checkpoint
from trimode.engine import Engine
from trimode.serve.app import ServerConfig, create_app
from trimode.serve.policy import AuditLog, load_policy

ARTICLE = Path(__file__).parent.parent / "docs" / "policy.article.yaml"
MESSAGES = [{"role": "user", "content": "Summarise the meeting notes."}]


@pytest.fixture(scope="module")
def tm(tmp_path_factory):
    return trimode.load(build_checkpoint(tmp_path_factory.mktemp("article") / MODEL), dtype="float64")


@pytest.fixture(scope="module")
def served(tm, tmp_path_factory):
    audit = tmp_path_factory.mktemp("audit") / "audit.jsonl"
    config = ServerConfig(MODEL, default_max_tokens=8, policy=load_policy(ARTICLE), audit_log=AuditLog(audit))
    with ServerThread(create_app(Engine(tm), config)) as srv:
        srv.audit = audit
        yield srv


@pytest.fixture
def client(served) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{served.url}/v1", api_key="unused", max_retries=0, timeout=60)


def audit_lines(served) -> list[dict]:
    return [json.loads(line) for line in served.audit.read_text().splitlines()]


def ask(client, route: str, **extra):
    r = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=8,
                                       extra_body={"route": route, **extra})
    return r, r.model_extra["trimode"]


def until_measured(client, route: str) -> list[dict]:
    """Requests of `route` until its priority has measured every mode it allows; their `trimode` blocks."""
    seen = []
    for _ in range(12):
        _, stats = ask(client, route)
        seen.append(stats)
        if not stats["policy"]["decision"]["reason"].startswith("measuring"):
            return seen
    raise AssertionError(f"{route}: still measuring after {len(seen)} requests: {seen[-1]['policy']}")


def test_coding_autocomplete_runs_diffusion_unaudited(client, served):
    before = len(audit_lines(served))
    _, stats = ask(client, "coding_autocomplete")
    policy = stats["policy"]
    assert (policy["route"], policy["priority"]) == ("coding_autocomplete", "latency")
    assert stats["mode"] == policy["decision"]["mode"] == "diffusion"
    assert policy["decision"]["reason"] == "the only mode the route allows"
    assert len(audit_lines(served)) == before  # human_review optional, priority latency: no record

    # The route's mode may be named; a mode it does not allow is refused.
    _, stats = ask(client, "coding_autocomplete", mode="diffusion")
    assert stats["mode"] == "diffusion" and stats["policy"]["decision"]["reason"] == "named by the request"
    with pytest.raises(openai.PermissionDeniedError):
        ask(client, "coding_autocomplete", mode="ar")


def test_internal_summary_runs_the_self_speculative_mode_with_most_tokens_per_forward(client, served):
    seen = until_measured(client, "internal_summary")
    decision = seen[-1]["policy"]["decision"]
    estimates = decision["estimates"]
    assert decision["measure"] == "tokens_per_forward"
    assert set(estimates) == {"linear_spec", "quadratic_spec", "auto"}  # self_speculative: the family
    assert decision["mode"] == max(estimates, key=estimates.get) == seen[-1]["mode"]
    entry = audit_lines(served)[-1]  # sample_based review: every request recorded, a share flagged
    assert entry["request_id"] == seen[-1]["request_id"] and entry["route"] == "internal_summary"
    assert entry["priority"] == "cost_and_speed" and entry["decision"] == decision
    assert entry["mode"] == decision["mode"] and entry["human_review"] == "sample_based"
    with pytest.raises(openai.PermissionDeniedError):
        ask(client, "internal_summary", mode="diffusion")  # not lossless, not self-speculation


def test_legal_contract_clause_is_exact_ar_always_reviewed_with_logprobs_audited(client, served, tm):
    prompt = tm.tokenizer.apply_chat_template(MESSAGES)
    ar = tm.generate(prompt, mode="ar", max_new_tokens=8).text
    for risk in ("low", "high", None):
        r, stats = ask(client, "legal_contract_clause", **({"risk": risk} if risk else {}))
        assert r.choices[0].message.content == ar and stats["mode"] == "ar" and stats["verified"]
        assert stats["policy"]["priority"] == "accuracy_and_auditability"
        assert stats["review"]["level"] == "required" and stats["review"]["flagged"]
        entry = audit_lines(served)[-1]
        assert entry["request_id"] == r.id and entry["review_flag"]

    # The audit record keeps each output token's logprob: the same numbers the API reports when asked.
    r = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=8, logprobs=True,
                                       extra_body={"route": "legal_contract_clause", "risk": "low"})
    entry = audit_lines(served)[-1]
    assert entry["request_id"] == r.id
    assert entry["logprobs"] == [[t.logprob for t in r.choices[0].logprobs.content]]
    assert len(entry["logprobs"][0]) == r.usage.completion_tokens > 0
    assert entry["decision"]["mode"] == "ar" and entry["priority"] == "accuracy_and_auditability"

    # Streamed too, before the finish chunk.
    chunks = list(client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=8, stream=True,
                                                 extra_body={"route": "legal_contract_clause"}))
    entry = audit_lines(served)[-1]
    assert entry["request_id"] == chunks[0].id
    assert entry["logprobs"] == [[t.logprob for t in r.choices[0].logprobs.content]]  # the same answer


def test_customer_response_review_follows_the_risk(client, served):
    flags = {}
    for risk in ("low", "medium", "high", None):
        r, stats = ask(client, "customer_response", **({"risk": risk} if risk else {}))
        assert stats["review"]["risk"] == risk and stats["review"]["level"] == "required_for_high_risk_cases"
        flags[risk] = stats["review"]["flagged"]
        entry = audit_lines(served)[-1]
        assert entry["request_id"] == r.id and entry["risk"] == risk and entry["review_flag"] == flags[risk]
    assert flags == {"low": False, "medium": False, "high": True, None: True}


def test_risk_header_and_body_the_higher_counts(served):
    url = served.url + "/v1/chat/completions"
    body = {"model": MODEL, "messages": MESSAGES, "max_tokens": 4, "route": "customer_response"}
    for header, field, risk in (("high", "low", "high"), ("low", "high", "high"), ("medium", None, "medium")):
        sent = {**body, **({"risk": field} if field else {})}
        r = httpx.post(url, json=sent, headers={"X-Trimode-Risk": header}, timeout=60)
        assert r.status_code == 200 and r.json()["trimode"]["review"]["risk"] == risk
        assert r.headers["X-Trimode-Review"] == ("flagged" if risk == "high" else "required_for_high_risk_cases")
    r = httpx.post(url, json=body, headers={"X-Trimode-Risk": "severe"}, timeout=60)
    assert r.status_code == 400 and "X-Trimode-Risk header must be one of low, medium, high" in r.text


def test_customer_response_runs_auto(client, served, tm):  # balanced, and the family allows auto
    r, stats = ask(client, "customer_response")
    assert stats["mode"] == "auto" and stats["policy"]["decision"]["mode"] == "auto"
    assert stats["policy"]["priority"] == "balanced"
    prompt = tm.tokenizer.apply_chat_template(MESSAGES)
    assert r.choices[0].message.content == tm.generate(prompt, mode="ar", max_new_tokens=8).text  # auto = AR
    entry = audit_lines(served)[-1]
    assert entry["request_id"] == r.id and entry["route"] == "customer_response" and entry["mode"] == "auto"
