"""The prefix cache and KV pages on demand: what is cached, what is shared, what comes back, and that a request's
output never depends on either (every scenario ends with every page back in the pool)."""

import random

import pytest

from tests.conftest import random_model
from tests.invariance import alone, check_pool, flat_cost, run_mix
from trimode.api import TriMode
from trimode.engine import Engine, EngineRequest
from trimode.engine.prefix_cache import PrefixCache, page_key


@pytest.fixture(scope="module")
def tm():
    return TriMode(random_model(2, lora=True))


def engine(tm, **kw) -> Engine:
    return Engine(tm, cost=flat_cost(), **({"page_size": 4, "prefill_chunk": 8} | kw))


def run(eng: Engine, requests: list[EngineRequest], at: list[int] | None = None):
    results = run_mix(eng, list(zip(at or [0] * len(requests), requests)))
    check_pool(eng)
    return results


SYSTEM = [(7 * i + 3) % 57 + 6 for i in range(23)]  # 23 tokens: 5 full pages of 4 and a partial one


def test_page_keys_name_the_whole_chain_and_the_adapter():
    root = PrefixCache(4, "model-a").root
    a = page_key(root, [1, 2, 3, 4])
    assert page_key(root, [1, 2, 3, 4]) == a
    assert page_key(root, [1, 2, 3, 5]) != a
    assert page_key(root, [1, 2, 3, 4], lora=True) != a
    assert page_key(PrefixCache(4, "model-b").root, [1, 2, 3, 4]) != a
    assert page_key(a, [5, 6, 7, 8]) != page_key(page_key(root, [0, 2, 3, 4]), [5, 6, 7, 8])


@pytest.mark.parametrize("mode, knobs", [
    ("ar", {}), ("linear_spec", {"block_length": 4}), ("quadratic_spec", {"block_length": 3}),
    ("diffusion", {"block_length": 4}), ("auto", {"block_length": 3}),
])
def test_every_mode_reads_the_cache_and_equals_its_run_alone(tm, mode, knobs):
    eng = engine(tm)
    first = EngineRequest(SYSTEM + [40, 41], mode="ar", max_new_tokens=9, knobs={"eos_token_id": 0})
    (r1,) = run(eng, [first])
    assert r1.stats.cached_tokens == 0
    turn = EngineRequest(SYSTEM + [40, 41] + r1.token_ids + [50, 51, 52], mode=mode, max_new_tokens=10,
                         temperature=0.8, seed=5, knobs={"eos_token_id": 0} | knobs)
    (r2,) = run(eng, [turn])
    # The second turn finds the system prompt and the first answer, generated tokens included (AR steps).
    assert r2.stats.cached_tokens == 32
    assert r2.token_ids == alone(tm, turn).token_ids
    stats = eng.stats()
    assert stats["prefix_cache_hits"] == 32 and stats["prefix_cache_queries"] == 25 + len(turn.prompt_ids)


def test_a_bidirectional_prompt_pass_neither_reads_nor_fills_the_cache(tm):
    eng = engine(tm)
    run(eng, [EngineRequest(SYSTEM + [40], mode="ar", max_new_tokens=4)])
    noncausal = EngineRequest(SYSTEM + [40, 42], mode="diffusion", max_new_tokens=8,
                              knobs={"block_length": 4, "causal_context": False})
    cached = eng.stats()["kv_pages_cached"]
    (r,) = run(eng, [noncausal])
    assert r.stats.cached_tokens == 0 and eng.stats()["kv_pages_cached"] == cached
    assert r.token_ids == alone(tm, noncausal).token_ids


def test_the_last_prompt_token_is_always_computed(tm):
    eng = engine(tm)
    req = EngineRequest(SYSTEM[:20], max_new_tokens=3)  # 5 full pages exactly
    run(eng, [req])
    (again,) = run(eng, [req])
    assert again.stats.cached_tokens == 16  # not 20: the machine needs the last prompt token's logits
    assert again.token_ids == alone(tm, req).token_ids


def test_scoring_computes_the_whole_prompt_and_still_fills_the_cache(tm):
    eng = engine(tm)
    run(eng, [EngineRequest(SYSTEM, max_new_tokens=3)])  # the prompt's pages are cached now
    scored = EngineRequest(SYSTEM, max_new_tokens=0, prompt_logprobs=1)
    (first,) = run(eng, [scored])
    assert first.stats.cached_tokens == 0 and len(first.prompt_logprobs) == len(SYSTEM)  # every position scored
    (second,) = run(eng, [EngineRequest(SYSTEM, max_new_tokens=0, prompt_logprobs=1)])
    assert second.prompt_logprobs == first.prompt_logprobs
    (after,) = run(eng, [EngineRequest(SYSTEM, max_new_tokens=3)])
    assert after.stats.cached_tokens == 20
    assert after.token_ids == alone(tm, EngineRequest(SYSTEM, max_new_tokens=3)).token_ids


def test_edits_and_continuations_share_one_cache(tm):
    eng = engine(tm)
    suffix = [44, 45, 46]
    reqs = [EngineRequest(SYSTEM, mode="edit", max_new_tokens=4, edit=("infill", {"suffix": suffix})),
            EngineRequest(SYSTEM + [30], mode="ar", max_new_tokens=5),
            EngineRequest(SYSTEM[:21], mode="edit", edit=("revise", {"draft": [20, 21, 22, 23]}),
                          knobs={"rounds": 2})]
    got = run(eng, reqs, at=[0, 6, 12])
    assert got[1].stats.cached_tokens == 20 and got[2].stats.cached_tokens == 20
    assert got[0].token_ids == tm.infill(SYSTEM, suffix, max_new_tokens=4).token_ids
    assert got[1].token_ids == alone(tm, reqs[1]).token_ids
    assert got[2].token_ids == tm.revise(SYSTEM[:21], [20, 21, 22, 23], rounds=2).token_ids


