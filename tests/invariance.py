"""Batch invariance check: random mixes of requests through the engine against the same requests run alone.

    python -m tests.invariance --model tests/data/tiny-a --dtype float32 --mixes 20 --threads 1

A mix has requests of every mode (`auto` included, whose reference is `ar`: auto is lossless), greedy and
seeded sampling, thinking budgets, arriving at random steps; the engine runs with a small KV budget, small
prefill chunks and a small batch-token cap so that admission waits, chunked prefill and split groups all
happen. A request matches when its tokens and finish reason equal `TriMode.generate` of it alone.

With `shared=True` (`--shared`) the mixes exercise the KV memory instead: prompts start with a few shared prefixes,
a second wave continues first-wave conversations (prompt + its output + more), and the pool is so small that
requests are preempted and cached pages evicted; every prefix that comes from the cache, every preempted and
resumed request must still equal its run alone, and after each mix every page is back in the pool.
"""

from __future__ import annotations

import argparse
import random
import time

from trimode.api import Delta, GenerationResult, TriMode
from trimode.engine.auto import CostModel
from trimode.engine.engine import Engine
from trimode.engine.request import EngineRequest


def flat_cost() -> CostModel:
    """A flat cost curve: auto speculates at any load (a fresh one per engine: engines refine their curve)."""
    return CostModel([(1, 1e-3), (1 << 16, 1e-3)])


