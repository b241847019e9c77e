"""What a decode reports: statistics gathered where the work happens, and the streaming events.

The API, the server's metrics and the benchmarks all read these same numbers.
"""

from __future__ import annotations

from collections.abc import Generator
from dataclasses import dataclass, field


@dataclass
class DecodeStats:
    mode: str
    prompt_tokens: int = 0
    generated_tokens: int = 0
    forward_passes: int = 0  # every model forward, the prefill included
    prefill_passes: int = 0  # forwards that only encode the prompt and yield no token
    acceptance: list[int] = field(default_factory=list)  # tokens emitted per speculative cycle
    step_commits: list[int] = field(default_factory=list)  # tokens unmasked per diffusion step
    seconds: float = 0.0

    @property
    def tokens_per_forward(self) -> float:
        """Generated tokens / all forward passes (prefill counted)."""
        return self.generated_tokens / self.forward_passes if self.forward_passes else 0.0

    @property
    def tokens_per_decode_forward(self) -> float:
        """Generated tokens / forward passes, prompt-only prefill passes not counted."""
        n = self.forward_passes - self.prefill_passes
        return self.generated_tokens / n if n > 0 else 0.0

    @property
    def mean_acceptance(self) -> float:
        return sum(self.acceptance) / len(self.acceptance) if self.acceptance else 0.0

    @property
    def tokens_per_second(self) -> float:
        return self.generated_tokens / self.seconds if self.seconds > 0 else 0.0

    def as_dict(self) -> dict:
        return {
            "mode": self.mode,
            "prompt_tokens": self.prompt_tokens,
            "generated_tokens": self.generated_tokens,
            "forward_passes": self.forward_passes,
            "prefill_passes": self.prefill_passes,
            "tokens_per_forward": round(self.tokens_per_forward, 4),
            "tokens_per_decode_forward": round(self.tokens_per_decode_forward, 4),
            "mean_acceptance": round(self.mean_acceptance, 4),
            "seconds": round(self.seconds, 6),
            "tokens_per_second": round(self.tokens_per_second, 3),
        }


@dataclass
class Committed:
    """Tokens that became final, per batch row (empty lists for rows with nothing new), and the live stats."""

    tokens: list[list[int]]
    stats: DecodeStats


@dataclass
class Provisional:
    """The current state of the block being denoised, per row; undecided slots hold the mask id."""

    block: list[list[int]]


@dataclass
class DecodeOutput:
    tokens: list[list[int]]  # generated ids per row, prompt excluded
    stats: DecodeStats


DecodeStream = Generator["Committed | Provisional", None, DecodeOutput]


def drive(stream: DecodeStream) -> DecodeOutput:
    """Run a decode to the end, ignoring its events."""
    while True:
        try:
            next(stream)
        except StopIteration as stop:
            return stop.value
