"""Invariants of the decoding modes on random tiny models (float64, so kernel differences cannot flip an argmax).

- greedy linear_spec and quadratic_spec equal greedy AR, token for token;
- with a seed, sampling in the speculative modes emits exactly AR's samples (the sampler is keyed by position),
  and their empirical distribution matches the model's AR distribution;
- the stopping rules and statistics hold in every mode.
"""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.conftest import random_model
from trimode.decode.driver import decode, drive
from trimode.decode.sampling import SamplingParams
from trimode.decode.step import Committed
from trimode.decode.stopping import StopRule, ThinkingBudget

NO_EOS = StopRule(24)


def run(decoder):
    return drive(decoder).tokens[0]


prompts = st.lists(st.integers(6, 63), min_size=1, max_size=12)


@settings(max_examples=12, deadline=None)
@given(seed=st.integers(0, 10_000), prompt=prompts, block=st.integers(2, 6), lora=st.booleans(),
       draft_threshold=st.sampled_from([0.0, 0.3, 0.9]))
def test_greedy_speculation_equals_ar(seed, prompt, block, lora, draft_threshold):
    net = random_model(seed, lora=lora)
    ids = torch.tensor([prompt])
    ar = run(decode(net, "ar", ids, NO_EOS))
    assert len(ar) == NO_EOS.max_new_tokens
    assert run(decode(net, "linear_spec", ids, NO_EOS, block_length=block, threshold=draft_threshold,
                                  use_drafter=lora)) == ar
    assert run(decode(net, "quadratic_spec", ids, NO_EOS, block_length=block)) == ar


@settings(max_examples=8, deadline=None)
@given(seed=st.integers(0, 10_000), prompt=prompts, sample_seed=st.integers(0, 2**31), block=st.integers(2, 5),
       temperature=st.sampled_from([0.7, 1.0, 1.5]), top_p=st.sampled_from([1.0, 0.9]), top_k=st.sampled_from([0, 8]))
def test_seeded_sampling_speculation_equals_ar_sampling(seed, prompt, sample_seed, block, temperature, top_p, top_k):
    net = random_model(seed, lora=True)
    ids = torch.tensor([prompt])
    sp = SamplingParams(temperature, top_p, top_k, sample_seed)
    ar = run(decode(net, "ar", ids, NO_EOS, sp))
    assert run(decode(net, "linear_spec", ids, NO_EOS, sp, block_length=block, use_drafter=True)) == ar
    assert run(decode(net, "quadratic_spec", ids, NO_EOS, sp, block_length=block)) == ar


def test_speculative_sampling_matches_ar_distribution():
    """Chi-square of 600 linear_spec samples of (t1, t2) against the exact AR probabilities."""
    net = random_model(7, vocab=16, scale=1.0)
    ids = torch.tensor([[9, 12, 6]])
    stop = StopRule(2)
    with torch.no_grad():
        p1 = net(ids)[0, -1].softmax(-1)
        joint = torch.zeros(16, 16, dtype=torch.float64)
        for a in range(16):
            p2 = net(torch.cat([ids, torch.tensor([[a]])], 1))[0, -1].softmax(-1)
            joint[a] = p1[a] * p2
    n = 600
    counts = torch.zeros(16, 16, dtype=torch.float64)
    for s in range(n):
        t1, t2 = run(decode(net, "linear_spec", ids, stop, SamplingParams(1.0, seed=s), block_length=4))
        counts[t1, t2] += 1
    expected = joint.flatten() * n
    keep = expected >= 5  # pool rare cells so the chi-square approximation holds
    observed = torch.cat([counts.flatten()[keep], counts.flatten()[~keep].sum()[None]])
    exp = torch.cat([expected[keep], expected[~keep].sum()[None]])
    chi2 = float(((observed - exp) ** 2 / exp).sum())
    dof = int(keep.sum())  # cells - 1
    # 99.9th percentile of chi-square via the Wilson-Hilferty approximation.
    z = 3.09
    limit = dof * (1 - 2 / (9 * dof) + z * math.sqrt(2 / (9 * dof))) ** 3
    assert chi2 < limit, (chi2, limit, dof)


def test_sampling_is_seed_reproducible_and_seed_dependent():
    net = random_model(3, scale=1.0)
    ids = torch.tensor([[10, 11, 12]])
    a = run(decode(net, "ar", ids, NO_EOS, SamplingParams(1.0, seed=1)))
    assert a == run(decode(net, "ar", ids, NO_EOS, SamplingParams(1.0, seed=1)))
    assert a != run(decode(net, "ar", ids, NO_EOS, SamplingParams(1.0, seed=2)))


