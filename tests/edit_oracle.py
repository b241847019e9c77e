"""The editing contract written with plain forward passes of the network: a reference for `tm.infill` and
`tm.revise` (tests/test_bundled_model.py checks that both give its tokens), and the way to measure a block the
API does not offer: revision without the open end (`revise_tokens(..., open_end=False)`, the "draft alone" row
of docs/editing.md).

    from tests.edit_oracle import infill_tokens, revise_tokens
    middle, passes = infill_tokens(tm.net, prefix_ids, suffix_ids, budget=8)
"""

from __future__ import annotations

import torch

from trimode.model.transformer import NLDTransformer


def _fill(net: NLDTransformer, cache, block: torch.Tensor, fill: torch.Tensor, threshold: float,
          first: list[int] | None = None) -> int:
    """Denoise the masked slots of `block` [T] (`fill` [T] bool: the slots that may be written) in place: each
    pass commits every masked slot whose top-1 confidence is >= threshold, and at least the best one. Passes read
    the cache and never write it. Returns the number of passes."""
    mask_id = net.config.mask_token_id
    passes = 0
    while bool((fill & (block == mask_id)).any()):
        logits = net(block[None], mask="bidirectional", cache=cache)[0].float()
        logits[:, mask_id] = float("-inf")
        if first is not None:
            allowed = torch.zeros(logits.shape[-1], dtype=torch.bool, device=logits.device)
            allowed[first] = True
            logits[0, ~allowed] = float("-inf")
        conf, pred = logits.softmax(-1).max(-1)
        open_ = fill & (block == mask_id)
        conf = torch.where(open_, conf, torch.full_like(conf, -1.0))
        take = open_ & (conf >= threshold)
        take[int(conf.argmax())] = True
        block[take] = pred[take]
        passes += 1
    return passes


def _prefilled(net: NLDTransformer, prefix: list[int], extra: int):
    cache = net.new_cache(1, capacity=len(prefix) + extra + 8)
    net(torch.tensor([prefix], device=net.device), mask="causal", cache=cache)
    cache.commit(len(prefix))
    return cache


@torch.no_grad()
def infill_tokens(net: NLDTransformer, prefix: list[int], suffix: list[int], budget: int, threshold: float = 0.9,
                  first: list[int] | None = None, window: int = 6) -> tuple[list[int], int]:
    """(middle tokens, forward passes) of a hole of at most `budget` tokens between `prefix` and `suffix`.

    The contract: the cache holds the causal prefix; one block `[MASK x N] + suffix` at the positions after it,
    bidirectional over itself and the cache; the suffix never changes; masks are filled over passes (commit
    confidence >= threshold, at least one per pass); pad tokens in the filled slots are dropped. N starts at
    `window` (0: the budget) and doubles, up to the budget, while the model writes no pad in the hole. `first`:
    the only tokens the first slot may take (token healing: the caller took a trailing space token off the prefix
    and gave the hole one more slot, see `NLDTokenizer.heal_trailing_space`).
    """
    pad = net.config.pad_token_id
    cache = _prefilled(net, prefix, budget + len(suffix))
    size, passes = (min(window, budget) if window else budget), 1
    while True:
        block = torch.tensor([net.config.mask_token_id] * size + list(suffix), device=net.device)
        fill = torch.arange(block.numel(), device=net.device) < size
        passes += _fill(net, cache, block, fill, threshold, first)
        middle = block[:size].tolist()
        if size == budget or pad in middle:
            return [t for t in middle if t != pad], passes
        size = min(2 * size, budget)


@torch.no_grad()
def revise_tokens(net: NLDTransformer, prompt: list[int], draft: list[int], knob: float = 0.9, rounds: int = 4,
                  threshold: float = 0.9, open_end: bool = True) -> tuple[list[int], int, int]:
    """(revised draft, forward passes, tokens remasked over all rounds).

    The contract: the cache holds the prompt; the block is the draft and one mask slot after it (its open end,
    never written), bidirectional; each round, the draft tokens where the model's top prediction differs from
    the present token with confidence >= `knob` are remasked and refilled by denoising; at most `rounds` rounds
    (a round that changes nothing ends it). (`tm.revise(rounds=R)` fills first, then runs R - 1 such rounds:
    the same tokens whenever fewer than R - 1 rounds change something.)

    `open_end=False` drops the mask slot (the block is the draft alone: the ablation of docs/editing.md). With
    every token visible, the last tokens of the block see exactly what the causal stream sees at the same
    positions, where a model trained with the AR loss predicts the *next* token; the open end tells them apart.
    """
    mask_id = net.config.mask_token_id
    cache = _prefilled(net, prompt, len(draft) + 1)
    block = torch.tensor(list(draft) + [mask_id] * open_end, device=net.device)
    editable = torch.arange(block.numel(), device=net.device) < len(draft)
    forwards, remasked = 1, 0
    for _ in range(rounds):
        logits = net(block[None], mask="bidirectional", cache=cache)[0].float()
        forwards += 1
        logits[:, mask_id] = float("-inf")
        conf, pred = logits.softmax(-1).max(-1)
        wrong = (pred != block) & (conf >= knob) & editable
        if not bool(wrong.any()):
            break
        block[wrong] = mask_id
        remasked += int(wrong.sum())
        forwards += _fill(net, cache, block, wrong, threshold)
    return block[: len(draft)].tolist(), forwards, remasked
