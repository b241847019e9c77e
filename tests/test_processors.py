"""Logit processors (repetition / frequency / presence penalty, logit_bias, min_tokens) and logprobs in every mode.

Self-speculation stays lossless under them: a verified position is processed with the history AR would have had,
so linear_spec and quadratic_spec emit AR's tokens (greedy and seeded). Models are float64 so that a verify
pass's logits equal AR's far below any logit gap.
"""

import pytest
import torch

from tests.conftest import random_model
from trimode.api import TriMode
from trimode.decode.decide import History, Pick, decide
from trimode.decode.sampling import SamplingParams, choose

SETTINGS = {
    "repetition_penalty": {"repetition_penalty": 1.5},
    "repetition_below_1": {"repetition_penalty": 0.7},
    "frequency_penalty": {"frequency_penalty": 1.5},
    "presence_penalty": {"presence_penalty": 2.0},
    "logit_bias": {"logit_bias": {7: 6.0, 9: -100.0}},
    "min_tokens": {"min_tokens": 12},
}
BASE = {"min_tokens": {"eos_token_id": 3, "logit_bias": {3: 7.0}}}  # EOS likely early: min_tokens holds it back
SAMPLING = {"greedy": {}, "seeded": {"temperature": 0.9, "top_p": 0.95, "seed": 17}}


@pytest.fixture(scope="module")
def tm() -> TriMode:
    return TriMode(random_model(4, lora=True))


@pytest.mark.parametrize("setting", SETTINGS)
@pytest.mark.parametrize("sampling", SAMPLING)
def test_speculation_equals_ar_under_processors(tm, setting, sampling):
    base = dict(max_new_tokens=24, logprobs=2, eos_token_id=-1, **SAMPLING[sampling]) | BASE.get(setting, {})
    kwargs = base | SETTINGS[setting]
    prompt = [9, 12, 7, 30, 9, 12]
    ar = tm.generate(prompt, mode="ar", **kwargs)
    plain = tm.generate(prompt, mode="ar", **base)
    assert ar.token_ids != plain.token_ids  # the processor visibly changes the output
    for mode, knobs in [("linear_spec", {"block_length": 4}), ("linear_spec", {"block_length": 3, "threshold": 0.5}),
                        ("quadratic_spec", {"block_length": 3})]:
        spec = tm.generate(prompt, mode=mode, **kwargs, **knobs)
        assert spec.token_ids == ar.token_ids, (mode, knobs)
        # the verifying pass's log-probabilities are AR's
        assert [i for _, top in spec.logprobs for i, _ in top] == [i for _, top in ar.logprobs for i, _ in top]
        assert torch.allclose(torch.tensor([lp for lp, _ in spec.logprobs]),
                              torch.tensor([lp for lp, _ in ar.logprobs]), atol=1e-9)


@pytest.mark.parametrize("setting", SETTINGS)
def test_diffusion_applies_processors(tm, setting):
    base = dict(max_new_tokens=16, block_length=4, threshold=0.5, eos_token_id=-1) | BASE.get(setting, {})
    kwargs = base | SETTINGS[setting]
    plain = tm.generate([9, 12, 7, 30], mode="diffusion", **base)
    out = tm.generate([9, 12, 7, 30], mode="diffusion", logprobs=0, **kwargs)
    assert out.token_ids != plain.token_ids
    assert len(out.logprobs) == len(out.token_ids) and all(lp <= 0 for lp, _ in out.logprobs)


@pytest.mark.parametrize("causal_context", [True, False])
def test_diffusion_reports_a_written_token_with_probability_one(tm, causal_context):
    """A token no denoising pass revealed (here the end-think token the thinking budget forces) still has a
    logprobs entry: 0.0, itself the only alternative (not a missing entry the server could not render)."""
    out = tm.generate([9, 12, 7, 30], mode="diffusion", max_new_tokens=8, block_length=5, threshold=0.5,
                      eos_token_id=-1, causal_context=causal_context, max_thinking_tokens=3, end_think_token_id=50,
                      logprobs=2)
    assert out.token_ids[3] == 50 and len(out.logprobs) == len(out.token_ids)
    assert out.logprobs[3] == (0.0, [(50, 0.0)])
    assert all(entry is not None and entry[0] <= 0 for entry in out.logprobs)


def test_min_tokens_holds_back_eos(tm):
    eos = 3
    bias = {eos: 100.0}  # EOS would win every position
    assert len(tm.generate([9, 12], max_new_tokens=10, logit_bias=bias, eos_token_id=eos).token_ids) == 1
    for mode in ("ar", "linear_spec", "diffusion"):
        out = tm.generate([9, 12], mode=mode, max_new_tokens=10, logit_bias=bias, min_tokens=6, eos_token_id=eos)
        assert len(out.token_ids) == 7 and out.token_ids[-1] == eos and eos not in out.token_ids[:-1], mode


