"""`mode: auto`: lossless whatever it picks, and its rule follows the cost curve and the observed acceptance."""

import random
import time

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.conftest import random_model
from tests.invariance import flat_cost, run_mix
from trimode.api import TriMode
from trimode.decode.driver import decode, drive
from trimode.decode.sampling import SamplingParams
from trimode.decode.stopping import StopRule, ThinkingBudget
from trimode.engine import AutoConfig, CostModel, Engine, EngineRequest
from trimode.engine.auto import AR, AutoPolicy, AutoSteer, label, measure_slowdowns

L4, Q4 = ("linear_spec", 4), ("quadratic_spec", 4)


class ScriptedPolicy:
    """Picks modes from a random script, to show that any sequence of picks gives AR's output."""

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)
        self.seen: set[str] = set()

    def pick(self, block):
        mode = self.rng.choice(["ar", "linear_spec", "quadratic_spec"])
        self.seen.add(mode)
        return AR if mode == "ar" else (mode, self.rng.randint(2, block))  # any block length up to the request's

    def observe(self, choice, tokens):
        assert 1 <= tokens <= choice[1]


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 10_000), prompt=st.lists(st.integers(6, 63), min_size=1, max_size=10),
       block=st.integers(2, 6), sampled=st.booleans(), drafter=st.booleans(),
       budget=st.one_of(st.none(), st.integers(0, 12)))
def test_any_sequence_of_picks_emits_ar_output(seed, prompt, block, sampled, drafter, budget):
    net = random_model(seed, lora=True)
    ids = torch.tensor([prompt])
    stop = StopRule(24)
    sp = SamplingParams(1.0, 0.9, 0, seed) if sampled else SamplingParams()
    thinking = ThinkingBudget(budget, 17) if budget is not None else None
    policy = ScriptedPolicy(seed)
    got = drive(decode(net, "auto", ids, stop, sp, thinking, steer=AutoSteer(policy, block), block_length=block,
                       use_drafter=drafter))
    ar = drive(decode(net, "ar", ids, stop, sp, thinking))
    assert got.tokens == ar.tokens
    assert len(got.tokens[0]) == 24
    assert len(policy.seen) >= 2


def kneed_cost(knee: int) -> CostModel:
    """1 ms up to `knee` tokens, then linear in the token count (a GPU-like curve)."""
    return CostModel([(1, 1e-3), (knee, 1e-3), (64 * knee, 64e-3)])


def test_cost_model_interpolates_and_finds_the_knee():
    cost = kneed_cost(128)
    assert cost(1) == cost(100) == pytest.approx(1e-3)
    assert cost(256) == pytest.approx(2e-3, rel=0.02)
    assert cost(64 * 128 * 2) == pytest.approx(128e-3, rel=0.01)  # extrapolated
    assert cost.knee() == 128


def test_policy_speculates_below_the_knee_and_decodes_ar_above_it():
    rows = {"n": 1}
    config = AutoConfig(explore_every=0, prior_tokens_per_cycle=2.0, smaller_blocks=False)
    policy = AutoPolicy(config, kneed_cost(128), lambda: rows["n"])
    for _ in range(50):
        policy.observe(("quadratic_spec", 4), 3)
        policy.observe(("linear_spec", 4), 3.5)
    assert policy.pick(4) == Q4  # 20 tokens per row, below the knee: 3 tokens for one forward
    rows["n"] = 16  # 320 tokens: quadratic costs 2.5x, linear (64 tokens, 2 forwards) wins
    assert policy.pick(4) == Q4  # decided once per step: the next step sees the new load
    policy.observe_step(0.0, [], rows=16)
    assert policy.pick(4) == L4
    rows["n"] = 512  # far above the knee: every extra token costs, AR's 1 token per row wins
    policy.observe_step(0.0, [], rows=512)
    assert policy.pick(4) == AR
    scores = policy.scores(4, rows=512)
    assert scores[AR] == max(scores.values())


def test_policy_takes_a_smaller_block_when_the_full_one_is_past_the_knee():
    rows = {"n": 1}
    policy = AutoPolicy(AutoConfig(explore_every=0, modes=("ar", "quadratic_spec"), prior_weight=0),
                        kneed_cost(32), lambda: rows["n"])
    assert policy.candidates(8) == [AR, ("quadratic_spec", 2), ("quadratic_spec", 4), ("quadratic_spec", 8)]
    policy.observe(("quadratic_spec", 8), 4)  # a pass of 72 tokens (2.25 ms) for 4 tokens
    policy.observe(("quadratic_spec", 4), 3)  # 20 tokens, below the knee (1 ms) for 3
    policy.observe(("quadratic_spec", 2), 1.5)  # 6 tokens (1 ms) for 1.5
    assert policy.pick(8) == ("quadratic_spec", 4)
    rows["n"] = 4  # 80 tokens per pass of block 4 (2.5 ms for 3 per row), 24 of block 2 (1 ms for 1.5)
    policy.observe_step(0.0, [], rows=4)
    assert policy.pick(8) == ("quadratic_spec", 2)
    assert AutoPolicy(AutoConfig(smaller_blocks=False), kneed_cost(32), lambda: 1).candidates(8) == [
        AR, ("linear_spec", 8), ("quadratic_spec", 8)]