@pytest.mark.parametrize("mode", ["ar", "diffusion", "linear_spec", "quadratic_spec"])
def test_eos_and_budget(mode):
    net = random_model(11)
    ids = torch.tensor([[7, 8, 9]])
    ar = run(decode(net, "ar", ids, StopRule(40)))
    eos = ar[5]  # pretend the 6th AR token is EOS: every exact mode must stop right after it
    stop = StopRule(40, frozenset([eos]))
    make = {
        "ar": lambda: decode(net, "ar", ids, stop),
        "diffusion": lambda: decode(net, "diffusion", ids, stop, block_length=4, threshold=0.5),
        "linear_spec": lambda: decode(net, "linear_spec", ids, stop, block_length=4),
        "quadratic_spec": lambda: decode(net, "quadratic_spec", ids, stop, block_length=4),
    }[mode]
    out = drive(make())
    tokens = out.tokens[0]
    assert tokens.count(eos) == 1 and tokens[-1] == eos
    if mode != "diffusion":
        assert tokens == ar[: ar.index(eos) + 1]
    for n in (1, 5, 13):
        assert len(run(make.__call__() if False else _with_budget(mode, net, ids, n))) == n


def _with_budget(mode, net, ids, n):
    stop = StopRule(n)
    return {
        "ar": lambda: decode(net, "ar", ids, stop),
        "diffusion": lambda: decode(net, "diffusion", ids, stop, block_length=4, threshold=0.5),
        "linear_spec": lambda: decode(net, "linear_spec", ids, stop, block_length=4),
        "quadratic_spec": lambda: decode(net, "quadratic_spec", ids, stop, block_length=4),
    }[mode]()


@pytest.mark.parametrize("budget", [0, 3, 7])
def test_thinking_budget_speculation_equals_ar(budget):
    net = random_model(5)
    ids = torch.tensor([[20, 21, 22, 23]])
    think = ThinkingBudget(budget, 17)
    ar = run(decode(net, "ar", ids, NO_EOS, thinking=think))
    assert ar[budget] == 17 or 17 in ar[:budget]
    assert run(decode(net, "linear_spec", ids, NO_EOS, block_length=4, thinking=think)) == ar
    assert run(decode(net, "quadratic_spec", ids, NO_EOS, block_length=4, thinking=think)) == ar


def test_stats_and_events():
    net = random_model(2)
    ids = torch.tensor([[30, 31]])
    gen = decode(net, "linear_spec", ids, NO_EOS, block_length=4)
    streamed = []
    while True:
        try:
            ev = next(gen)
        except StopIteration as done:
            out = done.value
            break
        assert isinstance(ev, Committed)
        streamed += ev.tokens[0]
    assert streamed == out.tokens[0]
    s = out.stats
    assert s.forward_passes == 1 + 2 * len(s.acceptance)
    assert sum(s.acceptance) + 1 == len(out.tokens[0])  # acceptance counts what each cycle output
    assert all(1 <= a <= 4 for a in s.acceptance)
    d = drive(decode(net, "diffusion", ids, StopRule(16), block_length=8, threshold=0.0))
    # threshold 0 commits every mask in one step: one denoise + one refresh per block, plus the prefill, and
    # no refresh after the last block (its seed would never be read).
    assert d.stats.forward_passes == 1 + 2 * 2 - 1
    assert d.stats.tokens_per_forward == pytest.approx(16 / 4)


def test_diffusion_batch_rows_match_single_runs():
    net = random_model(4)
    rows = torch.tensor([[10, 20, 30, 40], [50, 60, 11, 12]])
    stop = StopRule(12)
    batched = drive(decode(net, "diffusion", rows, stop, block_length=4, threshold=0.8)).tokens
    single = [drive(decode(net, "diffusion", rows[i : i + 1], stop, block_length=4, threshold=0.8)).tokens[0]
              for i in range(2)]
    assert batched == single
    ar_b = drive(decode(net, "ar", rows, stop)).tokens
    assert ar_b == [drive(decode(net, "ar", rows[i : i + 1], stop)).tokens[0] for i in range(2)]


def test_fixed_step_schedule_uses_the_given_step_count():
    net = random_model(6)
    ids = torch.tensor([[40, 41, 42]])
    for steps in (1, 2, 7, 10):
        out = drive(decode(net, "diffusion", ids, StopRule(16), block_length=8, steps=steps))
        assert len(out.tokens[0]) == 16
        passes_per_block = min(steps, 7)  # 7 masks after the seed; extra steps have nothing left to commit
        assert out.stats.forward_passes == 1 + 2 * (passes_per_block + 1) - 1  # no refresh after the last block
