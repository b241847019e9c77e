"""A route's `priority`: which of the modes the route allows runs a request that names none.

    latency                    the allowed mode with the fewest measured seconds per output token at the
                               current load (modes not measured yet are tried first, widest first: diffusion)
    cost_and_speed             the allowed mode with the most measured output tokens per forward pass (the
                               paper's efficiency measure: a forward pass is the unit of cost, at any load)
    accuracy_and_auditability  the route's own mode, which the policy guarantees is lossless (exact AR output);
                               the server keeps the answer's log-probabilities in the audit record
    balanced                   `auto` where the route allows it (the engine picks a lossless mode per step from
                               the load), else the route's mode
    (none)                     the route's mode

The measurements come from the server's own finished generations of every request, routed or not
(`ModeMeter.observe`), kept per mode *and knobs* (a diffusion block of 4 and one of 32 are different choices),
so they hold for this model and this machine. Seconds per token depend on the load: they are kept per load
level (rows running or waiting, this request included, rounded up to a power of two) and read from the nearest
level measured. Every `explore_every`-th decision of a route goes to the runner-up instead, so a mode that got
faster is noticed.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field

from trimode.decode.modes import try_order
from trimode.serve.policy import Route

# Cold-start order (`trimode.decode.modes.try_order`): the order modes are tried in before each has `min_samples`
# measurements. Latency tries the widest passes (most tokens per forward) first; cost_and_speed the same, as its
# measure is tokens per forward.
Setting = tuple[str, tuple]  # (mode, its knobs as sorted items): what a measurement is of


def load_level(rows: int) -> int:
    """Rows sharing the engine (this request included), rounded up to a power of two: 1, 2, 4, 8, ..."""
    return 1 << (max(rows, 1) - 1).bit_length()


@dataclass
class Decision:
    mode: str
    reason: str
    load: int  # rows running or waiting when the request arrived, itself included
    estimates: dict[str, float | None] = field(default_factory=dict)  # per allowed mode, in the measure used
    measure: str | None = None  # "seconds_per_token" or "tokens_per_forward"

    def as_dict(self) -> dict:
        return {"mode": self.mode, "reason": self.reason, "load": self.load, "measure": self.measure,
                "estimates": self.estimates}


class ModeMeter:
    """Running averages of what each mode achieved: seconds per output token per load level, and tokens per
    forward pass. Thread-safe (plans are made off the event loop)."""

    def __init__(self, weight: float = 0.3, min_samples: int = 2, explore_every: int = 16,
                 max_entries: int = 4096) -> None:
        self.weight = weight  # of a new observation in the moving average
        self.min_samples = min_samples
        self.explore_every = explore_every
        self.max_entries = max_entries  # per table: knobs come from requests, so settings are unbounded
        self._seconds: dict[tuple[Setting, int], tuple[float, int]] = {}  # (setting, level) -> (average, count)
        self._tpf: dict[Setting, tuple[float, int]] = {}
        self._decisions: dict[str, int] = {}  # per route
        self._lock = threading.Lock()

    def _update(self, table: dict, key, value: float) -> None:
        if key not in table and len(table) >= self.max_entries:
            del table[next(iter(table))]  # the oldest setting goes: a client cycling knobs cannot grow memory
        average, count = table.get(key, (value, 0))
        table[key] = (average + self.weight * (value - average) if count else value, count + 1)

    def observe(self, mode: str, knobs: dict, rows: int, seconds: float, tokens: int, forwards: int) -> None:
        if tokens < 1 or forwards < 1 or seconds <= 0:
            return  # a cancelled or empty generation says nothing about speed
        setting = (mode, tuple(sorted(knobs.items())))
        with self._lock:
            self._update(self._seconds, (setting, load_level(rows)), seconds / tokens)
            self._update(self._tpf, setting, tokens / forwards)

    def seconds_per_token(self, mode: str, knobs: dict, rows: int) -> tuple[float | None, int]:
        """(average, count) at the measured level nearest to this load (count 0: never measured)."""
        setting, level = (mode, tuple(sorted(knobs.items()))), load_level(rows)
        with self._lock:
            counts = {lv: n for (s, lv), (_, n) in self._seconds.items() if s == setting}
            measured = [(abs(lv.bit_length() - level.bit_length()), lv) for lv, n in counts.items()
                        if n >= self.min_samples]
            if not measured:
                return None, sum(counts.values())
            return self._seconds[(setting, min(measured)[1])]

    def tokens_per_forward(self, mode: str, knobs: dict) -> tuple[float | None, int]:
        with self._lock:
            average, count = self._tpf.get((mode, tuple(sorted(knobs.items()))), (None, 0))
        return average, count

    def decide(self, route: Route, rows: int, knobs_of: Callable[[str], dict] = lambda mode: {}) -> Decision:
        """The mode a request of `route` without a mode of its own runs, with `rows` sharing the engine;
        `knobs_of(mode)`: the knobs the request would run that mode with."""
        priority = route.priority
        if priority in (None, "accuracy_and_auditability"):
            reason = "the route's mode" if priority is None else "the route's lossless mode: exact AR output, " \
                                                                  "log-probabilities kept in the audit record"
            return Decision(route.mode, reason, rows)
        if priority == "balanced":
            if route.permits("auto"):
                return Decision("auto", "auto: the engine picks a lossless mode every step from the load", rows)
            return Decision(route.mode, "the route's mode (it does not allow auto)", rows)

        candidates = try_order(route.modes)
        if len(candidates) == 1:
            return Decision(route.mode, "the only mode the route allows", rows)
        if priority == "latency":
            measure, lower_is_better = "seconds_per_token", True
            measured = {m: self.seconds_per_token(m, knobs_of(m), rows) for m in candidates}
        else:  # cost_and_speed
            measure, lower_is_better = "tokens_per_forward", False
            measured = {m: self.tokens_per_forward(m, knobs_of(m)) for m in candidates}
        estimates = {m: None if v is None else round(v, 6) for m, (v, _) in measured.items()}
        fresh = [m for m in candidates if measured[m][0] is None or measured[m][1] < self.min_samples]
        if fresh:
            return Decision(fresh[0], f"measuring {fresh[0]} ({measured[fresh[0]][1]} of {self.min_samples} "
                                      "finished requests)", rows, estimates, measure)
        ranked = sorted(candidates, key=lambda m: measured[m][0], reverse=not lower_is_better)
        with self._lock:
            n = self._decisions[route.name] = self._decisions.get(route.name, 0) + 1
        if len(ranked) > 1 and self.explore_every and n % self.explore_every == 0:
            return Decision(ranked[1], f"re-measuring the runner-up (every {self.explore_every}th decision)", rows,
                            estimates, measure)
        what = ("fewest seconds per output token at this load" if lower_is_better
                else "most output tokens per forward pass")
        return Decision(ranked[0], what, rows, estimates, measure)
