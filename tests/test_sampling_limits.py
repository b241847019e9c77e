"""Sampling settings at the edge of their ranges behave as their limits: a temperature so small that logits /
temperature overflows float32 samples as greedy, and a top_p near 0 (even below float32's smallest value) keeps
the top token, so it samples as greedy too."""

import pytest
import torch

import trimode
from trimode.decode.sampling import SamplingParams, choose

MODES = ["ar", "diffusion", "linear_spec"]
TINY = [
    dict(temperature=1e-38, seed=3),
    dict(temperature=1e-39, seed=3),
    dict(temperature=5e-324, seed=3),
    dict(temperature=0.8, top_p=1e-46, seed=3),
    dict(temperature=0.8, top_p=5e-324, seed=3),
    dict(temperature=1e-39, top_p=1e-46, top_k=5, seed=3),
]


@pytest.fixture(scope="module")
def tm():
    return trimode.load()


@pytest.fixture(scope="module")
def prompt(tm):
    return tm.tokenizer.apply_chat_template([{"role": "user", "content": "Sort: 7 3 9 1 4 2"}])


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("settings", TINY, ids=lambda s: ",".join(f"{k}={v}" for k, v in s.items()))
def test_tiny_temperature_or_top_p_equals_greedy(tm, prompt, mode, settings):
    greedy = tm.generate(prompt, mode=mode, max_new_tokens=12)
    got = tm.generate(prompt, mode=mode, max_new_tokens=12, **settings)
    assert got.token_ids == greedy.token_ids


def test_choose_is_argmax_where_logits_over_temperature_overflow():
    logits = torch.tensor([[3.0, 5.0, -2.0, 4.0], [-7.0, -3.0, -5.0, -9.0], [0.0, -1.0, -2.0, -3.0]])
    for temperature in (1e-38, 1e-39, 1e-45):
        params = SamplingParams(temperature=temperature, seed=11)
        assert choose(logits, torch.arange(3), params).tolist() == [1, 1, 0]


def test_top_p_below_float32_keeps_the_top_token():
    logits = torch.tensor([[0.5, 2.0, 1.9, -1.0]] * 64)
    params = SamplingParams(temperature=1.0, top_p=1e-46, seed=5)
    assert choose(logits, torch.arange(64), params).tolist() == [1] * 64
    # With top_p = 1 the same noise does not always pick the top token: the filter above is what kept it.
    assert set(choose(logits, torch.arange(64), SamplingParams(temperature=1.0, seed=5)).tolist()) != {1}
