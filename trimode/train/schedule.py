"""Warmup-stable-decay learning rate: linear warmup to `lr`, constant, then linear or cosine decay to `min_lr`."""

from __future__ import annotations

import math
from dataclasses import dataclass

DECAYS = ("linear", "cosine")


@dataclass(frozen=True)
class WSD:
    lr: float
    min_lr: float
    total_steps: int
    warmup_steps: int = 0
    decay_steps: int = 0
    decay: str = "linear"

    def __post_init__(self) -> None:
        if self.decay not in DECAYS:
            raise ValueError(f"decay must be one of {', '.join(DECAYS)}, got {self.decay!r}")
        if min(self.warmup_steps, self.decay_steps) < 0:
            raise ValueError("warmup_steps and decay_steps must be >= 0")
        if self.warmup_steps + self.decay_steps > self.total_steps:
            raise ValueError(
                f"warmup_steps ({self.warmup_steps}) + decay_steps ({self.decay_steps}) exceed the "
                f"{self.total_steps} training steps"
            )

    def __call__(self, step: int) -> float:
        """The learning rate of optimizer step `step` (0-based): the first warmup step is lr / warmup_steps,
        the last decay step (the last step of training) is min_lr."""
        if step < self.warmup_steps:
            return self.lr * (step + 1) / self.warmup_steps
        decay_start = self.total_steps - self.decay_steps
        if step < decay_start:
            return self.lr
        progress = min((step - decay_start + 1) / self.decay_steps, 1.0)
        if self.decay == "cosine":
            progress = 0.5 * (1 - math.cos(math.pi * progress))
        return self.lr + (self.min_lr - self.lr) * progress