def test_repetition_penalty_rule():
    """HF / vLLM: a seen token's positive logit is divided by the penalty, a negative one multiplied."""
    logits = torch.tensor([[2.0, -2.0, 1.0, 0.5]])
    sp = SamplingParams(repetition_penalty=2.0, frequency_penalty=0.5, presence_penalty=0.25)
    pick = Pick(sp, [5], histories=[History([0], [1, 1])])
    d = decide([logits], [pick])[0]
    # processed: [2/2, -2*2 - 0.5*2 - 0.25, 1, 0.5] -> argmax token 0 (1.0) ties token 2 (1.0): first wins
    assert int(d.tokens[0]) == 0
    pick = Pick(SamplingParams(repetition_penalty=2.0), [5], histories=[History([0, 2], [])], confidence=True)
    d = decide([logits], [pick])[0]
    expected = torch.tensor([1.0, -2.0, 0.5, 0.5]).softmax(-1)
    assert int(d.tokens[0]) == 0 and torch.isclose(d.confidence[0], expected[0])


def test_decide_equals_choose_without_processors():
    """Greedy and keyed sampling of many picks at once give `choose`'s tokens for each alone."""
    g = torch.Generator().manual_seed(0)
    logits = [torch.randn(n, 50, generator=g) for n in (1, 3, 5)]
    picks = [Pick(SamplingParams(), [4]), Pick(SamplingParams(0.8, 0.9, 0, 11), [6, 7, 8], 3),
             Pick(SamplingParams(1.0, 1.0, 5, 99), [1, 2, 3, 4, 5], 2, confidence=True)]
    made = decide(logits, picks)
    for x, p, d in zip(logits, picks, made):
        assert d.tokens.tolist() == choose(x, torch.tensor(list(p.positions)), p.sampling, step=p.step).tolist()
    assert torch.equal(made[2].confidence, x.softmax(-1).gather(-1, made[2].tokens[:, None]).squeeze(-1))


@pytest.mark.parametrize("field, value", [
    ("frequency_penalty", 2.5), ("presence_penalty", -3.0), ("repetition_penalty", 0.0),
    ("logit_bias", {64: 1.0}), ("logit_bias", {3: 101.0}), ("min_tokens", 9)])
def test_bad_processor_settings_name_the_field(tm, field, value):
    with pytest.raises(ValueError, match=field):
        tm.generate([9, 12], max_new_tokens=8, **{field: value})


def test_picks_decided_together_equal_each_decided_alone():
    """The batched stage merges picks with the same processor settings (one application for their rows): each
    pick's decision is what it gets alone, greedy and sampled, with and without processors, logprobs, masks."""
    g = torch.Generator().manual_seed(3)
    vocab = 40
    logits = [torch.randn(n, vocab, generator=g, dtype=torch.float64) for n in (1, 3, 2, 1, 2)]
    pen = SamplingParams(repetition_penalty=1.4, frequency_penalty=0.5, min_tokens=3, logit_bias=((5, 4.0),))
    hot = SamplingParams(temperature=0.8, top_k=9, seed=5, presence_penalty=1.0, logprobs=2)

    def pick(sampling, n, row, ahead=()):
        hist = [History([row, 7, 8], [5, 5, row, 2][: row + 1], ahead)]
        return Pick(sampling, list(range(10, 10 + n)), rows=[0] * n, histories=hist, seen=list(range(n)),
                    eos=frozenset({2}), confidence=True, logprobs=sampling.logprobs)

    picks = [pick(pen, 1, 0), pick(pen, 3, 1, (5, 9)), pick(hot, 2, 2, (4,)), pick(SamplingParams(), 1, 3),
             pick(pen, 2, 2, (2,))]
    picks[3].masks, picks[3].masked_at = torch.zeros(1, vocab, dtype=torch.bool), [0]
    picks[3].masks[0, 11] = True
    together = decide(logits, picks)
    for x, p, d in zip(logits, picks, together):
        alone = decide([x], [p])[0]
        assert torch.equal(d.tokens, alone.tokens)
        assert torch.allclose(d.confidence, alone.confidence)
        if p.logprobs is not None:
            assert torch.equal(d.top_ids, alone.top_ids) and torch.allclose(d.logprobs, alone.logprobs)
    assert together[3].tokens.tolist() == [11]


def test_blocked_argmax_equals_torch_argmax():
    """`argmax_last` (by blocks on a CPU) returns exactly torch's argmax: first maximum, ties, -inf rows, NaN."""
    from trimode.decode.sampling import argmax_last

    g = torch.Generator().manual_seed(0)
    for trial in range(300):
        v = (2048, 4096, 2050)[trial % 3]  # 2050: not a multiple of the block, plain argmax
        x = torch.randint(-3, 3, (20, v), generator=g).float()  # many ties
        x[0] = float("-inf")
        x[1, torch.randint(0, v, (1,), generator=g)] = float("nan")
        x[2, torch.randint(0, v, (3,), generator=g)] = float("inf")
        x[3] = torch.randn(v, generator=g)
        for y in (x, x.double(), x[:1]):
            assert torch.equal(argmax_last(y), y.argmax(-1)), trial
