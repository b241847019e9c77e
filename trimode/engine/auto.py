"""`mode: auto`: per step, AR or self-speculation (linear or quadratic), whichever the current load favours.

All three are lossless: a token is only emitted when it is the token AR would choose at that position (greedy,
or sampled with the same keyed noise), so switching between them from one cycle to the next never changes the
output. `auto` therefore emits exactly what `ar` emits, at any load: that keeps the engine batch-invariant.
Diffusion is not a candidate because its output differs from AR's (it would make the output load-dependent).

The speculative modes run with a block length B per cycle: the request's, or (`smaller_blocks`) a power of two
below it; a (mode, B) pair is a *choice*. The state all cycles share: the cache holds every token but the last
emitted one (`pending`), plus optional draft guesses `tail` for the tokens after it (left by a quadratic pass).
One cycle is
- ar:             1 forward of 1 token: the causal next token;
- linear_spec:    2 forwards of B tokens: draft [pending, MASK x B-1] (adapter on), verify causally, accept;
- quadratic_spec: 1 forward of B(B+1) tokens: B groups [leader_j, MASK x B], leaders = pending + tail (drafted
                  by a linear_spec draft pass first when there are fewer than B - 1 guesses); accept the leaders
                  that match the causal predictions, and the masks of the last accepted group become the tail.

The rule (`AutoPolicy.pick`): with R running rows, a choice that emits `a` tokens per cycle in `f` forwards of
`n` tokens per row scores  a / (s * f * (cost(R * n) + R * overhead)),  the tokens per second of one row if all
R rows ran it. cost(tokens) is the forward-time curve measured at start-up (`CostModel.measure`) and refined by
every timed forward; overhead the time per row a step spends outside its forwards (measured online); s the
choice's slowdown, measured at start-up too (`measure_slowdowns`: a cycle of the choice run alone, over the
curve's prediction for it), which holds what the curve does not see (a draft pass's adapter and bidirectional
mask, a quadratic pass's mask, the Python work between forwards); `a` the output tokens per cycle observed so
far (AR: 1). The best score wins, a speculative choice only when it beats AR by `spec_margin`. While R * n is
below the knee of the cost curve a wider pass is nearly free, so speculation wins (a smaller block keeps a
quadratic pass below it longer); above it, or when drafts are not accepted, AR does. Now and then one row runs
the runner-up, so its tokens per cycle stay current.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from trimode.decode import modes as registry
from trimode.decode.auto import AR, Choice, FixedChoice
from trimode.decode.driver import decode
from trimode.decode.sampling import SamplingParams
from trimode.decode.stopping import StopRule
from trimode.model.transformer import NLDTransformer

CANDIDATES = registry.names(lossless=True, engine_only=False)  # what a cycle of auto may run
SMALLER_BLOCKS = (2, 4, 8, 16, 32, 64)


def label(choice: Choice) -> str:
    """How a choice is named in stats and reports: "ar", "quadratic_spec@4"."""
    mode, block = choice
    return mode if mode == "ar" else f"{mode}@{block}"


def tokens_per_row(mode: str, block: int) -> int:
    return registry.pass_tokens(mode, block)


@dataclass
class AutoConfig:
    modes: tuple[str, ...] = CANDIDATES  # candidates; a subset of CANDIDATES
    prior_tokens_per_cycle: float = 2.0  # a speculative choice's tokens per cycle before any cycle was seen
    prior_weight: int = 2  # how many cycles the prior counts for
    ema: float = 0.02  # weight of a new cycle once the estimate has settled
    explore_every: int = 32  # after N engine steps, one row tries the runner-up, to re-measure it (0 = never);
    explore_max: int = 1024  # the wait doubles after every try (up to this), back to explore_every on a switch
    hysteresis: float = 0.05  # switch modes only when another one scores this much better
    spec_margin: float = 0.1  # a speculative mode replaces AR only when it scores this much better than AR
    smaller_blocks: bool = True  # also speculate with blocks of 2, 4, 8, ... below the request's block length
    cost_sizes: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)

    def __post_init__(self) -> None:
        bad = set(self.modes) - set(CANDIDATES)
        if bad or not self.modes:
            raise ValueError(f"auto modes must be a non-empty subset of {CANDIDATES}, got {self.modes}")
        if (min(self.explore_every, self.hysteresis, self.spec_margin) < 0 or self.explore_max < self.explore_every
                or self.prior_tokens_per_cycle < 1):
            raise ValueError("auto needs explore_every >= 0, explore_max >= explore_every, hysteresis >= 0, "
                             "spec_margin >= 0 and prior_tokens_per_cycle >= 1")


class CostModel:
    """Seconds of one forward pass as a function of its token count, interpolated between measured points."""

    def __init__(self, points: list[tuple[int, float]]) -> None:
        self.points = sorted(points)

    @classmethod
    @torch.no_grad()
    def measure(cls, net: NLDTransformer, sizes=AutoConfig.cost_sizes, repeats: int = 3,
                slowest: float = 0.25) -> CostModel:
        """Time causal forwards of n rows x 1 token (AR-like) for each size n.

        Rounds go over all sizes, so a burst of load from other processes hits every size alike; each size
        keeps its fastest run, and a time is never more than that of a larger size (costs grow with n).
        Sizes after the first whose warm-up forward takes over `slowest` seconds are not measured (the curve is
        extended linearly)."""
        sync = torch.cuda.synchronize if net.device.type == "cuda" else (lambda: None)

        rng = torch.Generator().manual_seed(0)  # not the global generator: starting an engine leaves it alone

        def timed(n: int) -> float:
            ids = torch.randint(0, net.config.vocab_size, (n, 1), generator=rng).to(net.device)
            sync()
            t0 = time.perf_counter()
            net(ids, mask="causal")
            sync()
            return time.perf_counter() - t0

        kept = []
        for n in sorted(sizes):  # warm-up round (twice per size), which also picks the sizes worth timing
            kept.append(n)
            if min(timed(n), timed(n)) > slowest:
                break
        best = dict.fromkeys(kept, float("inf"))
        for _ in range(repeats):
            for n in kept:
                best[n] = min(best[n], timed(n))
        points, floor = [], float("inf")
        for n in reversed(kept):
            floor = min(floor, best[n])
            points.append((n, floor))
        if len(points) == 1:
            points.append((2 * points[0][0], 2 * points[0][1]))
        return cls(points)

    def observe(self, tokens: int, seconds: float, weight: float = 0.25) -> None:
        """Move the curve toward a forward timed in service (the nearest point within a factor sqrt 2, or a new
        point): the engine's real shapes, context lengths and machine load then shape the decisions."""
        i = min(range(len(self.points)), key=lambda j: abs(math.log(self.points[j][0] / tokens)))
        n, t = self.points[i]
        if abs(math.log(n / tokens)) > math.log(2) / 2:
            self.points = sorted([*self.points, (tokens, seconds)])
        else:
            self.points[i] = (n, t + weight * (seconds - t))

    def __call__(self, tokens: float) -> float:
        pts = self.points
        if tokens <= pts[0][0]:
            return pts[0][1]
        for (n0, t0), (n1, t1) in zip(pts, pts[1:], strict=False):
            if tokens <= n1:
                return t0 + (t1 - t0) * (tokens - n0) / (n1 - n0)
        (n0, t0), (n1, t1) = pts[-2], pts[-1]
        return t1 + max(t1 - t0, 0.0) / (n1 - n0) * (tokens - n1)  # linear beyond the last point

    def knee(self, factor: float = 1.5) -> int:
        """The largest measured token count whose forward costs at most `factor` x the 1-token forward."""
        base = self.points[0][1]
        return max(n for n, t in self.points if t <= factor * base)

    def as_dict(self) -> dict:
        return {"points": [[n, round(t, 6)] for n, t in self.points], "knee_tokens": self.knee()}