def test_policy_drops_speculation_that_is_not_accepted():
    # Wider passes cost a little more; speculation pays only while its drafts are accepted.
    config = AutoConfig(explore_every=0, smaller_blocks=False)
    policy = AutoPolicy(config, CostModel([(1, 1e-3), (100, 2e-3)]), lambda: 1)
    assert policy.pick(4) == Q4  # the prior: 2 tokens per cycle
    for _ in range(200):
        policy.observe(("quadratic_spec", 4), 1)
        policy.observe(("linear_spec", 4), 1)
    policy.observe_step(0.0, [], rows=1)
    assert policy.pick(4) == AR


def test_policy_keeps_its_mode_between_near_equal_scores():
    config = AutoConfig(modes=("ar", "linear_spec"), explore_every=0, prior_weight=0, spec_margin=0.0,
                        smaller_blocks=False)
    policy = AutoPolicy(config, flat_cost(), lambda: 1)  # AR scores 1 / 1 ms; linear a / 2 ms
    policy.observe(("linear_spec", 4), 1.9)  # with prior_weight 0 the estimates are plain means: 1.9
    assert policy.pick(4) == AR
    policy.observe(("linear_spec", 4), 2.22)  # mean 2.06: linear is 3% better, within the 5% hysteresis
    policy.observe_step(0.0, [], rows=1)
    assert policy.pick(4) == AR
    policy.observe(("linear_spec", 4), 2.78)  # mean 2.3: 15% better
    policy.observe_step(0.0, [], rows=1)
    assert policy.pick(4) == L4


def test_policy_speculates_only_when_it_beats_ar_by_the_margin():
    config = AutoConfig(modes=("ar", "linear_spec"), explore_every=0, prior_weight=0, hysteresis=0.0,
                        smaller_blocks=False)
    policy = AutoPolicy(config, flat_cost(), lambda: 1)  # AR scores 1 / 1 ms; linear a / 2 ms
    policy.observe(("linear_spec", 4), 2.16)  # 8% better than AR: inside the default 10% margin
    assert policy.pick(4) == AR
    policy.observe(("linear_spec", 4), 2.36)  # mean 2.26: 13% better
    policy.observe_step(0.0, [], rows=1)
    assert policy.pick(4) == L4


def test_policy_explores_the_runner_up_with_one_row_and_backs_off():
    policy = AutoPolicy(AutoConfig(explore_every=4, smaller_blocks=False), flat_cost(), lambda: 3)
    steps = []
    for _ in range(32):
        steps.append([label(policy.pick(4)) for _ in range(3)])  # three rows start a cycle in this step
        policy.observe_step(0.01, [(60, 0.004)], rows=3)
    explored = [i for i, picks in enumerate(steps) if len(set(picks)) > 1]
    assert explored == [3, 7, 15, 31]  # the wait doubles while the decision stands
    assert all(sorted(steps[i]).count("quadratic_spec@4") == 2 for i in explored)
    assert policy.overhead_per_row == pytest.approx(0.002)


def test_policy_explores_soon_again_after_a_switch():
    rows = {"n": 1}
    config = AutoConfig(modes=("ar", "linear_spec"), explore_every=4, prior_tokens_per_cycle=3.0, ema=1.0,
                        smaller_blocks=False)
    policy = AutoPolicy(config, kneed_cost(64), lambda: rows["n"])

    def step() -> list[str]:
        picks = [label(policy.pick(4)) for _ in range(2)]
        policy.observe_step(0.0, [], rows=rows["n"])
        return picks
    for _ in range(20):  # explored at steps 3, 7, 15: the wait is 16 now
        assert "linear_spec@4" in step()
    rows["n"] = 256  # 1024 tokens per linear forward: AR wins from the next step on
    assert step() == ["ar", "ar"]
    picks = [step() for _ in range(4)]
    assert [sorted(p) for p in picks] == [["ar", "ar"]] * 3 + [["ar", "linear_spec@4"]]  # 4 steps on, not 16


