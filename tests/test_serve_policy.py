"""The routing policy file (errors name the line at fault), review sampling and the audit log."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest

from trimode.serve.policy import AuditLog, PolicyError, load_policy, parse_policy, sha256_text
from trimode.serve.priority import ModeMeter, load_level

# A policy written in its readers' words: `self_speculative` names linear_spec,
# `autoregressive_verified` AR with verification.
WORDED_POLICY = """\
ai_generation_policy:
  coding_autocomplete: {mode: diffusion, priority: latency, human_review: optional}
  internal_summary:    {mode: self_speculative, priority: cost_and_speed, human_review: sample_based}
  legal_contract_clause: {mode: autoregressive_verified, priority: accuracy_and_auditability, human_review: required}
"""


def test_a_policy_in_mode_aliases_parses():
    policy = parse_policy(WORDED_POLICY)
    code, summary, legal = (policy.routes[n] for n in ("coding_autocomplete", "internal_summary",
                                                        "legal_contract_clause"))
    assert (code.mode, code.human_review, code.verified) == ("diffusion", "optional", False)
    assert (summary.mode, summary.human_review, summary.priority) == ("linear_spec", "sample_based", "cost_and_speed")
    assert (legal.mode, legal.human_review, legal.verified) == ("ar", "required", True)
    assert policy.route(None) is None  # no default_route: unrouted requests use the server's defaults
    with pytest.raises(KeyError):
        policy.route("nope")


def test_block_style_with_knobs_allow_modes_and_default_route():
    policy = parse_policy("""\
ai_generation_policy:
  fast:
    mode: diffusion
    knobs:
      block_length: 16
      threshold: 0.8
      causal_context: false
  careful:
    mode: autoregressive_verified
    human_review: required
    allow_modes: [self_speculative]
default_route: careful
""")
    assert policy.routes["fast"].knobs == {"block_length": 16, "threshold": 0.8, "causal_context": False}
    careful = policy.route(None)
    assert careful.name == "careful" and careful.permits("linear_spec") and careful.permits("ar")
    assert not careful.permits("diffusion")
    assert not policy.routes["fast"].permits("ar")


@pytest.mark.parametrize("text, line, needle", [
    ("ai_generation_policy:\n  a: {mode: diffusion}\n  b: {mode: turbo}\n", 3, "unknown mode 'turbo'"),
    ("ai_generation_policy:\n  a: {mode: ar\n  b: x\n", 3, "invalid YAML"),
    ("ai_generation_policy:\n  a: {mode: ar}\n  a: {mode: diffusion}\n", 3, "duplicate key 'a'"),
    ("ai_generation_policy:\n  a: {mode: ar, colour: red}\n", 2, "unknown field 'colour'"),
    ("ai_generation_policy:\n  a:\n    human_review: always\n    mode: ar\n", 3, "human_review must be one of"),
    ("ai_generation_policy:\n  a:\n    mode: ar\n", None, None),
    ("ai_generation_policy:\n  a:\n    priority: x\n", 3, "missing field 'mode'"),
    ("ai_generation_policy:\n  a:\n    mode: autoregressive_verified\n    allow_modes: [ar, diffusion]\n", 4,
     "cannot allow diffusion"),
    ("ai_generation_policy:\n  a:\n    mode: ar\n    knobs: {threshold: 1.5}\n", 4, "threshold must be in [0, 1]"),
    ("ai_generation_policy:\n  a:\n    mode: ar\n    knobs:\n      block_length: 0\n", 5, "0 is too small"),
    ("ai_generation_policy:\n  a:\n    mode: ar\n    knobs:\n      blocks: 4\n", 5, "unknown knob 'blocks'"),
    ("ai_generation_policy:\n  a:\n    mode: ar\n    knobs:\n      steps: 0\n", 5, "steps must be an integer >= 1"),
    ("ai_generation_policy:\n  a:\n    mode: ar\n    knobs: {use_drafter: 1}\n", 4, "must be true or false"),
    ("ai_generation_policy:\n  a: {mode: ar}\ndefault_route: b\n", 3, "default_route 'b' is not a route"),
    ("routes:\n  a: {mode: ar}\n", 1, "unknown top-level key 'routes'"),
    ("default_route: a\n", 1, "missing top-level key 'ai_generation_policy'"),
    ("ai_generation_policy: {}\n", 1, "defines no routes"),
    ("ai_generation_policy:\n  a: diffusion\n", 2, "must be a mapping"),
    ("", None, "empty"),
])
def test_policy_errors_name_the_line(text, line, needle):
    if needle is None:
        parse_policy(text, "p.yaml")
        return
    with pytest.raises(PolicyError) as e:
        parse_policy(text, "p.yaml")
    message = str(e.value)
    assert needle in message
    assert message.startswith(f"p.yaml:{line}: " if line else "p.yaml: ")
    assert "\n" not in message


def test_yaml_tags_cannot_run_code(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text("ai_generation_policy:\n  a: {mode: !!python/object/apply:os.system ['echo hi']}\n")
    with pytest.raises(PolicyError) as e:
        load_policy(path)
    assert str(e.value).startswith(f"{path}:2: ")
    with pytest.raises(PolicyError, match="cannot read policy file"):
        load_policy(tmp_path / "missing.yaml")


def test_review_flags():
    policy = parse_policy("""\
