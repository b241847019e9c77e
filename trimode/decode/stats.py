"""What a decode reports: statistics gathered where the work happens.

The API, the server's metrics and the benchmarks all read these same numbers. They count only what is emitted:
a speculative cycle's acceptance is the tokens it output (none past EOS, a stop string or `max_new_tokens`), and
no forward runs after the last emitted token.
"""

from __future__ import annotations

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
    cached_tokens: int = 0  # prompt tokens whose KV the engine's prefix cache held (not computed)

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

    def drop_tail(self, n: int) -> None:
        """`n` tokens of the last cycle or step were cut after the fact (a stop string inside them)."""
        for counts in (self.acceptance, self.step_commits):
            if counts:
                counts[-1] = max(0, counts[-1] - n)

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
