"""Choosing tokens from logits: greedy, or sampling keyed by (seed, absolute position, step).

Sampling uses the Gumbel-max trick with noise that depends only on the request's seed, the absolute position
of the token and a step key, never on how many tokens were drawn before. Consequences the modes rely on:
- AR sampling and the verify pass of self-speculation draw the token at position p with the *same* noise, so
  speculative decoding at temperature > 0 emits exactly the tokens AR sampling emits with that seed
  (lossless by construction, not just in distribution);
- a request's output does not depend on which other requests share its batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

_MIX = 0x9E3779B97F4A7C15  # odd 64-bit constant: spreads (seed, position, step) over generator seeds


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def with_seed(self) -> SamplingParams:
        """A copy with a concrete seed (a fresh random one when none was given)."""
        if self.seed is not None or self.greedy:
            return self
        seed = int(torch.randint(0, 2**62, (1,)).item())
        return SamplingParams(self.temperature, self.top_p, self.top_k, seed)


def filter_logits(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Temperature, top-k and top-p applied to float32 logits [N, V]; removed entries become -inf."""
    logits = logits.float() / params.temperature
    if params.top_k and params.top_k < logits.shape[-1]:
        kth = torch.topk(logits, params.top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        # Drop a token when the mass strictly before it already reaches top_p (the top-1 always stays).
        drop_sorted = probs.cumsum(-1) - probs >= params.top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def gumbel_noise(seed: int, positions: torch.Tensor, step: int, vocab: int, device, rows=None) -> torch.Tensor:
    """Standard Gumbel noise [N, V], a pure function of (seed, batch row, position, step)."""
    rows = [0] * len(positions) if rows is None else list(rows)
    noise = []
    for r, p in zip(rows, positions.tolist()):
        key = (seed * _MIX + (int(r) << 48) + (int(p) << 16) + step) % (2**63)
        noise.append(torch.rand(vocab, generator=torch.Generator().manual_seed(key), dtype=torch.float64))
    u = torch.stack(noise).clamp_(1e-20, 1.0)
    return (-torch.log(-torch.log(u))).to(device)


def choose(
    logits: torch.Tensor, positions: torch.Tensor, params: SamplingParams, step: int = 0, rows=None
) -> torch.Tensor:
    """Tokens [N] for logits [N, V]: argmax when greedy, else a keyed sample of the filtered distribution.

    `positions` [N] are the absolute positions of the tokens being chosen, `rows` [N] their batch rows.
    """
    if params.greedy:
        return logits.argmax(-1)
    filtered = filter_logits(logits, params).double()
    noise = gumbel_noise(params.seed, positions, step, logits.shape[-1], logits.device, rows)
    return (filtered + noise).argmax(-1)


def confidence(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Probability of `tokens` under softmax(logits) (raw logits, no temperature), float32."""
    return logits.float().softmax(-1).gather(-1, tokens[..., None]).squeeze(-1)