ai_generation_policy:
  never: {mode: ar, human_review: optional}
  always: {mode: ar, human_review: required}
  half: {mode: ar, human_review: sample_based, review_sample_rate: 0.5}
  none: {mode: ar, human_review: sample_based, review_sample_rate: 0}
""")
    ids = [f"chatcmpl-{i}" for i in range(400)]
    assert not any(policy.routes["never"].flags_for_review(i) for i in ids)
    assert all(policy.routes["always"].flags_for_review(i) for i in ids)
    assert not any(policy.routes["none"].flags_for_review(i) for i in ids)
    flagged = [policy.routes["half"].flags_for_review(i) for i in ids]
    assert 140 < sum(flagged) < 260
    assert flagged == [policy.routes["half"].flags_for_review(i) for i in ids]  # stable per request id


def test_audit_log_appends_complete_lines_from_many_threads(tmp_path):
    log = AuditLog(tmp_path / "sub" / "audit.jsonl")

    def write(i: int) -> None:
        log.record(route="r", mode="ar", request_id=f"id-{i}", prompts=[f"prompt {i}"], outputs=[f"out {i}"],
                   review="required", flagged=True, finish_reasons=["stop"], endpoint="completions", model="m")

    threads = [threading.Thread(target=write, args=(i,)) for i in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    entries = [json.loads(line) for line in (tmp_path / "sub" / "audit.jsonl").read_text().splitlines()]
    assert sorted(e["request_id"] for e in entries) == sorted(f"id-{i}" for i in range(20))
    e = next(e for e in entries if e["request_id"] == "id-3")
    assert e["prompt_sha256"] == [sha256_text("prompt 3")] and e["output_sha256"] == [sha256_text("out 3")]
    assert e["review_flag"] is True and e["time"].endswith("+00:00")


ARTICLE = Path(__file__).parent.parent / "docs" / "policy.article.yaml"


def test_the_articles_policy_loads_as_written():
    policy = load_policy(ARTICLE)
    routes = policy.routes
    assert list(routes) == ["coding_autocomplete", "internal_summary", "legal_contract_clause", "customer_response"]
    code, summary, legal, customer = routes.values()
    assert (code.mode, code.priority, code.human_review, code.modes) == ("diffusion", "latency", "optional",
                                                                         ["diffusion"])
    family = ["linear_spec", "auto", "quadratic_spec"]  # self_speculative: the route's mode first, then the rest
    assert (summary.mode, summary.priority, summary.human_review, summary.modes) == (
        "linear_spec", "cost_and_speed", "sample_based", family)
    assert (legal.mode, legal.priority, legal.verified) == ("ar", "accuracy_and_auditability", True)
    assert legal.human_review == "required" and legal.audited
    assert (customer.mode, customer.priority, customer.human_review, customer.modes) == (
        "linear_spec", "balanced", "required_for_high_risk_cases", family)
    assert not code.audited and summary.audited and customer.audited


def test_required_for_high_risk_cases_flags_high_or_unstated_risk():
    route = parse_policy("ai_generation_policy:\n  r: {mode: ar, human_review: required_for_high_risk_cases}\n")
    r = route.routes["r"]
    assert [r.flags_for_review(f"id-{i}", "high") for i in range(20)] == [True] * 20
    assert not any(r.flags_for_review(f"id-{i}", risk) for i in range(20) for risk in ("low", "medium"))
    assert r.flags_for_review("id-0", None)  # not known to be low-risk: reviewed


@pytest.mark.parametrize("text, line, needle", [
    ("ai_generation_policy:\n  a:\n    mode: ar\n    priority: speed\n", 4,
     "priority must be one of latency, cost_and_speed, accuracy_and_auditability, balanced, got 'speed'"),
    ("ai_generation_policy:\n  a:\n    mode: diffusion\n    priority: accuracy_and_auditability\n", 3,
     "priority accuracy_and_auditability cannot allow diffusion"),
    ("ai_generation_policy:\n  a:\n    mode: ar\n    priority: accuracy_and_auditability\n"
     "    allow_modes: [diffusion]\n", 5, "priority accuracy_and_auditability cannot allow diffusion"),
    ("ai_generation_policy:\n  a:\n    mode: ar\n    human_review: required_for_low_risk\n", 4,
     "human_review must be one of optional, sample_based, required, required_for_high_risk_cases"),
])
def test_priority_and_review_errors_name_the_line(text, line, needle):
    with pytest.raises(PolicyError) as e:
        parse_policy(text, "p.yaml")
    assert str(e.value).startswith(f"p.yaml:{line}: ") and needle in str(e.value)


def test_accuracy_priority_makes_the_route_verified():
    route = parse_policy("ai_generation_policy:\n  a: {mode: ar, priority: accuracy_and_auditability, "
                         "allow_modes: [linear_spec]}\n").routes["a"]
    assert route.verified and route.audited and route.human_review == "optional"


# -- the priority's decision (trimode.serve.priority) ---------------------------------------------------------

ROUTES = parse_policy("""\
ai_generation_policy:
  fast: {mode: linear_spec, allow_modes: [diffusion, ar], priority: latency}
  cheap: {mode: diffusion, allow_modes: [linear_spec], priority: cost_and_speed}
  exact: {mode: autoregressive_verified, allow_modes: [linear_spec], priority: accuracy_and_auditability}
  mixed: {mode: linear_spec, allow_modes: [auto], priority: balanced}
  plain: {mode: quadratic_spec, allow_modes: [auto], priority: balanced}
  none: {mode: linear_spec, allow_modes: [ar]}
  only: {mode: diffusion, priority: latency}