def random_request(rng: random.Random, tm: TriMode, max_prompt: int = 14, max_new: int = 20,
                   prefixes: list[list[int]] | None = None) -> EngineRequest:
    """A request of a random mode and settings; with `prefixes`, its prompt starts with (part of) one of them."""
    cfg = tm.config
    tokens = [t for t in range(cfg.vocab_size) if t not in (cfg.mask_token_id, cfg.eos_token_id)]
    prompt = [rng.choice(tokens) for _ in range(rng.randint(1, max_prompt))]
    if prefixes:
        shared = rng.choice(prefixes)
        prompt = shared[: rng.randint(len(shared) // 2, len(shared))] + prompt[: rng.randint(1, 4)]
    mode = rng.choice(["ar", "diffusion", "linear_spec", "quadratic_spec", "auto"])
    knobs: dict = {}
    if mode != "ar":
        knobs["block_length"] = rng.randint(2, 6 if mode != "quadratic_spec" else 5)
    if mode == "diffusion":
        knobs["threshold"] = rng.choice([0.5, 0.9])
        knobs["causal_context"] = rng.random() < 0.7
    if mode == "linear_spec":
        knobs["threshold"] = rng.choice([0.0, 0.0, 0.5])
    if mode in ("linear_spec", "auto") and tm.has_drafter:
        knobs["use_drafter"] = rng.random() < 0.5
    if mode == "quadratic_spec" and rng.random() < 0.3:
        knobs["ar_mix_weight"] = 0.5
    if rng.random() < 0.15:
        knobs["max_thinking_tokens"] = rng.randint(0, 6)
        knobs["end_think_token_id"] = rng.choice(tokens)
    sampled = rng.random() < 0.5
    max_new = rng.randint(1, max_new)
    processors: dict = {}
    if rng.random() < 0.4:  # logit processors: the lossless modes must still equal AR, the engine the run alone
        processors = rng.choice([{"repetition_penalty": rng.choice([1.3, 0.8])},
                                 {"frequency_penalty": rng.choice([0.7, -0.5])},
                                 {"presence_penalty": rng.choice([1.0, -1.0])},
                                 {"logit_bias": {rng.choice(tokens): rng.choice([-100.0, 5.0])}},
                                 {"min_tokens": rng.randint(0, max_new), "frequency_penalty": 0.3}])
    if rng.random() < 0.3:
        processors["logprobs"] = rng.choice([0, 2])
    return EngineRequest(
        prompt_ids=prompt,
        mode=mode,
        max_new_tokens=max_new,
        temperature=rng.choice([0.7, 1.0]) if sampled else 0.0,
        top_p=rng.choice([1.0, 0.9]) if sampled else 1.0,
        top_k=rng.choice([0, 8]) if sampled else 0,
        seed=rng.randint(0, 2**31) if sampled else None,
        provisional=mode == "diffusion" and rng.random() < 0.5,
        knobs=knobs,
        **processors,
    )


PROCESSORS = ("repetition_penalty", "frequency_penalty", "presence_penalty", "logit_bias", "min_tokens", "logprobs")


def alone(tm: TriMode, req: EngineRequest) -> GenerationResult:
    """The request run by itself through `TriMode.generate` (auto's reference is ar)."""
    knobs = {k: v for k, v in req.knobs.items() if v is not None}
    if req.mode == "auto":
        knobs = {k: v for k, v in knobs.items() if k not in ("block_length", "use_drafter")}
    return tm.generate(req.prompt_ids, mode="ar" if req.mode == "auto" else req.mode,
                       max_new_tokens=req.max_new_tokens, temperature=req.temperature, top_p=req.top_p,
                       top_k=req.top_k, seed=req.seed, stop=req.stop, provisional=req.provisional,
                       **{k: getattr(req, k) for k in PROCESSORS}, **knobs)


def run_mix(engine: Engine, arrivals: list[tuple[int, EngineRequest]]) -> list[GenerationResult]:
    """Submit each request at its arrival step, stepping the engine by hand; return the results in order."""
    pending = sorted(range(len(arrivals)), key=lambda i: arrivals[i][0])
    handles: list = [None] * len(arrivals)
    step = 0
    while pending or not all(h.done for h in handles):
        while pending and arrivals[pending[0]][0] <= step:
            i = pending.pop(0)
            handles[i] = engine.submit(arrivals[i][1])
        if not engine.step():
            time.sleep(0.001)  # threads are handing their results over
        step += 1
    results = []
    for h in handles:
        events = list(h)
        result = events[-1]
        streamed = [t for ev in events if isinstance(ev, Delta) for t in ev.token_ids]
        if streamed != result.token_ids:
            raise AssertionError(f"request {h.request_id}: streamed {streamed} but the result has {result.token_ids}")
        results.append(result)
    return results


def same_logprobs(a: GenerationResult, b: GenerationResult, tol: float = 1e-6) -> bool:
    """Both without logprobs, or the same alternatives with values within `tol`."""
    if (a.logprobs is None) != (b.logprobs is None):
        return False
    if a.logprobs is None:
        return True
    pairs = zip(a.logprobs, b.logprobs)
    return len(a.logprobs) == len(b.logprobs) and all(
        abs(x - y) <= tol and [i for i, _ in ta] == [i for i, _ in tb] for (x, ta), (y, tb) in pairs)


def continued(rng: random.Random, tm: TriMode, req: EngineRequest, result: GenerationResult) -> EngineRequest:
    """The next turn of a conversation: the prompt, the answer and a few more tokens, in a random mode."""
    cfg = tm.config
    tokens = [t for t in range(cfg.vocab_size) if t not in (cfg.mask_token_id, cfg.eos_token_id)]
    nxt = random_request(rng, tm)
    nxt.prompt_ids = req.prompt_ids + result.token_ids + [rng.choice(tokens) for _ in range(rng.randint(1, 5))]
    return nxt


def check_pool(engine: Engine) -> None:
    """Every page is back: none held, the free and the idle ones make up the pool, no reference left."""
    pool = engine.pool
    if pool.used_pages or any(pool.refs) or pool.free_pages + pool.idle_pages != pool.num_pages:
        raise AssertionError(f"pages leaked: {pool.used_pages} held, refs {sum(pool.refs)}, {pool.free_pages} free, "
                             f"{pool.idle_pages} idle of {pool.num_pages}")
    if len(set(pool._free)) != len(pool._free) or (pool.cache and set(pool._free) & set(pool.cache.key_of)):
        raise AssertionError("a page is free twice, or both free and cached")


def check(tm: TriMode, mixes: int, requests: int, seed: int = 0, shared: bool = False,
          **engine_kwargs) -> tuple[int, int, list]:
    """(mismatching requests, all requests, details) over `mixes` random mixes (see the module docstring for
    `shared`). Raises when a mix leaks a page."""
    rng = random.Random(seed)
    kwargs = dict(max_queue=1000, kv_budget_tokens=256, max_batch_tokens=48, prefill_chunk=5, page_size=4,
                  max_running=6, cost=flat_cost()) | engine_kwargs
    if shared:
        kwargs = kwargs | dict(kv_budget_tokens=112) | engine_kwargs
    bad, total, details = 0, 0, []
    for m in range(mixes):
        cfg = tm.config
        tokens = [t for t in range(cfg.vocab_size) if t not in (cfg.mask_token_id, cfg.eos_token_id)]
        prefixes = [[rng.choice(tokens) for _ in range(rng.randint(6, 17))] for _ in range(3)] if shared else None
        arrivals = [(rng.randint(0, 12), random_request(rng, tm, prefixes=prefixes)) for _ in range(requests)]
        engine = Engine(tm, **kwargs)
        waves = [(arrivals, run_mix(engine, arrivals))]
        if shared:  # the conversations go on, on the same engine: their pages may still be cached
            nxt = [(rng.randint(0, 6), continued(rng, tm, req, res)) for (_, req), res in zip(*waves[0])]
            waves.append((nxt, run_mix(engine, nxt)))
        check_pool(engine)
        for wave, got in waves:
            for (_, req), res in zip(wave, got, strict=True):
                ref = alone(tm, req)
                total += 1
                same = (res.token_ids, res.finish_reason) == (ref.token_ids, ref.finish_reason)
                if not same or not same_logprobs(res, ref):
                    bad += 1
                    details.append((m, req, res.token_ids, ref.token_ids))
        check.last_stats = engine.stats()
    return bad, total, details


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="checkpoint directory")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--mixes", type=int, default=10)
    parser.add_argument("--requests", type=int, default=8, help="requests per mix")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    parser.add_argument("--shared", action="store_true", help="shared prefixes, second turns, a tiny pool "
                        "(prefix cache hits, preemption, eviction)")
    args = parser.parse_args()
    import torch

    import trimode

    if args.threads:
        torch.set_num_threads(args.threads)

    tm = trimode.load(args.model, dtype=args.dtype, device="cpu")
    bad, total, details = check(tm, args.mixes, args.requests, args.seed, shared=args.shared)
    by_mode: dict[str, list[int]] = {}
    for _, req, _, _ in details:
        by_mode.setdefault(req.mode, []).append(req.request_id)
    print(f"{args.dtype}: {bad} of {total} requests differ from their run alone ({100 * bad / max(total, 1):.1f}%)"
          f"; by mode: { {k: len(v) for k, v in by_mode.items()} }")


if __name__ == "__main__":
    main()
