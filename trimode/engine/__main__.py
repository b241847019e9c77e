"""`python -m trimode.engine --model DIR`: a model's forward-cost curve and what `mode: auto` picks per load.

The table uses what the engine measures at start-up (the cost curve and each mode's slowdown); in service the
engine also learns the per-row overhead of a step (Python work of the decoders, streaming) and refines the curve
with every timed forward (docs/engine.md).
"""

from __future__ import annotations

import torch

from trimode.engine.auto import AutoConfig, AutoPolicy, CostModel, label, measure_slowdowns


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
    parser.add_argument("--tokens-per-cycle", nargs="*", default=[], metavar="MODE@BLOCK=TOKENS",
                        help="assumed tokens per cycle, e.g. linear_spec@16=2.6 (others: the prior, 2 or the block)")
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
          + ", ".join(f"{label(c)} {v:.2f}" for c, v in policy.slowdowns.items()))
    policy.overhead_per_row = args.overhead_per_row_ms / 1e3
    for item in args.tokens_per_cycle:
        name, _, value = item.partition("=")
        mode, _, b = name.partition("@")
        try:
            choice = (mode, int(b))
            policy.observe(choice, float(value))  # with prior_weight 0: the estimate is this value
        except ValueError:
            parser.error(f"--tokens-per-cycle takes MODE@BLOCK=TOKENS, e.g. linear_spec@16=2.6; got {item!r}")
    print(f"auto at block_length {block}, step overhead {args.overhead_per_row_ms} ms per row; tokens per cycle "
          + ", ".join(f"{label(c)} {policy.tokens_per_cycle(c):.2f}" for c in policy.candidates(block)))
    print("scores (expected tokens per second per row; the best two):")
    for n in (1, 2, 4, 8, 16, 32, 64, 128):
        rows["n"] = n
        scores = policy.scores(block)
        ranked = sorted(scores, key=scores.get, reverse=True)
        print(f"  {n:>4} rows: " + "  ".join(f"{label(c):<18} {scores[c]:8.1f}" for c in ranked[:2])
              + f"  (ar {scores[('ar', 1)]:.1f})")

if __name__ == "__main__":
    main()
