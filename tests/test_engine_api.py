"""The engine's contract: validation, queue limits, admission under the KV budget, cancel, stop, streaming."""

import asyncio
import threading

import pytest

from tests.conftest import random_model
from tests.invariance import alone, flat_cost
from trimode.api import Delta, GenerationResult, TriMode
from trimode.engine import Engine, EngineRequest, EngineStopped, QueueFull


@pytest.fixture(scope="module")
def tm():
    return TriMode(random_model(0, lora=True))


def req(prompt=(9, 12, 30), **kw) -> EngineRequest:
    kw.setdefault("knobs", {"eos_token_id": 0})  # token 0 is never produced by these prompts: full length
    return EngineRequest(prompt_ids=list(prompt), **kw)


@pytest.mark.parametrize("bad, message", [
    (dict(mode="fast"), "unknown mode"),
    (dict(prompt=()), "prompt is empty"),
    (dict(prompt=(9, 640)), "prompt token ids must be in"),
    (dict(max_new_tokens=-1), "max_new_tokens must be >= 0"),  # 0: the prompt's pass only (scoring)
    (dict(temperature=-1.0), "temperature must be >= 0"),
    (dict(knobs={"block_size": 4}), "unknown knob"),
    (dict(mode="diffusion", knobs={"threshold": 1.5}), "threshold must be in"),
    (dict(mode="linear_spec", knobs={"block_length": 1}), "too small"),
])
def test_bad_requests_raise_value_error_before_queueing(tm, bad, message):
    engine = Engine(tm, cost=flat_cost())
    with pytest.raises(ValueError, match=message):
        engine.submit(req(**bad))
    assert engine.stats()["queue_depth"] == 0


def test_a_request_larger_than_the_kv_budget_is_rejected(tm):
    engine = Engine(tm, kv_budget_tokens=64, page_size=8, cost=flat_cost())
    with pytest.raises(ValueError, match="KV cache slots"):
        engine.submit(req(max_new_tokens=100))


def test_queue_full(tm):
    # Capacity is max_running + max_queue, counted before the loop admits anything (here: no loop at all).
    engine = Engine(tm, max_queue=2, max_running=1, cost=flat_cost())
    for _ in range(3):
        engine.submit(req())
    with pytest.raises(QueueFull):
        engine.submit(req())
    assert engine.stats()["counters"]["rejected"] == 1


def test_no_waiting_room_still_runs_what_fits(tm):
    engine = Engine(tm, max_queue=0, max_running=2, cost=flat_cost())
    handles = [engine.submit(req(max_new_tokens=3)), engine.submit(req(max_new_tokens=3))]
    with pytest.raises(QueueFull):
        engine.submit(req())
    while engine.step():
        pass
    assert [len(h.result().token_ids) for h in handles] == [3, 3]