class FixedCost(CostModel):
    """A cost curve the engine does not refine with the forward times it measures (they vary run to run)."""

    def observe(self, tokens, seconds, weight=0.25):
        pass


def test_auto_in_the_engine_learns_acceptance_and_matches_ar():
    tm = TriMode(random_model(4, lora=True))
    requests = [(0, EngineRequest(prompt_ids=[9, k, 30], mode="auto", max_new_tokens=16,
                                  knobs={"eos_token_id": 0, "block_length": 4})) for k in range(10, 14)]
    engine = Engine(tm, cost=FixedCost(flat_cost().points))
    results = run_mix(engine, requests)
    for (_, r), res in zip(requests, results, strict=True):
        assert res.token_ids == tm.generate(r.prompt_ids, max_new_tokens=16, eos_token_id=0).token_ids
        assert res.mode == "auto" and res.stats.generated_tokens == 16
    auto = engine.stats()["auto"]
    assert sum(auto["picks"].values()) >= 4 * 8
    # Random weights: drafts are rarely accepted, and the estimates of the modes auto speculated with fell from
    # the prior of 2 (the flat cost curve makes a quadratic cycle cost one AR step, so auto starts there).
    most = max(auto["cycles"], key=auto["cycles"].get)
    assert auto["cycles"][most] >= 8 and auto["tokens_per_cycle"][most] < 2.0


def test_policy_prices_each_mode_with_its_slowdown():
    config = AutoConfig(modes=("ar", "linear_spec"), explore_every=0, prior_weight=0, hysteresis=0.0,
                        smaller_blocks=False)
    policy = AutoPolicy(config, flat_cost(), lambda: 1)  # predicted: AR 1 ms per cycle, linear 2 ms
    policy.observe(("linear_spec", 4), 3)  # 3 tokens per 2 ms beats AR's 1 per 1 ms
    assert policy.pick(4) == L4
    policy.slowdowns = {L4: 2.0, AR: 1.0}  # but its cycles take twice the predicted time
    policy.observe_step(0.0, [], rows=1)
    assert policy.pick(4) == AR  # 3 tokens per 4 ms
    assert policy.as_dict()["slowdown"] == {"linear_spec@4": 2.0, "ar": 1.0}


def test_slowdowns_are_measured_for_every_mode_at_start_up():
    tm = TriMode(random_model(5, lora=True))
    cost = CostModel.measure(tm.net, sizes=(1, 4, 16, 64))
    slowdowns = measure_slowdowns(tm.net, cost, block=4, cycles=4)
    assert set(slowdowns) == {AR, ("linear_spec", 2), L4, ("quadratic_spec", 2), Q4}
    assert all(0 < v < float("inf") for v in slowdowns.values())
    with Engine(tm, auto=AutoConfig(modes=("ar", "linear_spec"), cost_sizes=(1, 4, 16))) as engine:
        measured = set(engine.stats()["auto"]["slowdown"])
        assert "ar" in measured and f"linear_spec@{tm.config.block_size}" in measured
        assert all(c == "ar" or c.startswith("linear_spec@") for c in measured)


def test_the_start_up_measurement_is_bounded_in_time():
    """A choice the curve predicts slower than `slowest` is not run (it borrows its mode's nearest block length);
    the others run at most `budget` seconds of cycles (a large model on a CPU starts in seconds)."""
    tm = TriMode(random_model(5, lora=True))
    steep = CostModel([(1, 1e-4), (8, 1e-4), (16, 10.0)])  # a pass of more than 8 tokens: seconds
    slowdowns = measure_slowdowns(tm.net, steep, block=4, cycles=64, slowest=1.0)
    assert set(slowdowns) == {AR, ("linear_spec", 2), L4, ("quadratic_spec", 2)}  # Q4: 4 x 5 = 20 tokens a pass
    policy = AutoPolicy(AutoConfig(), steep, lambda: 1)
    policy.slowdowns = slowdowns
    assert policy.slowdown(Q4) == slowdowns[("quadratic_spec", 2)]
    assert measure_slowdowns(tm.net, steep, block=4, slowest=0.0) == {}
    t0 = time.perf_counter()
    measure_slowdowns(tm.net, CostModel.measure(tm.net, sizes=(1, 4, 16, 64)), block=4, cycles=10_000, budget=0.05)
    assert time.perf_counter() - t0 < 10  # 5 choices x (a warm-up cycle + 0.05 s); unbounded: to the end of the context


def test_starting_an_engine_leaves_the_global_rng_alone():
    tm = TriMode(random_model(6, lora=True))
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    with Engine(tm, auto=AutoConfig(cost_sizes=(1, 4, 16))):  # measures the cost curve and the slowdowns
        pass
    assert torch.equal(torch.rand(3), expected)
