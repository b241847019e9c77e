"""Editing as a step machine: fill holes in a block (infill, templates) and revise a draft (spec: NLD revises and
fills in the middle natively; these machines use only the block-diffusion pass every NLD model is trained on).

The KV cache holds the causal prefix (the prompt, and the text before the first hole). One block follows it:
given tokens and holes (`EditBlock`), attending bidirectionally to itself and to the cache, so a hole sees the
text after it (the whole suffix, however many training blocks it spans: the block is as long as holes plus
suffix). Then, in rounds:
- fill: every hole slot starts as the mask id; each pass commits the masked slots whose confidence passes
  `threshold` (at least the best one), as block diffusion does, until no mask is left. A shorter answer than the
  hole is written as the answer followed by the *empty* token (the pad token, or EOS where the checkpoint has
  none), which the caller strips. With a `window`, a hole starts that many slots long (the suffix right after
  them) and, while the model fills every slot of it (no empty token: the answer may go on), doubles up to its
  budget and is filled again: a model trained with a few pads after a middle is never shown a run of far more
  (the bundled model fills 8-slot holes right 4 times in 5 and 32-slot ones 1 time in 4; docs/editing.md);
- revise (`rounds` > 1): one pass reads the block; every editable slot whose top prediction differs from its
  token with confidence >= `revise_threshold` is remasked, and the masks are filled as above. It stops when no
  slot changes or after `rounds` rounds.
Tokens of the block outside holes and editable slots never change. A hole slot may be restricted to some tokens
(`EditBlock.allowed`: token healing, where the text before a hole was cut after a space); its logits outside them
are -inf before each choice (the decision stage's allowed-tokens processor).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from trimode.decode.decide import Pick
from trimode.decode.sampling import SamplingParams
from trimode.decode.spec import ModeSpec, check_threshold
from trimode.decode.stats import DecodeStats
from trimode.decode.step import Committed, DecodeOutput, Forward, Machine, Provisional
from trimode.decode.transfer import commit_by_threshold, masked_confidence

EDIT_STEP_KEY = 1 << 20  # keeps edit sampling noise apart from the other modes' at the same position


@dataclass
class EditBlock:
    """The block an edit works on: its tokens (anything at holes), which slots are holes, which may be revised."""

    tokens: list[int]
    holes: list[bool]
    editable: list[bool]
    allowed: dict[int, list[int]] = field(default_factory=dict)  # hole slot -> the only tokens it may take
    empty: int | None = None  # the token a hole shorter than its budget ends with (needed for a hole window)

    def __post_init__(self) -> None:
        if not (len(self.tokens) == len(self.holes) == len(self.editable)) or not self.tokens:
            raise ValueError("an edit block needs tokens, holes and editable flags of one non-zero length")
        if any(not 0 <= i < len(self.tokens) or not self.holes[i] or not ids for i, ids in self.allowed.items()):
            raise ValueError("only hole slots can be restricted, each to at least one token")


def _hole_runs(holes: list[bool]) -> list[tuple[int, int]]:
    """(start, length) of each run of hole slots."""
    runs: list[tuple[int, int]] = []
    for i, h in enumerate(holes):
        if h and runs and runs[-1][0] + runs[-1][1] == i:
            runs[-1] = (runs[-1][0], runs[-1][1] + 1)
        elif h:
            runs.append((i, 1))
    return runs


def edit(prefix_ids: torch.Tensor, block: EditBlock, sampling: SamplingParams, mask_id: int,
         threshold: float = 0.9, rounds: int = 1, revise_threshold: float = 0.9,
         provisional: bool = False, window: int = 0) -> Machine:
    if prefix_ids.shape[0] != 1:
        raise ValueError("an edit works on one sequence at a time (batch size 1)")
    dev = prefix_ids.device
    prefix_len = prefix_ids.shape[1]
    n = len(block.tokens)
    stats = DecodeStats("edit", prompt_tokens=prefix_len, prefill_passes=1)
    full = torch.tensor(block.tokens, dtype=torch.long, device=dev)
    runs = _hole_runs(block.holes)
    grows = window > 0 and block.empty is not None
    active = {start: min(length, window) if grows else length for start, length in runs}

    yield Forward(prefix_ids, mask="causal", cache="append", logits="last")
    stats.forward_passes += 1

    step = 0
    while True:
        # The live block: every given slot, and the first `active` slots of each hole.
        live = torch.ones(n, dtype=torch.bool, device=dev)
        for start, length in runs:
            live[start + active[start] : start + length] = False
        index = live.nonzero().squeeze(1)
        ids = full[index][None].clone()
        masked = torch.tensor(block.holes, device=dev)[index][None]
        editable = torch.tensor(block.editable, device=dev)[index][None] & ~masked
        allowed = {int((index == slot).nonzero()): list(toks) for slot, toks in block.allowed.items() if live[slot]}
        positions = torch.arange(prefix_len, prefix_len + index.numel(), device=dev)
        ids[masked] = mask_id
        for r in range(rounds):
            if r > 0:  # revision: find the slots the model would write differently, and remask them
                pick = Pick(sampling, positions.tolist(), EDIT_STEP_KEY + step, confidence=True)
                decision = yield Forward(ids.clone(), mask="bidirectional", positions=positions, pick=pick)
                stats.forward_passes += 1
                proposal, conf = decision.tokens[None], decision.confidence[None]
                step += 1
                wrong = editable & (proposal != ids) & (conf >= revise_threshold)
                if not wrong.any():
                    break
                masked = wrong
                ids[masked] = mask_id
            while masked.any():
                pick = Pick(sampling, positions.tolist(), EDIT_STEP_KEY + step, confidence=True, allowed=allowed)
                decision = yield Forward(ids.clone(), mask="bidirectional", positions=positions, pick=pick)
                stats.forward_passes += 1
                proposal = decision.tokens[None]
                step += 1
                conf = masked_confidence(decision.confidence[None], masked)
                transfer = commit_by_threshold(conf, masked, threshold)
                ids[transfer] = proposal[transfer]
                masked &= ~transfer
                stats.step_commits.append(int(transfer.sum()))
                if provisional:
                    yield Provisional(ids.masked_fill(masked, mask_id).tolist(), stats)
        # A hole written to its last live slot may need more: double it (up to its budget) and fill again.
        filled = full.clone()
        filled[index] = ids[0]
        longer = [start for start, length in runs if active[start] < length
                  and block.empty not in filled[start : start + active[start]].tolist()]
        if not longer:
            break
        for start, length in runs:
            if start in longer:
                active[start] = min(2 * active[start], length)
    for start, length in runs:  # the slots of a hole past its window are the empty token
        filled[start + active[start] : start + length] = block.empty if block.empty is not None else mask_id
    out = filled.tolist()
    stats.generated_tokens = n
    yield Committed([out], stats)
    return DecodeOutput([out], stats)


@dataclass(frozen=True)
class EditKnobs:
    threshold: float = 0.9  # a pass commits the masked slots at least this confident (at least one)
    rounds: int = 1  # revision rounds after the holes are filled (1: fill only)
    revise_threshold: float = 0.9  # a revision remasks a slot whose other prediction is at least this confident
    hole_window: int = 6  # a hole starts this many slots long, doubling while filled to the end (0: all at once)

    def check(self, defaults) -> None:
        check_threshold(self.threshold)
        check_threshold(self.revise_threshold)
        if isinstance(self.rounds, bool) or not isinstance(self.rounds, int) or not 1 <= self.rounds <= 64:
            raise ValueError(f"rounds must be an integer in [1, 64], got {self.rounds!r}")
        if isinstance(self.hole_window, bool) or not isinstance(self.hole_window, int) or self.hole_window < 0:
            raise ValueError(f"hole_window must be an integer >= 0, got {self.hole_window!r}")


def _build(ids, stop, sampling, mask_id, k, thinking, provisional, steer, block):
    if block is None:
        raise ValueError("an edit needs its block (holes, or a draft to revise)")
    return edit(ids, block, sampling, mask_id, k.threshold, k.rounds, k.revise_threshold, provisional, k.hole_window)


SPEC = ModeSpec("edit", "fill holes and revise a draft in one bidirectional block (infill, revise, fill)", EditKnobs,
                _build, lossless=False, kv_scratch=lambda max_new, b: max_new,  # the block is its max_new_tokens
                pass_tokens=None, forwards_per_cycle=None, editing=True, constrained=False)