def test_concurrent_clients_on_the_background_loop(tm):
    prompts = [[7 + i, 20 + 2 * i, 40 - i] for i in range(10)]
    modes = ["ar", "diffusion", "linear_spec", "quadratic_spec", "auto"]
    requests = [req(p, mode=modes[i % 5], max_new_tokens=10, temperature=0.7 * (i % 2), seed=i)
                for i, p in enumerate(prompts)]
    results: dict[int, GenerationResult] = {}

    def client(i):
        handle = engine.submit(requests[i])
        events = list(handle)
        assert isinstance(events[-1], GenerationResult)
        assert [t for e in events if isinstance(e, Delta) for t in e.token_ids] == events[-1].token_ids
        results[i] = events[-1]

    with Engine(tm, cost=flat_cost()) as engine:
        threads = [threading.Thread(target=client, args=(i,)) for i in range(len(requests))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        stats = engine.stats()
    assert len(results) == len(requests)
    for i, r in enumerate(requests):
        assert results[i].token_ids == alone(tm, r).token_ids
        assert results[i].mode == r.mode
    assert stats["counters"]["finished"] == len(requests)
    assert stats["kv_free_tokens"] == stats["kv_budget_tokens"]


def test_kv_pages_on_demand_with_preemption(tm):
    # Room for one 3 + 20 token AR request's worst case. Pages come on demand, so more than one starts; when the
    # pool runs dry the newest is preempted and resumed later, and none fails or changes its output.
    engine = Engine(tm, kv_cache_tokens=24, page_size=8, cost=flat_cost())
    handles = [engine.submit(req(max_new_tokens=20)) for _ in range(3)]
    most_running = 0
    while not all(h.done for h in handles):
        engine.step()
        most_running = max(most_running, engine.stats()["running_rows"])
    assert most_running >= 2
    stats = engine.stats()
    assert stats["preemptions"] >= 1
    assert [h.result().token_ids for h in handles] == [alone(tm, req(max_new_tokens=20)).token_ids] * 3
    assert stats["kv_pages_used"] == 0 and stats["kv_free_tokens"] == stats["kv_budget_tokens"]


def test_cancel_frees_the_cache_and_spares_the_others(tm):
    with Engine(tm, cost=flat_cost()) as engine:
        long = engine.submit(req(max_new_tokens=400))
        other = engine.submit(req((11, 13), max_new_tokens=12))
        first = next(iter(long))
        assert isinstance(first, Delta)
        long.cancel()
        rest = list(long)
        assert rest[-1].finish_reason == "cancelled"
        assert len(rest[-1].token_ids) < 400
        assert other.result().token_ids == alone(tm, req((11, 13), max_new_tokens=12)).token_ids
        while engine.stats()["running_rows"]:
            pass
        stats = engine.stats()
    assert stats["kv_free_tokens"] == stats["kv_budget_tokens"]
    assert stats["counters"]["cancelled"] == 1


def test_cancel_while_queued(tm):
    engine = Engine(tm, cost=flat_cost())
    handle = engine.submit(req())
    handle.cancel()
    engine.step()
    assert handle.result().finish_reason == "cancelled"


def test_stop_ends_unfinished_requests(tm):
    engine = Engine(tm, cost=flat_cost()).start()
    running = engine.submit(req(max_new_tokens=400))
    next(iter(running))
    engine.stop()
    with pytest.raises(EngineStopped):
        running.result()
    with pytest.raises(EngineStopped):
        engine.submit(req())


def test_asyncio_clients(tm):
    async def main():
        handles = [engine.submit(req((9, k), max_new_tokens=8, mode="quadratic_spec")) for k in range(20, 26)]

        async def consume(h):
            return [ev async for ev in h.aiter()][-1]

        return await asyncio.gather(*(consume(h) for h in handles))

    with Engine(tm, cost=flat_cost()) as engine:
        results = asyncio.run(main())
    for k, r in zip(range(20, 26), results, strict=True):
        assert r.token_ids == alone(tm, req((9, k), max_new_tokens=8, mode="quadratic_spec")).token_ids


def test_asyncio_readers_on_one_loop_are_woken_once_per_step(tm):
    """A server's handlers share one event loop: the engine calls into it once per step for every request that
    made events (and once per request that ends), not once per request per step."""
    calls = []

    async def main():
        loop = asyncio.get_running_loop()
        real = loop.call_soon_threadsafe
        loop.call_soon_threadsafe = lambda *a, **k: (calls.append(1), real(*a, **k))[1]
        handles = [engine.submit(req((9, k), max_new_tokens=12, mode="ar")) for k in range(20, 36)]

        async def consume(h):
            return [ev async for ev in h.aiter()][-1]

        return await asyncio.gather(*(consume(h) for h in handles))

    with Engine(tm, cost=flat_cost()) as engine:
        results = asyncio.run(main())
        steps = engine.stats()["counters"]["steps"]
    assert all(len(r.token_ids) == 12 for r in results)
    assert steps >= 10
    assert len(calls) <= steps + 2 * len(results)  # one per step, plus a request's end (not 16 per step)

def test_one_loop_thread_however_many_requests_run(tm):
    before = threading.active_count()
    engine = Engine(tm, cost=flat_cost()).start()
    try:
        handles = [engine.submit(req((7 + i, 20, 30), mode=("ar", "linear_spec", "diffusion")[i % 3],
                                     max_new_tokens=40)) for i in range(32)]
        alive = threading.active_count()
        while engine.stats()["running_requests"] < 8 and not all(h.done for h in handles):
            alive = max(alive, threading.active_count())
        assert alive <= before + 1  # the step loop; no thread per request
        assert all(h.result().finish_reason in ("stop", "length") for h in handles)
    finally:
        engine.stop()


def test_prompt_logprobs_are_the_causal_pass_over_the_prompt(tm):
    """`prompt_logprobs`: per prompt token the log-softmax of the causal pass at the position before it, read off
    the request's first pass, the same in one pass and in chunks, and next to other requests; with
    max_new_tokens=0 the request ends after that pass."""
    import torch

    prompt = [9, 12, 30, 7, 5, 38, 41, 3, 19, 60, 2]
    with torch.no_grad():
        logp = torch.log_softmax(tm.net(torch.tensor([prompt]), mask="causal")[0].double(), -1)
    want = [logp[i - 1, t].item() for i, t in enumerate(prompt) if i > 0]
    for chunk in (64, 3):
        engine = Engine(tm, cost=flat_cost(), prefill_chunk=chunk)
        handles = [engine.submit(req(prompt, mode=mode, max_new_tokens=n, prompt_logprobs=2))
                   for mode, n in (("ar", 0), ("linear_spec", 3), ("quadratic_spec", 3), ("auto", 2))]
        other = engine.submit(req((5, 6), max_new_tokens=4))
        while engine.step():
            pass
        results = [h.result() for h in handles]
        for r in results:
            scores = r.prompt_logprobs
            assert scores[0] is None and len(scores) == len(prompt)
            assert [s.logprob for s in scores[1:]] == pytest.approx(want, abs=1e-4)
            assert all(s.top[0][1] >= s.logprob and len(s.top) == 2 and s.rank >= 1 for s in scores[1:])
            assert all((s.rank == 1) == (s.top[0][0] == s.token_id) for s in scores[1:])
        zero = results[0]
        assert zero.token_ids == [] and zero.finish_reason == "length" and zero.stats.forward_passes == 1
        assert len(other.result().token_ids) == 4
    engine = Engine(tm, cost=flat_cost())
    nothing = engine.submit(req(prompt, max_new_tokens=0))
    while engine.step():
        pass
    nothing = nothing.result()
    assert nothing.token_ids == [] and nothing.stats.forward_passes == 0
    bad = engine.submit(req(prompt, mode="diffusion", max_new_tokens=4, prompt_logprobs=1,
                            knobs={"eos_token_id": 0, "causal_context": False}))
    while engine.step():
        pass
    with pytest.raises(ValueError, match="not a causal pass"):
        bad.result()