def test_prompts_with_the_mask_and_eos_ids_mid_page_endings(tm):
    cfg = tm.config
    odd = SYSTEM[:9] + [cfg.mask_token_id, cfg.eos_token_id, cfg.mask_token_id] + [17]  # 13: ends mid-page
    reqs = [EngineRequest(odd, mode=m, max_new_tokens=7, knobs=k) for m, k in
            [("ar", {}), ("linear_spec", {"block_length": 3}), ("quadratic_spec", {"block_length": 2}),
             ("diffusion", {"block_length": 3})]]
    eng = engine(tm)
    first = run(eng, reqs)
    second = run(eng, reqs)  # now from the cache
    assert all(r.stats.cached_tokens == 12 for r in second)
    for req, a, b in zip(reqs, first, second):
        assert a.token_ids == b.token_ids == alone(tm, req).token_ids


def test_cancel_while_sharing_pages_spares_the_others(tm):
    eng = engine(tm)
    run(eng, [EngineRequest(SYSTEM + [1], max_new_tokens=2)])
    keep = EngineRequest(SYSTEM + [30, 31], max_new_tokens=12, knobs={"eos_token_id": 0})
    drop = EngineRequest(SYSTEM + [30, 32], mode="linear_spec", max_new_tokens=40,
                         knobs={"eos_token_id": 0, "block_length": 3})
    hk, hd = eng.submit(keep), eng.submit(drop)
    for _ in range(4):
        eng.step()
    assert eng.pool.refs[eng.pool.cache.match(SYSTEM)[0]] == 2  # both hold the system prompt's first page
    hd.cancel()
    while eng.step():
        pass
    assert hd.result().finish_reason == "cancelled"
    assert hk.result().token_ids == alone(tm, keep).token_ids
    check_pool(eng)


def test_eviction_under_load_keeps_outputs(tm):
    rng = random.Random(4)
    eng = engine(tm, kv_cache_tokens=96)
    prompts = [[rng.randint(6, 63) for _ in range(rng.randint(9, 22))] for _ in range(6)]
    reqs = [EngineRequest(p, mode=rng.choice(["ar", "linear_spec", "diffusion"]), max_new_tokens=12,
                          knobs={"eos_token_id": 0, "block_length": 3}) for p in prompts for _ in range(2)]
    got = run(eng, reqs, at=[i for i in range(len(reqs))])
    for req, r in zip(reqs, got):
        assert r.token_ids == alone(tm, req).token_ids
    assert eng.stats()["kv_pages_cached"] <= eng.pool.num_pages


def test_reset_forgets_every_page(tm):
    eng = engine(tm)
    req = EngineRequest(SYSTEM + [9], max_new_tokens=3)
    run(eng, [req])
    assert eng.stats()["kv_pages_cached"] > 0
    assert eng.reset_prefix_cache() > 0
    assert eng.stats()["kv_pages_cached"] == 0 and eng.stats()["kv_pages_free"] == eng.pool.num_pages
    (again,) = run(eng, [req])
    assert again.stats.cached_tokens == 0


def test_cache_off_caches_nothing(tm):
    eng = engine(tm, prefix_cache=False)
    req = EngineRequest(SYSTEM + [9], max_new_tokens=3)
    run(eng, [req, req])
    stats = eng.stats()
    assert stats["kv_pages_cached"] == stats["prefix_cache_hits"] == 0 and not stats["prefix_cache"]


def test_ignore_eos_forces_the_length(tm):
    eng = engine(tm)
    (plain,) = run(eng, [EngineRequest([9, 12, 30], max_new_tokens=40, knobs={"eos_token_id": 0})])
    eos = plain.token_ids[5]  # a token this prompt reaches early
    (r,) = run(eng, [EngineRequest([9, 12, 30], max_new_tokens=40, knobs={"eos_token_id": eos})])
    assert r.finish_reason == "stop" and len(r.token_ids) <= 6
    forced = EngineRequest([9, 12, 30], max_new_tokens=40, ignore_eos=True, knobs={"eos_token_id": eos})
    (f,) = run(eng, [forced])
    assert f.finish_reason == "length" and len(f.token_ids) == 40
    assert f.token_ids[: len(r.token_ids)] == r.token_ids


def test_on_demand_pages_run_more_at_once_and_preempt():
    """A 1,024-token pool, 10 requests of 200 forced tokens: a worst-case reservation runs 4 at once; on demand
    more run, some are preempted, and each ends with its 200 tokens, equal to the request alone."""
    tm = TriMode(random_model(6))
    rng = random.Random(6)
    reqs = [EngineRequest([rng.randint(6, 63) for _ in range(12)], max_new_tokens=200, ignore_eos=True,
                          temperature=0.0 if i % 2 else 0.9, seed=i) for i in range(10)]
    eng = Engine(tm, kv_cache_tokens=1024, page_size=16, cost=flat_cost())
    handles = [eng.submit(r) for r in reqs]
    most = 0
    while eng.step():
        most = max(most, eng.stats()["running_requests"])
    assert most > 4 and eng.stats()["preemptions"] >= 1
    for req, h in zip(reqs, handles):
        events = list(h)
        streamed = [t for e in events[:-1] for t in e.token_ids]
        assert streamed == events[-1].token_ids  # a resumed request sends nothing twice
        assert len(events[-1].token_ids) == 200
        assert events[-1].token_ids == alone(tm, EngineRequest(req.prompt_ids, max_new_tokens=200, seed=req.seed,
                                                               temperature=req.temperature,
                                                               knobs={"eos_token_id": -1})).token_ids
    check_pool(eng)
