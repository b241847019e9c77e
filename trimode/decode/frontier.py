"""Block diffusion under a grammar: left-frontier commits (used by decode/diffusion.py).

A grammar reads text left to right, so a slot of the block may only become final once every slot left of it has,
and only with a token the grammar allows there. Per row, the *frontier* is the first slot the grammar has not
read. Each denoising pass
- first writes the tokens the grammar forces at the frontier (`{"name": "` after `{` under a schema) as given
  tokens, which costs no forward pass (a block they fill needs no pass at all);
- masks the frontier slot's logits with the grammar's mask (the decision stage applies it), so its proposal
  is always allowed, and commits it;
- then commits the slots after it, left to right, while the schedule would have committed them anyway (the
  threshold, the step plan or the learned rule says so) and the grammar allows their proposals.
Other slots stay masked and keep denoising: the next pass proposes them again with more of the block known.
Every pass commits at least the frontier slot, so a block needs at most block_length passes.
"""

from __future__ import annotations

import torch

from trimode.decode.grammar import GrammarMatcher


class Frontier:
    """The grammars of a block's rows (one per row) and how far each has read the block."""

    def __init__(self, grammars: list[GrammarMatcher], block_length: int) -> None:
        self.grammars = grammars
        self.block_length = block_length
        self.read = [0] * len(grammars)  # slots of the current block each row's grammar has read
        self.forced = [[False] * block_length for _ in grammars]  # per row and slot: written by `force`

    def new_block(self) -> None:
        self.read = [0] * len(self.grammars)
        self.forced = [[False] * self.block_length for _ in self.grammars]

    def catch_up(self, block: torch.Tensor, masked: torch.Tensor) -> None:
        """Read the slots at each frontier that are already committed (the seed, a forced end-think token). One
        the grammar does not allow there is masked again, to be denoised."""
        for r, g in enumerate(self.grammars):
            c = self.read[r]
            while c < self.block_length and not masked[r, c]:
                token = int(block[r, c])
                if not g.accepts(token):
                    masked[r, c] = True
                    break
                g.advance(token)
                c += 1
            self.read[r] = c

    def force(self, block: torch.Tensor, masked: torch.Tensor) -> int:
        """Write the tokens each grammar forces at its frontier into the block (given, not denoised; `forced`
        marks their slots); returns how many were written."""
        self.catch_up(block, masked)
        written = 0
        for r, g in enumerate(self.grammars):
            c = self.read[r]
            for token in g.forced_tokens():
                if c >= self.block_length or not masked[r, c]:
                    break
                block[r, c] = token
                masked[r, c] = False
                self.forced[r][c] = True
                g.advance(token)
                c += 1
                written += 1
            self.read[r] = c
        return written

    def slot_masks(self) -> tuple[list[int], torch.Tensor]:
        """(the block's frontier slots, row-major indices into [B * L]; what each row's grammar allows there [M, V])
        for the decision stage to apply as a logit processor (`Pick.masks`, `Pick.masked_at`)."""
        at, masks = [], []
        for r, g in enumerate(self.grammars):
            c = self.read[r]
            if c < self.block_length:
                at.append(r * self.block_length + c)
                masks.append(g.allowed())
        return at, torch.stack(masks) if masks else torch.ones((0, self.grammars[0].vocab_size), dtype=torch.bool)

    def commit(self, proposal: torch.Tensor, wanted: torch.Tensor, masked: torch.Tensor) -> torch.Tensor:
        """Which slots this pass commits [B, L]: per row the frontier slot, then the run after it that the
        schedule `wanted` and the grammar allows; the grammars read them."""
        transfer = torch.zeros_like(masked)
        for r, g in enumerate(self.grammars):
            c = self.read[r]
            first = True
            while c < self.block_length and masked[r, c] and (first or bool(wanted[r, c])):
                token = int(proposal[r, c])
                if not first and not g.accepts(token):
                    break
                g.advance(token)
                transfer[r, c] = True
                c += 1
                first = False
            self.read[r] = c
        return transfer