@torch.no_grad()
def measure_slowdowns(net: NLDTransformer, cost: CostModel, block: int, config: AutoConfig | None = None,
                      cycles: int = 16, prompt_tokens: int = 32, budget: float = 0.5,
                      slowest: float = 1.0) -> dict[Choice, float]:
    """Per choice (mode and block length) auto has for requests of this block length: the median seconds of one
    cycle run alone (one row, a random prompt), over what the cost curve predicts for that cycle. Only the time
    is used, so the prompt's content does not matter.

    Bounded in time, so that starting an engine on a large model on a CPU takes seconds, not minutes: after one
    warm-up cycle, a choice runs up to `cycles` cycles or until `budget` seconds of them have run (at least one);
    a choice whose cycle the cost curve predicts above `slowest` seconds is not run at all (it takes the nearest
    measured block length of its mode, `AutoPolicy.slowdown`; such a pass is far above the curve's knee, where
    auto does not pick it anyway)."""
    policy = AutoPolicy(config or AutoConfig(), cost, lambda: 1)
    room = net.config.max_position_embeddings - block * (block + 2)  # what the cache may hold besides scratch
    prompt_tokens = max(1, min(prompt_tokens, room // 2))
    max_new = max(1, min(cycles * block + 1, room - prompt_tokens))
    rng = torch.Generator().manual_seed(0)  # not the global generator: starting an engine leaves it alone
    ids = torch.randint(0, net.config.vocab_size, (1, prompt_tokens), generator=rng).to(net.device)
    out = {}
    for choice in policy.candidates(block):
        if policy.cycle_seconds(choice, rows=1) > slowest:
            continue
        times: list[float] = []
        for wanted in (1, cycles):  # the first run warms the choice's shapes (one cycle after the prompt)
            stream = decode(net, "auto", ids, StopRule(max_new), SamplingParams(), steer=FixedChoice(choice),
                            block_length=block, use_drafter=False)
            times = []
            t = None
            for _event in stream:
                now = time.perf_counter()
                if t is not None:
                    times.append(now - t)
                t = now
                if len(times) == wanted or sum(times) > budget:
                    break
            stream.close()
        if times:  # (none when the context is too short for a second cycle)
            times.sort()
            out[choice] = times[len(times) // 2] / policy.cycle_seconds(choice, rows=1)
    return out


class AutoPolicy:
    """Engine-wide: observed tokens per cycle per choice, the cost curve, the per-row step overhead."""

    def __init__(self, config: AutoConfig, cost: CostModel, load: Callable[[], int]) -> None:
        self.config = config
        self.cost = cost
        self.load = load
        self._lock = threading.Lock()
        self._tokens_per_cycle: dict[Choice, float] = {}
        self._cycles: dict[Choice, int] = {}
        self.overhead_per_row = 0.0  # seconds a step spends outside its forwards, per running row
        self.slowdowns: dict[Choice, float] = {}  # measured / predicted seconds per cycle (measure_slowdowns)
        self._steps = 0
        self._explored = -1  # the last step in which a row tried the runner-up
        self._explore_wait: dict[int, int] = {}  # request block -> steps from one try of the runner-up to the next
        self._explore_next: dict[int, int] = {}  # request block -> the step of the next try
        self._decided: dict[int, tuple[int, Choice, Choice | None]] = {}  # request block -> (step, choice, runner-up)
        self.picks: dict[str, int] = {}

    def candidates(self, block: int) -> list[Choice]:
        """What a request of this block length may run: AR, and each speculative mode with its block length and
        (`smaller_blocks`) the powers of two below it (a smaller block drafts fewer tokens in a narrower pass)."""
        blocks = sorted({b for b in SMALLER_BLOCKS if b < block} | {block}) if self.config.smaller_blocks else [block]
        return [AR if m == "ar" else (m, b) for m in self.config.modes for b in ([1] if m == "ar" else blocks)]

    def tokens_per_cycle(self, choice: Choice) -> float:
        if choice[0] == "ar":
            return 1.0
        return self._tokens_per_cycle.get(choice, self._prior(choice))

    def _prior(self, choice: Choice) -> float:
        """Before any cycle: `prior_tokens_per_cycle`, at most halfway between 1 and a full block."""
        return min(self.config.prior_tokens_per_cycle, (1 + choice[1]) / 2)

    def cycle_seconds(self, choice: Choice, rows: int | None = None) -> float:
        """Predicted seconds of one cycle when all `rows` rows run it: the cost curve and overhead."""
        mode, block = choice
        rows = max(1, self.load() if rows is None else rows)
        forward = self.cost(rows * tokens_per_row(mode, block)) + self.overhead_per_row * rows
        return registry.forwards_per_cycle(mode) * forward

    def slowdown(self, choice: Choice) -> float:
        """How much longer than the cost curve predicts a cycle takes: measured for this choice, else for the
        nearest block length of the same mode, else 1."""
        if choice in self.slowdowns:
            return self.slowdowns[choice]
        near = [(abs(math.log(b / choice[1])), v) for (m, b), v in self.slowdowns.items() if m == choice[0]]
        return min(near)[1] if near else 1.0

    def scores(self, block: int, rows: int | None = None) -> dict[Choice, float]:
        """Expected tokens per second of one row for each choice, if all `rows` rows ran it."""
        return {c: self.tokens_per_cycle(c) / (self.slowdown(c) * self.cycle_seconds(c, rows))
                for c in self.candidates(block)}

    def pick(self, block: int) -> Choice:
        """The choice for a cycle starting now, for a request of this block length. Decided once per engine
        step (every row starting a cycle in a step gets the same choice, so they share one forward) and kept
        unless another choice scores `hysteresis` better (no flapping between near-equal choices)."""
        cfg = self.config
        with self._lock:
            if self._decided.get(block, (None,))[0] != self._steps:
                scores = self.scores(block)
                # The model is an estimate and guessing wrong costs throughput: AR keeps the lead unless clearly
                # beaten.
                scores = {c: s if c == AR else s / (1 + cfg.spec_margin) for c, s in scores.items()}
                ranked = sorted(scores, key=scores.get, reverse=True)
                current = self._decided.get(block, (None, None, None))[1]
                if current in scores and scores[ranked[0]] <= (1 + cfg.hysteresis) * scores[current]:
                    ranked.remove(current)
                    ranked.insert(0, current)
                if current is not None and ranked[0] != current:  # the load changed: re-measure soon again
                    self._explore_wait[block] = cfg.explore_every
                    self._explore_next[block] = self._steps + cfg.explore_every
                self._decided[block] = (self._steps, ranked[0], ranked[1] if len(ranked) > 1 else None)
            _, choice, runner_up = self._decided[block]
            # Now and then one row tries the runner-up, so its estimate stays current; one row only, as the
            # runner-up may be expensive at this load (a quadratic pass of 64 rows). Each try that leaves the
            # decision unchanged doubles the wait, so a choice that does not pay costs ever less to re-check.
            if (cfg.explore_every and runner_up and self._explored != self._steps
                    and self._steps >= self._explore_next.setdefault(block, cfg.explore_every - 1)):
                self._explored = self._steps
                wait = self._explore_wait.get(block, cfg.explore_every)
                self._explore_next[block] = self._steps + wait
                self._explore_wait[block] = min(2 * wait, cfg.explore_max)
                choice = runner_up
            self.picks[label(choice)] = self.picks.get(label(choice), 0) + 1
            return choice

    def observe(self, choice: Choice, tokens: int) -> None:
        """One finished cycle of `choice` output `tokens` tokens."""
        if choice[0] == "ar":
            return
        with self._lock:
            n = self._cycles.get(choice, 0)
            est = self._tokens_per_cycle.get(choice, self._prior(choice))
            weight = max(self.config.ema, 1.0 / (n + 1 + self.config.prior_weight))
            self._tokens_per_cycle[choice] = est + weight * (tokens - est)
            self._cycles[choice] = n + 1

    def observe_step(self, seconds: float, forwards: list[tuple[int, float]], rows: int) -> None:
        """A whole engine step (waiting for the rows' threads included) took `seconds` with forwards of
        (tokens, seconds): refine the cost curve and learn the overhead per row (Python work of the decoders,
        batching, streaming), which every mode pays once per step."""
        with self._lock:
            for tokens, spent in forwards:
                self.cost.observe(tokens, spent)
            extra = max(0.0, seconds - sum(spent for _, spent in forwards)) / max(1, rows)
            self._steps += 1
            self.overhead_per_row += max(0.05, 1.0 / self._steps) * (extra - self.overhead_per_row)

    def as_dict(self) -> dict:
        with self._lock:
            return {
                "modes": list(self.config.modes),
                "tokens_per_cycle": {label(c): round(v, 3) for c, v in self._tokens_per_cycle.items()},
                "cycles": {label(c): n for c, n in self._cycles.items()},
                "step_overhead_per_row_s": round(self.overhead_per_row, 6),
                "slowdown": {label(c): round(v, 3) for c, v in self.slowdowns.items()},
                "picks": dict(self.picks),
                "cost": self.cost.as_dict(),
            }


@dataclass
class AutoSteer:
    """One auto request's link to the policy (the `Steer` its step machine asks): its block length."""

    policy: AutoPolicy
    block_length: int

    def pick(self) -> Choice:
        return self.policy.pick(self.block_length)

    def observe(self, choice: Choice, tokens: int) -> None:
        self.policy.observe(choice, tokens)
