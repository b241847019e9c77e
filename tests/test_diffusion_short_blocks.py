"""Diffusion blocks with no masked slot: one slot holding the seed (max_new_tokens=1, block_length=1), or two slots
holding the seed and a forced end-think token. Such a block needs no denoising step; its tokens are still output.

The seed is the causal prediction after the prefix and a block-1 refresh is an AR step, so greedy diffusion over
such blocks emits exactly AR's tokens."""

import pytest

import trimode
from tests.invariance import alone, flat_cost, run_mix
from trimode.engine import Engine, EngineRequest

PROMPT = "Sort: 7 3 9 1 4 2"
CASES = {
    "max_new_tokens_1": dict(max_new_tokens=1),
    "block_length_1": dict(max_new_tokens=5, block_length=1),
    "block_of_seed_and_end_think": dict(max_new_tokens=2, block_length=2, max_thinking_tokens=1),
}
# The prefill, plus one refresh per block after the first; the forced end-think token needs no pass.
FORWARDS = {"max_new_tokens_1": 1, "block_length_1": 5, "block_of_seed_and_end_think": 1}


@pytest.fixture(scope="module")
def tm():
    return trimode.load()


def kwargs_of(tm, case: str) -> dict:
    kw = dict(CASES[case])
    if "max_thinking_tokens" in kw:
        kw["end_think_token_id"] = tm.tokenizer.encode("]")[-1]
    return kw


@pytest.mark.parametrize("case", CASES)
def test_a_block_with_no_masked_slot_outputs_its_tokens(tm, case):
    kw = kwargs_of(tm, case)
    got = tm.generate(PROMPT, mode="diffusion", **kw)
    ar = tm.generate(PROMPT, mode="ar", **{k: v for k, v in kw.items() if k != "block_length"})
    assert len(got.token_ids) == kw["max_new_tokens"]
    assert got.token_ids == ar.token_ids
    assert got.stats.forward_passes == FORWARDS[case]
    assert got.stats.generated_tokens == kw["max_new_tokens"]
    assert got.finish_reason == "length"
    if "end_think_token_id" in kw:
        assert got.token_ids[1] == kw["end_think_token_id"]


def test_generate_with_one_new_token_returns_the_seed(tm):
    ids = tm.tokenizer.encode(PROMPT)
    out = tm.generate(ids, mode="diffusion", max_new_tokens=1)
    assert out.token_ids == tm.generate(ids, mode="ar", max_new_tokens=1).token_ids
    assert len(out.token_ids) == 1 and out.text


@pytest.mark.parametrize("case", CASES)
def test_in_the_engine_alone_and_batched_the_same(tm, case):
    kw = kwargs_of(tm, case)
    knobs = {k: v for k, v in kw.items() if k != "max_new_tokens"}
    ids = tm.tokenizer.encode(PROMPT)
    request = EngineRequest(prompt_ids=ids, mode="diffusion", max_new_tokens=kw["max_new_tokens"], knobs=knobs)
    ref = alone(tm, request)
    assert len(ref.token_ids) == kw["max_new_tokens"]
    (single,) = run_mix(Engine(tm, cost=flat_cost()), [(0, request)])
    others = [EngineRequest(prompt_ids=ids[: 3 + i], mode=mode, max_new_tokens=6, knobs=k)
              for i, (mode, k) in enumerate([("ar", {}), ("diffusion", {"block_length": 3}),
                                             ("diffusion", {"block_length": 1})])]
    batched = run_mix(Engine(tm, cost=flat_cost()), [(0, o) for o in others] + [(1, request)])
    for res in (single, batched[-1]):
        assert (res.token_ids, res.finish_reason) == (ref.token_ids, ref.finish_reason)
        assert res.stats.forward_passes == ref.stats.forward_passes
    for o, res in zip(others, batched):
        assert res.token_ids == alone(tm, o).token_ids
