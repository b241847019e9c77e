"""`python -m trimode.engine --model DIR`: a model's forward-cost curve and what `mode: auto` picks per load.

The table uses what the engine measures at start-up (the cost curve and each mode's slowdown); in service the
engine also learns the per-row overhead of a step (Python work of the decoders, streaming) and refines the curve
with every timed forward (docs/engine.md).
"""

from __future__ import annotations

import torch

from trimode.engine.auto import AutoConfig, AutoPolicy, CostModel, measure_slowdowns


def main() -> None:
    """Print the measured cost curve of a model and what auto picks at each load."""
    import argparse

    import trimode

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--model", required=True, help="checkpoint directory")
    parser.add_argument("--dtype", default=None)
    parser.add_argument("--device", default=None)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    parser.add_argument("--block-length", type=int, default=None)
    parser.add_argument("--tokens-per-cycle", type=float, nargs=2, default=(2.0, 2.0), metavar=("LINEAR", "QUAD"),
                        help="assumed tokens per cycle of linear_spec and quadratic_spec")
    parser.add_argument("--overhead-per-row-ms", type=float, default=0.0,
                        help="per-row step overhead to assume (the engine learns it in service; see its stats)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    tm = trimode.load(args.model, dtype=args.dtype, device=args.device)
    block = args.block_length or tm.config.block_size
    cost = CostModel.measure(tm.net)
    print(f"forward cost on {tm.net.device} ({torch.get_num_threads()} threads), rows x 1 token:")
    for n, t in cost.points:
        print(f"  {n:>6} tokens  {1e3 * t:9.2f} ms")
    print(f"knee (<= 1.5 x the 1-token forward): {cost.knee()} tokens")
    rows = {"n": 1}
    policy = AutoPolicy(AutoConfig(prior_weight=0), cost, lambda: rows["n"])
    policy.slowdowns = measure_slowdowns(tm.net, cost, block)
    print("slowdown (a cycle run alone over the curve's prediction): "
          + ", ".join(f"{m} {v:.2f}" for m, v in policy.slowdowns.items()))
    policy.overhead_per_row = args.overhead_per_row_ms / 1e3
    policy.observe("linear_spec", block, args.tokens_per_cycle[0])  # with prior_weight 0: the estimate is this
    policy.observe("quadratic_spec", block, args.tokens_per_cycle[1])
    print(f"auto at block_length {block}, tokens per cycle linear {args.tokens_per_cycle[0]}, quadratic "
          f"{args.tokens_per_cycle[1]}, step overhead {args.overhead_per_row_ms} ms per row (scores: expected "
          "tokens per second per row):")
    for n in (1, 2, 4, 8, 16, 32, 64, 128):
        rows["n"] = n
        scores = policy.scores(block)
        best = max(scores, key=scores.get)
        print(f"  {n:>4} rows: {best:<15} " + "  ".join(f"{m} {s:8.1f}" for m, s in scores.items()))


if __name__ == "__main__":
    main()
