"""Prompt logprobs: what the model gives each prompt token as a continuation of the tokens before it.

A request with `prompt_logprobs` set reads the logits of every prompt position from its first pass (the causal
prefill, or a quadratic init pass whose prompt part is causal), chunk by chunk when the prefill is chunked; the
logits are reduced here as they come (log-softmax, the prompt token's logprob and rank, the top alternatives)
so only a few numbers per position are kept. The values are the AR distribution, whatever mode then decodes:
the prompt part of the first pass is causal in every mode that may score.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from trimode.decode.step import Forward
from trimode.model.masks import QuadraticInit


@dataclass
class PromptLogprob:
    """One prompt position (from the second on): its token's logprob and rank (1: the most likely), and the
    `top` most likely tokens as (id, logprob), most likely first."""

    token_id: int
    logprob: float
    rank: int
    top: list[tuple[int, float]]


def scores_prompt(forward: Forward, prompt: list[int]) -> bool:
    """Whether `forward` runs the prompt causally from position 0, so its logits there are the AR ones."""
    n = len(prompt)
    causal = forward.mask == "causal" if isinstance(forward.mask, str) else (
        isinstance(forward.mask, QuadraticInit) and forward.mask.prompt_len == n)
    return (causal and forward.positions is None and not forward.lora and forward.rows == 1
            and forward.tokens >= n and forward.id_tensor()[0, :n].tolist() == prompt)


class PromptScorer:
    """Collects the prompt logprobs of one request from the logits of its first pass, in any number of chunks."""

    def __init__(self, prompt: list[int], top: int) -> None:
        self.prompt, self.top = prompt, top
        self.entries: list[PromptLogprob | None] = [None] * len(prompt)  # the first token has no context
        self.done = False

    @property
    def positions(self) -> list[int]:
        """The positions whose logits are needed: each predicts the next prompt token."""
        return list(range(len(self.prompt) - 1))

    @torch.no_grad()
    def add(self, positions: list[int], logits: torch.Tensor) -> None:
        """`logits[i]` is the output at prompt position `positions[i]`."""
        if not positions:
            return
        logp = torch.log_softmax(logits.float(), dim=-1)
        target = torch.tensor([self.prompt[p + 1] for p in positions], device=logp.device)
        chosen = logp.gather(-1, target[:, None])
        ranks = (logp > chosen).sum(-1) + 1
        tops = torch.topk(logp, self.top, dim=-1) if self.top > 0 else None
        for i, (p, lp, rank) in enumerate(zip(positions, chosen[:, 0].tolist(), ranks.tolist(), strict=True)):
            top = [] if tops is None else list(zip(tops.indices[i].tolist(), tops.values[i].tolist(), strict=True))
            self.entries[p + 1] = PromptLogprob(self.prompt[p + 1], lp, rank, top)
