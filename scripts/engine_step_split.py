"""Where an engine step's time goes, AR at R rows: the fused forward, the scheduler's plan, the decision stage,
the machines' advance (events, detokenization) and the rest, against the bare network's forwards of the same
shapes (`trimode.bench.engine_bench.replay`, best of 3). The engine is stepped in this thread (no clients), so
this splits the engine's own cost; `trimode bench engine --served` measures it as a server runs it.

    OMP_NUM_THREADS=1 python scripts/engine_step_split.py --rows 64 --rounds 3 [--model DIR]

Per round: milliseconds per decode step (prefill excluded), each part's share, the Python outside the forward
per row, and engine / bare (the bare forwards' time over the engine's).
"""

from __future__ import annotations

import argparse
import random
import time

import torch

import trimode
import trimode.engine.engine as engine_module
from trimode.bench.engine_bench import replay
from trimode.engine.auto import CostModel
from trimode.engine.engine import Engine
from trimode.engine.request import EngineRequest
from trimode.engine.scheduler import Scheduler


def timed(owner, name: str, key: str, spent: dict[str, float]) -> None:
    """Wrap owner.name so that its wall time adds up under spent[key]."""
    inner = getattr(owner, name)

    def wrapper(*args, **kwargs):
        t0 = time.perf_counter()
        try:
            return inner(*args, **kwargs)
        finally:
            spent[key] = spent.get(key, 0.0) + time.perf_counter() - t0

    setattr(owner, name, wrapper)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=64)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--prompt", type=int, default=32, help="prompt tokens per request")
    p.add_argument("--new", type=int, default=64, help="new tokens per request (EOS off)")
    p.add_argument("--model", default=None)
    args = p.parse_args()
    torch.set_num_threads(1)
    tm = trimode.load(args.model)
    spent: dict[str, float] = {}
    timed(engine_module, "run_step", "forward", spent)
    timed(Scheduler, "plan", "plan", spent)
    timed(Engine, "_decide", "decide", spent)
    timed(Engine, "_advance", "advance", spent)
    rng = random.Random(0)
    vocab = tm.config.vocab_size
    print(f"{args.rows} AR rows, {args.prompt}-token prompts, {args.new} new tokens, 1 torch thread")
    for _ in range(args.rounds):
        engine = Engine(tm, max_queue=args.rows, max_running=max(64, args.rows),
                        cost=CostModel([(1, 1e-3), (1 << 16, 1e-3)]))
        for _ in range(args.rows):
            engine.submit(EngineRequest([rng.randrange(4, vocab) for _ in range(args.prompt)], mode="ar",
                                        max_new_tokens=args.new, knobs={"eos_token_id": -1}))
        engine.step()  # the prefill
        engine.trace = []
        spent.clear()
        steps, t0 = 0, time.perf_counter()
        while engine.step():
            steps += 1
        total = (time.perf_counter() - t0) / steps
        bare = min(replay(tm, engine.trace) for _ in range(3)) / steps
        per = {k: v / steps for k, v in spent.items()}
        rest = total - sum(per.values())
        python = (total - per["forward"]) / args.rows
        print(f"step {1e3 * total:.2f} ms: " + ", ".join(f"{k} {1e3 * v:.2f}" for k, v in per.items())
              + f", rest {1e3 * rest:.2f}; outside the forward {1e6 * python:.1f} us per row; bare forwards "
              f"{1e3 * bare:.2f} ms, engine / bare {bare / total:.2f}, forward / bare {per['forward'] / bare:.2f}")


if __name__ == "__main__":
    main()