""").routes


def test_latency_measures_each_mode_then_takes_the_fastest_at_this_load():
    meter = ModeMeter(min_samples=2, explore_every=0)
    tried = []
    for _ in range(6):  # cold start: each allowed mode twice, widest passes first
        d = meter.decide(ROUTES["fast"], rows=1)
        tried.append(d.mode)
        assert d.reason.startswith("measuring")
        spt = {"diffusion": 0.01, "linear_spec": 0.02, "ar": 0.03}[d.mode]
        meter.observe(d.mode, {}, 1, seconds=spt * 10, tokens=10, forwards=5)
    assert tried == ["diffusion"] * 2 + ["linear_spec"] * 2 + ["ar"] * 2
    d = meter.decide(ROUTES["fast"], rows=1)
    assert d.mode == "diffusion" and d.measure == "seconds_per_token"
    assert d.estimates == {"diffusion": 0.01, "linear_spec": 0.02, "ar": 0.03}
    # Under load the measurements differ: at 30 rows (level 32) diffusion got slow.
    for mode, spt in (("diffusion", 0.2), ("linear_spec", 0.1), ("ar", 0.05)):
        for _ in range(2):
            meter.observe(mode, {}, 30, seconds=spt * 10, tokens=10, forwards=10)
    assert meter.decide(ROUTES["fast"], rows=25).mode == "ar"  # 25 rows: level 32, measured
    assert meter.decide(ROUTES["fast"], rows=3).mode == "diffusion"  # level 4: nearest measured is level 1
    assert meter.decide(ROUTES["only"], rows=1).reason == "the only mode the route allows"


def test_cost_and_speed_takes_the_most_tokens_per_forward():
    meter = ModeMeter(min_samples=1, explore_every=0)
    meter.observe("diffusion", {}, 1, seconds=0.1, tokens=12, forwards=4)  # 3 tokens per forward, fast
    meter.observe("linear_spec", {}, 1, seconds=1.0, tokens=12, forwards=3)  # 4 tokens per forward, slow
    d = meter.decide(ROUTES["cheap"], rows=1)
    assert (d.mode, d.measure, d.estimates) == ("linear_spec", "tokens_per_forward",
                                                {"diffusion": 3.0, "linear_spec": 4.0})
    assert meter.decide(ROUTES["fast"], rows=1).reason.startswith("measuring ar")
    # Measurements are per mode and knobs: a request with other knobs measures anew.
    d = meter.decide(ROUTES["cheap"], rows=1, knobs_of=lambda mode: {"block_length": 32})
    assert d.reason.startswith("measuring diffusion") and d.estimates == {"diffusion": None, "linear_spec": None}


def test_the_runner_up_is_remeasured_now_and_then():
    meter = ModeMeter(min_samples=1, explore_every=4)
    for mode, spt in (("diffusion", 0.01), ("linear_spec", 0.02), ("ar", 0.03)):
        meter.observe(mode, {}, 1, seconds=spt, tokens=1, forwards=1)
    picks = [meter.decide(ROUTES["fast"], rows=1).mode for _ in range(8)]
    assert picks == ["diffusion"] * 3 + ["linear_spec"] + ["diffusion"] * 3 + ["linear_spec"]


def test_balanced_accuracy_and_no_priority():
    meter = ModeMeter()
    assert meter.decide(ROUTES["mixed"], 1).mode == "auto"
    assert meter.decide(ROUTES["plain"], 1).mode == "auto"
    d = meter.decide(ROUTES["exact"], 1)
    assert d.mode == "ar" and "exact AR output" in d.reason
    assert meter.decide(ROUTES["none"], 1).mode == "linear_spec"
    assert [load_level(r) for r in (0, 1, 2, 3, 4, 5, 64, 65)] == [1, 1, 2, 4, 4, 8, 64, 128]


def test_the_meter_forgets_the_oldest_settings_beyond_its_bound():
    meter = ModeMeter(min_samples=1, max_entries=8)
    for threshold in range(100):  # a client cycling knob values
        meter.observe("diffusion", {"threshold": threshold / 100}, 1, seconds=0.1, tokens=1, forwards=1)
    assert meter.tokens_per_forward("diffusion", {"threshold": 0.99}) == (1.0, 1)
    assert meter.tokens_per_forward("diffusion", {"threshold": 0.0}) == (None, 0)
    assert len(meter._tpf) == len(meter._seconds) == 8
