"""Time one training step of a recipe's model on CPU, with the trainer's own objective and optimizer.

    python scripts/time_train_step.py --recipe recipes/default_model.yaml --threads 1

Builds the recipe's `model.config` at random (vocabulary: `tokenizer.train_vocab_size`), then runs whole steps
of `train.batch_size` rows of `data.seq_len` random tokens: corruption, the dual-stream forward + backward of
`JointObjective` per micro-batch, gradient clipping and AdamW. Prints seconds per step and the time the recipe's
`train.steps` would take at that rate. Data loading and tokenizer training are not included. The process CPU time
is printed too: with one thread on a busy shared machine it is close to what the wall time would be on an idle core.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from trimode.model.config import NLDConfig
from trimode.model.transformer import NLDTransformer
from trimode.train.objective import JointObjective, corrupt, global_loss, noise_key
from trimode.train.recipe import Recipe
from trimode.train.tokenizer_train import SPECIAL_TOKENS


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--recipe", required=True)
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    ap.add_argument("--steps", type=int, default=4, help="timed steps (one more is run first as warm-up)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    recipe = Recipe.load(args.recipe)
    cfg = dict(recipe.model.config or {})
    vocab = cfg.get("vocab_size") or recipe.tokenizer.train_vocab_size
    for key in ("bos_token_id", "eos_token_id", "mask_token_id", "pad_token_id"):
        if isinstance(cfg.get(key), str):  # token strings name the special tokens tokenizer_train places first
            cfg[key] = SPECIAL_TOKENS.index(cfg[key])
    cfg["vocab_size"] = vocab
    net = NLDTransformer(NLDConfig(**cfg)).train()
    n_params = sum(p.numel() for p in net.parameters())
    objective = JointObjective(net, recipe.objective.block_size or net.config.block_size)
    opt = torch.optim.AdamW(net.parameters(), lr=recipe.optim.lr)
    rows, seq = recipe.train.batch_size, recipe.data.seq_len
    micro = recipe.train.micro_batch_size or rows
    g = torch.Generator().manual_seed(0)
    times, cpu_times = [], []
    for step in range(args.steps + 1):
        ids = torch.randint(0, vocab, (rows, seq), generator=g)
        lm = torch.ones(rows, seq, dtype=torch.bool)
        t0, c0 = time.perf_counter(), time.process_time()
        noise = corrupt(ids, lm, net.config.mask_token_id, [noise_key(0, step, r) for r in range(rows)])
        opt.zero_grad(set_to_none=True)
        ar_count, diff_count = float(lm[:, 1:].sum()), float(noise.masked.sum())
        for s in range(0, rows, micro):
            part = slice(s, s + micro)
            sub = type(noise)(noise.noisy[part], noise.masked[part], noise.p[part])
            sums = objective(ids[part], lm[part], sub)
            global_loss(sums, recipe.objective.alpha, ar_count, diff_count).backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
        if step:
            times.append(time.perf_counter() - t0)
            cpu_times.append(time.process_time() - c0)
    per_step, cpu_step = statistics.median(times), statistics.median(cpu_times)
    total, cpu_total = per_step * recipe.train.steps, cpu_step * recipe.train.steps
    print(f"{n_params / 1e6:.2f}M parameters, {rows} rows x {seq} tokens per step ({micro} rows per forward), "
          f"{args.threads} thread(s)")
    print(f"wall {per_step:.3f} s/step (median of {len(times)}), {rows * seq / per_step:.0f} tokens/s; "
          f"train.steps={recipe.train.steps} -> {total / 60:.1f} min")
    print(f"CPU  {cpu_step:.3f} s/step, {rows * seq / cpu_step:.0f} tokens/s; "
          f"train.steps={recipe.train.steps} -> {cpu_total / 60:.1f} min of CPU time")


if __name__ == "__main__":
    main()
