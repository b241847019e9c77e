"""The routing policy file (errors name the line at fault), review sampling and the audit log."""

from __future__ import annotations

import json
import threading

import pytest

from trimode.serve.policy import AuditLog, PolicyError, load_policy, parse_policy, sha256_text

ISSUE_EXAMPLE = """\
ai_generation_policy:
  coding_autocomplete: {mode: diffusion, priority: latency, human_review: optional}
  internal_summary:    {mode: self_speculative, priority: cost_and_speed, human_review: sample_based}
  legal_contract_clause: {mode: autoregressive_verified, priority: accuracy_and_auditability, human_review: required}
"""


def test_the_issue_example_parses():
    policy = parse_policy(ISSUE_EXAMPLE)
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
    ("ai_generation_policy:\n  a:\n    mode: ar\n    knobs:\n      block_length: 0\n", 5, "block_length 0 is too small"),
    ("ai_generation_policy:\n  a:\n    mode: ar\n    knobs:\n      blocks: 4\n", 5, "unknown knob 'blocks'"),
    ("ai_generation_policy:\n  a:\n    mode: ar\n    knobs:\n      steps: 0\n", 5, "steps must be an integer >= 1"),
    ("ai_generation_policy:\n  a:\n    mode: ar\n    knobs: {use_drafter: 1}\n", 4, "use_drafter must be true or false"),
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
