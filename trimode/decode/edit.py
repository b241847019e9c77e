"""Editing as a step machine: fill holes in a block (infill, templates) and revise a draft (spec: NLD revises and
fills in the middle natively; these machines use only the block-diffusion pass every NLD model is trained on).

The KV cache holds the causal prefix (the prompt, and the text before the first hole). One block follows it:
given tokens and holes (`EditBlock`), attending bidirectionally to itself and to the cache, so a hole sees the
text after it (the whole suffix, however many training blocks it spans: the block is as long as holes plus
suffix). Then, in rounds:
- fill: every hole slot starts as the mask id; each pass commits the masked slots whose confidence passes
  `threshold` (at least the best one), as block diffusion does, until no mask is left. A hole is as long as its
  budget; a shorter answer is written as the answer followed by the *empty* token (the pad token, or EOS where
  the checkpoint has none), which the caller strips;
- revise (`rounds` > 1): one pass reads the block; every editable slot whose top prediction differs from its
  token with confidence >= `revise_threshold` is remasked, and the masks are filled as above. It stops when no
  slot changes or after `rounds` rounds.
Tokens of the block outside holes and editable slots never change.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from trimode.decode.sampling import SamplingParams, choose, confidence
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

    def __post_init__(self) -> None:
        if not (len(self.tokens) == len(self.holes) == len(self.editable)) or not self.tokens:
            raise ValueError("an edit block needs tokens, holes and editable flags of one non-zero length")


def edit(prefix_ids: torch.Tensor, block: EditBlock, sampling: SamplingParams, mask_id: int,
         threshold: float = 0.9, rounds: int = 1, revise_threshold: float = 0.9,
         provisional: bool = False) -> Machine:
    if prefix_ids.shape[0] != 1:
        raise ValueError("an edit works on one sequence at a time (batch size 1)")
    dev = prefix_ids.device
    prefix_len = prefix_ids.shape[1]
    n = len(block.tokens)
    stats = DecodeStats("edit", prompt_tokens=prefix_len, prefill_passes=1)
    positions = torch.arange(prefix_len, prefix_len + n, device=dev)
    ids = torch.tensor([block.tokens], dtype=torch.long, device=dev)
    masked = torch.tensor([block.holes], device=dev)
    editable = torch.tensor([block.editable], device=dev) & ~masked
    ids[masked] = mask_id

    yield Forward(prefix_ids, mask="causal", cache="append", logits="last")
    stats.forward_passes += 1

    step = 0
    for r in range(rounds):
        if r > 0:  # revision: find the slots the model would write differently, and remask them
            logits = yield Forward(ids.clone(), mask="bidirectional", positions=positions)
            stats.forward_passes += 1
            proposal = choose(logits[0], positions, sampling, step=EDIT_STEP_KEY + step)[None]
            step += 1
            conf = confidence(logits, proposal)
            wrong = editable & (proposal != ids) & (conf >= revise_threshold)
            if not wrong.any():
                break
            masked = wrong
            ids[masked] = mask_id
        while masked.any():
            logits = yield Forward(ids.clone(), mask="bidirectional", positions=positions)
            stats.forward_passes += 1
            proposal = choose(logits[0], positions, sampling, step=EDIT_STEP_KEY + step)[None]
            step += 1
            conf = masked_confidence(confidence(logits, proposal), masked)
            transfer = commit_by_threshold(conf, masked, threshold)
            ids[transfer] = proposal[transfer]
            masked &= ~transfer
            stats.step_commits.append(int(transfer.sum()))
            if provisional:
                yield Provisional(ids.masked_fill(masked, mask_id).tolist(), stats)
    out = ids[0].tolist()
    stats.generated_tokens = n
    yield Committed([out], stats)
    return DecodeOutput([out], stats)
