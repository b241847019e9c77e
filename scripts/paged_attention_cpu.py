"""How a batched AR step's attention reads the KV on a CPU: the engine's paged gather, the bare network's contiguous
cache, and torch's `flex_attention` reading the pages where they are (compiled, a block mask per page).

A diagnostic (one layer's write + read + attention timed in this thread, no engine, no clients), to explain where
the engine's forward differs from the bare one; `trimode bench engine --served` is the measurement users compare.

    OMP_NUM_THREADS=1 GLIBC_TUNABLES=glibc.malloc.mmap_threshold=268435456:glibc.malloc.trim_threshold=1073741824 \
        python scripts/paged_attention_cpu.py --rows 64 --past 96 [--model DIR] [--no-flex]

(The tunables keep glibc from handing the gathered buffers back to the OS between calls: in this tight loop it
may, in some processes and not others, and every call then page-faults its output; the engine as users run it,
with other allocations between its gathers, showed no difference with them: docs/engine.md, "Later on 2026-12-05".)

The pool and every row's pages are laid out by the engine's own code (`KVPool`, `PagedCache`: the prompt's pages
at admission, then one page at a time as all rows grow together, as in the 64-request benchmark), and the gathered
read is the engine's (`runner.RowsView`). Per path: microseconds per layer (write the new token's K/V, read the
prefix, attend), median of `--rounds` (min-max), and each output's largest difference from the gather's (the
bare cache holds the same values as the pages, so every path computes the same attention).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

import trimode
from trimode.engine.kv_pool import KVPool, PagedCache
from trimode.engine.runner import RowsView


def timed(fn, reps: int) -> float:
    for _ in range(5):
        fn()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t0) / reps


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=64)
    p.add_argument("--prompt", type=int, default=32, help="prompt tokens per row (its pages come at admission)")
    p.add_argument("--past", type=int, default=96, help="cached tokens per row when the step runs")
    p.add_argument("--model", default=None, help="checkpoint whose KV shape to use (default: the bundled model)")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--reps", type=int, default=50)
    p.add_argument("--no-flex", action="store_true", help="skip flex_attention (it compiles with a C++ compiler)")
    args = p.parse_args()
    if args.rows < 2 or args.past < args.prompt or args.prompt < 1:
        p.error("needs --rows >= 2 and --past >= --prompt >= 1")
    torch.set_num_threads(1)
    cfg = trimode.load(args.model).config
    r, kv, d, h = args.rows, cfg.num_key_value_heads, cfg.head_dim, cfg.num_attention_heads
    page = 16
    pool = KVPool(cfg, torch.float32, torch.device("cpu"), budget_tokens=r * (args.past + 2 * page), page_size=page)
    for buf in (pool.k, pool.v):
        buf.normal_()
        buf[:, 0] = 0
    caches = [PagedCache(pool) for _ in range(r)]
    for c in caches:  # admission: each prompt's pages
        c.reserve(args.prompt + 1)
        c.length = args.prompt
    while caches[0].length < args.past:  # then every row one token a step, a page when it needs one
        for c in caches:
            c.reserve(c.length + 1)
            c.length += 1
    width = args.past + 1
    for c in caches:  # the step's own token (the scheduler grows every cache for its pass)
        c.reserve(width)
    q = torch.randn(r, h, 1, d)
    k_new, v_new = torch.randn(r, kv, 1, d), torch.randn(r, kv, 1, d)
    view = RowsView(pool, caches, 1)
    mask = (torch.arange(width)[None, :] <= view.pasts[:, None])[:, None, None]
    gqa = h != kv

    def gathered():
        keys, values = view.write_scratch(0, k_new, v_new)
        return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, enable_gqa=gqa)

    # The bare network's cache ([rows, kv heads, capacity, head dim]) holding the same values as the rows' pages.
    bare_k, bare_v = torch.zeros(r, kv, width + 31, d), torch.zeros(r, kv, width + 31, d)
    keys, values = view.write_scratch(0, k_new, v_new)
    bare_k[:, :, :width], bare_v[:, :, :width] = keys, values

    def contiguous():
        bare_k[:, :, args.past : width] = k_new
        bare_v[:, :, args.past : width] = v_new
        return F.scaled_dot_product_attention(q, bare_k[:, :, :width], bare_v[:, :, :width], enable_gqa=gqa)

    paths = {"engine: paged gather + SDPA": gathered, "bare: contiguous cache + SDPA": contiguous}
    reference = gathered()
    if not args.no_flex:
        from torch.nn.attention.flex_attention import BlockMask, flex_attention

        # The pool's slots without the null slot 0, so page p is block p; each row's blocks are its pages, in order.
        n_pages = -(-width // page)
        pages = torch.tensor([c.pages[:n_pages] for c in caches])
        rank = torch.full((r, pool.num_pages), -1, dtype=torch.long)  # a page's place in its row's list
        rank.scatter_(1, pages, torch.arange(n_pages).expand(r, -1))
        pasts = view.pasts

        def mask_mod(b, hh, qi, kvi):
            return rank[b, kvi // page] * page + kvi % page <= pasts[b]

        indices = torch.zeros(r, 1, 1, pool.num_pages, dtype=torch.int32)  # each row's pages first, then unused
        indices[:, 0, 0, :n_pages] = pages.to(torch.int32)
        block_mask = BlockMask.from_kv_blocks(
            torch.full((r, 1, 1), n_pages, dtype=torch.int32), indices,
            BLOCK_SIZE=(1, page), mask_mod=mask_mod, seq_lengths=(1, pool.num_pages * page))
        compiled = torch.compile(flex_attention)
        write = view.write

        def in_place():
            for buf, new in ((pool.k[0], k_new), (pool.v[0], v_new)):
                buf.index_copy_(0, write, new.transpose(1, 2).reshape(r, kv, d))
            keys = pool.k[0, 1:].transpose(0, 1)[None].expand(r, -1, -1, -1)
            values = pool.v[0, 1:].transpose(0, 1)[None].expand(r, -1, -1, -1)
            return compiled(q, keys, values, block_mask=block_mask, enable_gqa=gqa)

        t0 = time.perf_counter()
        in_place()
        print(f"flex_attention compiled in {time.perf_counter() - t0:.1f} s")
        paths["flex_attention over the pages in place"] = in_place

    print(f"{r} rows x {width} keys, {kv} kv heads x {d}, {h} query heads, float32, 1 torch thread; "
          f"pool {pool.num_pages} pages of {page}")
    base = None
    for name, fn in paths.items():
        runs = [timed(fn, args.reps) * 1e6 for _ in range(args.rounds)]
        us = statistics.median(runs)
        base = base or us
        diff = "" if fn is gathered else f", max |diff| from the gather {float((fn() - reference).abs().max()):.1e}"
        print(f"  {name:42s} {us:8.1f} us per layer ({min(runs):.0f}-{max(runs):.0f}; {us / base:.2f}x the gather)"
              + diff)


if __name__ == "__main__":
    main()
