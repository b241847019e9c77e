"""Stopping rules shared by every mode: EOS, the token budget, the thinking budget."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class StopRule:
    max_new_tokens: int
    eos_token_ids: frozenset[int] = frozenset()

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")

    def first_eos(self, tokens: list[int]) -> int | None:
        """Index of the first EOS in `tokens`, or None."""
        for i, t in enumerate(tokens):
            if t in self.eos_token_ids:
                return i
        return None

    def extend(self, out: list[int], new: list[int]) -> tuple[list[int], bool]:
        """`finish(out + new)` for an `out` that holds no EOS yet, checking only the new tokens."""
        kept, over = self.take(len(out), new)
        return out + kept, over

    def take(self, done: int, new: list[int]) -> tuple[list[int], bool]:
        """The part of `new` that `extend` keeps after `done` tokens without EOS, and whether generation is over
        (without copying the tokens so far: a stream appends it to its own list)."""
        room = self.max_new_tokens - done
        for i, t in enumerate(new[:room]):
            if t in self.eos_token_ids:
                return new[: i + 1], True
        kept = new[:room]
        return kept, done + len(kept) >= self.max_new_tokens

    def finish(self, tokens: list[int]) -> tuple[list[int], bool]:
        """`tokens` cut after the first EOS and to the budget; and whether generation is over."""
        eos = self.first_eos(tokens)
        if eos is not None:
            return tokens[: min(eos + 1, self.max_new_tokens)], True
        if len(tokens) >= self.max_new_tokens:
            return tokens[: self.max_new_tokens], True
        return tokens, False


@dataclass(frozen=True)
class ThinkingBudget:
    """Force `end_think_token_id` once `max_thinking_tokens` tokens were generated without it."""

    max_thinking_tokens: int
    end_think_token_id: int
