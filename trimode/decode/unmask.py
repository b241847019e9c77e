"""Unmasking policies: which masked slots of a block one denoising (or drafting) pass commits.

The knob `unmask` of diffusion and of linear self-speculation's draft names the policy:
- "threshold" (default): the most confident masked slot plus every one with confidence >= `threshold`;
- "steps" (diffusion only): the fixed schedule, the block's masks split evenly over `steps` passes;
- "learned": the model's trained sampler (model/sampler.py, spec 2.5) scores each slot; commit every masked
  slot scoring >= `threshold` (then the sampler's probability threshold), at least the best-scoring one.

A rule is a callable `(conf, masked, logits, proposal) -> transfer` over a block [B, L] (`conf` is the
proposal's confidence at masked slots, -inf elsewhere); it must commit at least one masked slot per row that
has one. The threshold and steps policies keep their exact code path (`Schedule` in diffusion.py); a rule
object is used for the learned policy and for the oracles of the speed-of-light analysis (bench/sol.py).
"""

from __future__ import annotations

import torch

UNMASK_POLICIES = ("threshold", "steps", "learned")
LEARNED_THRESHOLD = 0.5  # the sampler probability threshold when unmask="learned" and no threshold is given


def check_unmask(value, allowed: tuple[str, ...], defaults) -> None:
    if value not in allowed:
        raise ValueError(f"unmask must be one of {', '.join(allowed)}, got {value!r}")
    if value == "learned" and getattr(defaults, "sampler", None) is None:
        raise ValueError("unmask='learned' needs a learned sampler next to the model (MODEL/sampler/, trained "
                         "with `trimode train-sampler`); this model has none")


class LearnedRule:
    """Commit the masked slots the sampler scores >= threshold; at least the best-scoring one per row."""

    def __init__(self, sampler, threshold: float) -> None:
        self.sampler, self.threshold = sampler, threshold

    def __call__(self, conf: torch.Tensor, masked: torch.Tensor, logits: torch.Tensor,
                 proposal: torch.Tensor) -> torch.Tensor:
        score = self.sampler.score(logits, masked)
        score = torch.where(masked, score, torch.full_like(score, -1.0))
        transfer = masked & (score >= self.threshold)
        best = score.argmax(-1)
        has_mask = masked.any(-1)
        transfer[has_mask, best[has_mask]] = True
        return transfer


def rule_for(unmask: str, threshold: float | None, sampler):
    """The rule object of a policy (None for the rules `Schedule` applies itself: threshold and steps)."""
    return LearnedRule(sampler, threshold) if unmask == "learned" else None
