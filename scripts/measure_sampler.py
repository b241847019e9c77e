"""Tokens per decode forward and accuracy of the threshold rule against the learned sampler on fresh held-out
items: `python scripts/measure_sampler.py SAMPLER_DIR ITEMS_PER_TASK SEED` (docs/quality.md)."""

import sys
import time
from pathlib import Path

import torch

import trimode
from trimode.bench.quality import load_items
from trimode.bench.sol import end_to_end
from trimode.model.loading import attach_sampler
from trimode.tasks import plain_tasks


def main() -> None:
    torch.set_num_threads(1)
    tm = trimode.load()
    attach_sampler(tm.net, Path(sys.argv[1]))
    n, seed = int(sys.argv[2]), int(sys.argv[3])
    items = [it for name in sorted(plain_tasks()) for it in load_items(name, n, seed)]
    cfg = {f"thr {t}": {"mode": "diffusion", "threshold": t} for t in (0.5, 0.7, 0.9)}
    cfg |= {f"learned {t}": {"mode": "diffusion", "unmask": "learned", "threshold": t} for t in (0.3, 0.5, 0.7, 0.9)}
    t0 = time.time()
    for k, v in end_to_end(tm, items, cfg).items():
        print(f"{k:14} TPDF {v['tokens_per_decode_forward']:.3f} acc {v['accuracy']:.3f} n {v['n']}")
    print(f"{time.time() - t0:.1f} s")


if __name__ == "__main__":
    main()
