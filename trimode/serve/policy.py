"""The routing policy (`--policy FILE`) and the audit log.

A policy file maps route names to a decoding mode, default knobs, a priority and a human-review level
(docs/policy.article.yaml is the article's file):

    ai_generation_policy:
      coding_autocomplete:   {mode: diffusion, priority: latency, human_review: optional}
      internal_summary:      {mode: self_speculative, priority: cost_and_speed, human_review: sample_based}
      legal_contract_clause: {mode: autoregressive_verified, priority: accuracy_and_auditability,
                              human_review: required}
      customer_response:     {mode: self_speculative, priority: balanced,
                              human_review: required_for_high_risk_cases}
    default_route: internal_summary        # optional: the route of requests that name none

Route fields: `mode` (required), `allow_modes` (other modes the route allows: a request may name them, and the
priority chooses among them; default only the route's), `priority` (latency | cost_and_speed |
accuracy_and_auditability | balanced: how the mode is chosen when the request names none, see
`trimode.serve.priority`), `human_review` (optional | sample_based | required | required_for_high_risk_cases;
default optional), `knobs` (any mode's knobs from the registry `trimode.decode.modes`: the route's
defaults), `review_sample_rate` (share of sample_based requests flagged for review; default 0.1).

`autoregressive_verified` guarantees output identical to AR decoding: the route runs `ar`, and may allow the
self-speculative modes (`linear_spec`, `quadratic_spec`, `auto`), which then run at temperature 0, where they
emit exactly the AR tokens. `diffusion` cannot be allowed there. Priority `accuracy_and_auditability` makes a
route verified the same way and keeps each answer's log-probabilities in its audit record.
`required_for_high_risk_cases` flags a request for review when its risk (`risk` in the body or the
X-Trimode-Risk header) is high, or not given.
`self_speculative` (as a mode or in allow_modes) is the self-speculative family: the route runs `linear_spec`
and allows `quadratic_spec` and `auto` too.
Every error names the file and the line at fault, so a bad policy stops the server at start-up.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import yaml

from trimode.decode.modes import KNOB_NAMES, MODES, ModelDefaults, names, resolve_knobs

REQUEST_MODES = names()
MODE_ALIASES = {
    "ar": "ar",
    "autoregressive": "ar",
    "autoregressive_verified": "ar",
    "diffusion": "diffusion",
    "linear_spec": "linear_spec",
    "self_speculative": "linear_spec",
    "quadratic_spec": "quadratic_spec",
    "auto": "auto",
}
# `self_speculative` names the family, not one variant: the route runs `linear_spec` and also allows the other
# self-speculative modes, so its priority can choose among them (cost_and_speed: the most tokens per forward;
# balanced: `auto`, which picks AR or a speculative variant every step from the load). All are lossless.
FAMILIES = {"self_speculative": frozenset({"linear_spec", "quadratic_spec", "auto"})}
# Modes whose output is exactly the AR output: self-speculation verifies every token against the AR choice, and
# the engine's `auto` switches between AR and self-speculation. The server runs them greedy on verified routes.
VERIFIED_MODES = frozenset(names(lossless=True))
REVIEW_LEVELS = ("optional", "sample_based", "required", "required_for_high_risk_cases")
PRIORITIES = ("latency", "cost_and_speed", "accuracy_and_auditability", "balanced")
RISKS = ("low", "medium", "high")
ROUTE_FIELDS = ("mode", "priority", "human_review", "allow_modes", "knobs", "review_sample_rate")


class PolicyError(ValueError):
    """A policy file that cannot be used; the message names the file and line."""


@dataclass(frozen=True)
class Route:
    name: str
    mode: str  # canonical: ar, diffusion, linear_spec, quadratic_spec or auto
    verified: bool  # output must equal AR output
    human_review: str
    priority: str | None = None
    allow_modes: frozenset[str] = frozenset()
    knobs: dict = field(default_factory=dict)
    review_sample_rate: float = 0.1

    def permits(self, mode: str) -> bool:
        return mode == self.mode or mode in self.allow_modes

    @property
    def modes(self) -> list[str]:
        """Every mode the route allows, its own first."""
        return [self.mode, *sorted(self.allow_modes - {self.mode})]

    @property
    def audited(self) -> bool:
        """Whether each request of the route gets an audit record."""
        return self.human_review != "optional" or self.priority == "accuracy_and_auditability"

    def flags_for_review(self, request_id: str, risk: str | None = None) -> bool:
        """Required: always; required_for_high_risk_cases: when the risk is high or not given (a request that
        does not say is not known to be low-risk); sample_based: a stable `review_sample_rate` share keyed by
        the request id."""
        if self.human_review == "required":
            return True
        if self.human_review == "required_for_high_risk_cases":
            return risk in (None, "high")
        if self.human_review == "sample_based":
            draw = int(hashlib.sha256(request_id.encode()).hexdigest()[:8], 16) / 2**32
            return draw < self.review_sample_rate
        return False


@dataclass(frozen=True)
class Policy:
    routes: dict[str, Route]
    default_route: str | None = None
    source: str = "<policy>"

    def route(self, name: str | None) -> Route | None:
        """The named route (KeyError when unknown), the default route, or None."""
        if name is None:
            return self.routes[self.default_route] if self.default_route else None
        return self.routes[name]


def _fail(source: str, node: yaml.Node | None, message: str) -> PolicyError:
    line = f":{node.start_mark.line + 1}" if node is not None else ""
    return PolicyError(f"{source}{line}: {message}")


def _mapping(source: str, node: yaml.Node, what: str) -> dict[str, tuple[yaml.Node, yaml.Node]]:
    """A mapping node as {key: (key node, value node)}, rejecting duplicate and non-string keys."""
    if not isinstance(node, yaml.MappingNode):
        raise _fail(source, node, f"{what} must be a mapping")
    out: dict[str, tuple[yaml.Node, yaml.Node]] = {}
    for key_node, value_node in node.value:
        if not isinstance(key_node, yaml.ScalarNode):
            raise _fail(source, key_node, f"{what}: keys must be plain names")
        key = key_node.value
        if key in out:
            raise _fail(source, key_node, f"{what}: duplicate key {key!r}")
        out[key] = (key_node, value_node)
    return out


def _value(source: str, node: yaml.Node):
    """The Python value of a node, built by the safe constructor (no tags that run code)."""
    try:
        return yaml.SafeLoader("").construct_object(node, deep=True)
    except yaml.YAMLError as e:
        raise _fail(source, node, str(e).splitlines()[0]) from None


def _parse_route(source: str, name: str, node: yaml.Node) -> Route:
    fields = _mapping(source, node, f"route {name!r}")
    for key, (key_node, _) in fields.items():
        if key not in ROUTE_FIELDS:
            raise _fail(source, key_node, f"route {name!r}: unknown field {key!r} (allowed: {', '.join(ROUTE_FIELDS)})")
    if "mode" not in fields:
        raise _fail(source, node, f"route {name!r}: missing field 'mode'")
    mode_node = fields["mode"][1]
    raw_mode = _value(source, mode_node)
    if raw_mode not in MODE_ALIASES:
        raise _fail(source, mode_node,
                    f"route {name!r}: unknown mode {raw_mode!r} (choose from {', '.join(MODE_ALIASES)})")
    mode, verified = MODE_ALIASES[raw_mode], raw_mode == "autoregressive_verified"
    family = set(FAMILIES.get(raw_mode, ()))

    review = "optional"
    if "human_review" in fields:
        review_node = fields["human_review"][1]
        review = _value(source, review_node)
        if review not in REVIEW_LEVELS:
            raise _fail(source, review_node,
                        f"route {name!r}: human_review must be one of {', '.join(REVIEW_LEVELS)}, got {review!r}")

    priority = None
    if "priority" in fields:
        priority_node = fields["priority"][1]
        priority = _value(source, priority_node)
        if priority not in PRIORITIES:
            raise _fail(source, priority_node,
                        f"route {name!r}: priority must be one of {', '.join(PRIORITIES)}, got {priority!r}")
        # Exact AR output is what the priority promises: the route is verified like autoregressive_verified.
        verified = verified or priority == "accuracy_and_auditability"

    allow: set[str] = family
    if "allow_modes" in fields:
        allow_node = fields["allow_modes"][1]
        items = allow_node.value if isinstance(allow_node, yaml.SequenceNode) else None
        if items is None:
            raise _fail(source, allow_node, f"route {name!r}: allow_modes must be a list of modes")
        for item in items:
            m = _value(source, item)
            if m not in MODE_ALIASES:
                raise _fail(source, item, f"route {name!r}: unknown mode {m!r} in allow_modes")
            allow |= {MODE_ALIASES[m], *FAMILIES.get(m, ())}
    if verified:
        bad = sorted((allow | {mode}) - VERIFIED_MODES)
        if bad:
            what = "autoregressive_verified" if raw_mode == "autoregressive_verified" else \
                "priority accuracy_and_auditability"
            raise _fail(source, fields["allow_modes"][1] if "allow_modes" in fields else mode_node,
                        f"route {name!r}: {what} cannot allow {', '.join(bad)} "
                        f"(its output is not the AR output); allowed: {', '.join(sorted(VERIFIED_MODES))}")

    knobs: dict = {}
    if "knobs" in fields:
        for key, (key_node, value_node) in _mapping(source, fields["knobs"][1], f"route {name!r} knobs").items():
            if key not in KNOB_NAMES:
                raise _fail(source, key_node, f"route {name!r}: unknown knob {key!r} (known: {', '.join(KNOB_NAMES)})")
            value = _value(source, value_node)
            try:  # the registry's own validation, in a mode that reads the knob
                takes = next(m for m, spec in MODES.items() if key in spec.knob_names)
                resolve_knobs(takes, ModelDefaults(has_drafter=True), **{key: value})
            except (TypeError, ValueError) as e:
                raise _fail(source, value_node, f"route {name!r}: knob {key}: {e}") from None
            knobs[key] = value

    rate = 0.1
    if "review_sample_rate" in fields:
        rate_node = fields["review_sample_rate"][1]
        rate = _value(source, rate_node)
        if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0 <= rate <= 1:
            raise _fail(source, rate_node, f"route {name!r}: review_sample_rate must be a number in [0, 1]")
    return Route(name, mode, verified, review, priority, frozenset(allow), knobs, float(rate))


def parse_policy(text: str, source: str = "<policy>") -> Policy:
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
        where = f":{mark.line + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise PolicyError(f"{source}{where}: invalid YAML: {problem}") from None
    if root is None:
        raise PolicyError(f"{source}: the policy file is empty")
    top = _mapping(source, root, "the policy file")
    for key, (key_node, _) in top.items():
        if key not in ("ai_generation_policy", "default_route"):
            raise _fail(source, key_node,
                        f"unknown top-level key {key!r} (expected ai_generation_policy, default_route)")
    if "ai_generation_policy" not in top:
        raise _fail(source, root, "missing top-level key 'ai_generation_policy'")
    routes_node = top["ai_generation_policy"][1]
    routes = {name: _parse_route(source, name, node)
              for name, (_, node) in _mapping(source, routes_node, "ai_generation_policy").items()}
    if not routes:
        raise _fail(source, routes_node, "ai_generation_policy defines no routes")
    default = None
    if "default_route" in top:
        default_node = top["default_route"][1]
        default = _value(source, default_node)
        if default not in routes:
            raise _fail(source, default_node, f"default_route {default!r} is not a route of ai_generation_policy")
    return Policy(routes, default, source)


def load_policy(path: str | Path) -> Policy:
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise PolicyError(f"cannot read policy file {path}: {e.strerror}") from None
    return parse_policy(text, str(path))


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


class AuditLog:
    """Append-only JSON lines, one per reviewed request, written and fsynced before the response leaves."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        with open(self.path, "a", encoding="utf-8"):
            pass  # fail at start-up, not on the first reviewed request, when the file cannot be written

    def record(self, *, route: str, mode: str, request_id: str, prompts: list[str], outputs: list[str], review: str,
               flagged: bool, finish_reasons: list[str], endpoint: str, model: str, priority: str | None = None,
               decision: dict | None = None, risk: str | None = None,
               logprobs: list[list[float]] | None = None) -> dict:
        """One line; `logprobs` (per choice, the log-probability of each output token under the AR distribution)
        for routes whose priority is accuracy_and_auditability."""
        entry = {
            "time": datetime.now(timezone.utc).isoformat(timespec="milliseconds"),
            "route": route,
            "mode": mode,
            "request_id": request_id,
            "endpoint": endpoint,
            "model": model,
            "prompt_sha256": [sha256_text(p) for p in prompts],
            "output_sha256": [sha256_text(o) for o in outputs],
            "finish_reasons": finish_reasons,
            "human_review": review,
            "review_flag": flagged,
            "risk": risk,
            "priority": priority,
            "decision": decision,
        }
        if logprobs is not None:
            entry["logprobs"] = logprobs
        line = json.dumps(entry, ensure_ascii=False) + "\n"
        with self._lock, open(self.path, "a", encoding="utf-8") as f:
            f.write(line)
            f.flush()
            os.fsync(f.fileno())
        return entry
