"""Choosing tokens from logits: greedy, or sampling keyed by (seed, absolute position, step).

Sampling uses the Gumbel-max trick with noise that depends only on the request's seed, the absolute position
of the token and a step key, never on how many tokens were drawn before. Consequences the modes rely on:
- AR sampling and the verify pass of self-speculation draw the token at position p with the *same* noise, so
  speculative decoding at temperature > 0 emits exactly the tokens AR sampling emits with that seed
  (lossless by construction, not just in distribution);
- a request's output does not depend on which other requests share its batch.

The noise is a counter-based hash (murmur3's 32-bit finaliser over int64 tensors) of (seed, row, position, step,
vocabulary index): one batched tensor computation for all tokens, the same bits on CPU and CUDA, no generator
object and no Python loop per token. (Until version 0.1 the noise came from one `torch.Generator` per token; the
same seed therefore samples different tokens than it did then.)
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch

_M32 = 0xFFFFFFFF
_GOLDEN = 0x9E3779B9  # odd 32-bit constant: neighbouring counters land far apart before mixing


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    # Logit processors (`trimode.decode.decide`), applied before temperature / top-k / top-p. The penalties
    # follow OpenAI (frequency, presence: over the output tokens) and vLLM / HF (repetition: over prompt and
    # output, positive logits divided, negative multiplied); logit_bias adds to single tokens' logits; below
    # `min_tokens` output tokens the EOS ids cannot be chosen.
    repetition_penalty: float = 1.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    logit_bias: tuple[tuple[int, float], ...] = ()
    min_tokens: int = 0
    logprobs: int | None = None  # report each chosen token's log-probability, and this many alternatives

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        check_processors(self)

    @property
    def penalized(self) -> bool:
        """Some processor reads the history of a position (penalties, min_tokens)."""
        return (self.repetition_penalty != 1.0 or self.frequency_penalty != 0.0 or self.presence_penalty != 0.0
                or self.min_tokens > 0)

    @property
    def processed(self) -> bool:
        """Some logit processor is on."""
        return self.penalized or bool(self.logit_bias)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def with_seed(self) -> SamplingParams:
        """A copy with a concrete seed (a fresh random one when none was given)."""
        if self.seed is not None or self.greedy:
            return self
        seed = int(torch.randint(0, 2**62, (1,)).item())
        return replace(self, seed=seed)


def _number(value, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    return float(value)


def check_processors(p: SamplingParams) -> None:
    """ValueError naming the field for a processor setting out of its range (OpenAI's, vLLM's)."""
    if _number(p.repetition_penalty, "repetition_penalty") <= 0:
        raise ValueError(f"repetition_penalty must be > 0, got {p.repetition_penalty!r}")
    for name in ("frequency_penalty", "presence_penalty"):
        if not -2 <= _number(getattr(p, name), name) <= 2:
            raise ValueError(f"{name} must be in [-2, 2], got {getattr(p, name)!r}")
    for token, bias in p.logit_bias:
        if isinstance(token, bool) or not isinstance(token, int) or token < 0:
            raise ValueError(f"logit_bias keys must be token ids >= 0, got {token!r}")
        if not -100 <= _number(bias, "logit_bias") <= 100:
            raise ValueError(f"logit_bias values must be in [-100, 100], got {bias!r} for token {token}")
    if isinstance(p.min_tokens, bool) or not isinstance(p.min_tokens, int) or p.min_tokens < 0:
        raise ValueError(f"min_tokens must be an integer >= 0, got {p.min_tokens!r}")
    lp = p.logprobs
    if lp is not None and (isinstance(lp, bool) or not isinstance(lp, int) or not 0 <= lp <= 20):
        raise ValueError(f"logprobs must be an integer in [0, 20], got {lp!r}")


def filter_logits(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Temperature, top-k and top-p applied to float32 logits [N, V]; removed entries become -inf.

    A temperature so small that a row's top logit / temperature overflows float32 leaves that row's top entry
    infinite (`choose` then takes the argmax: the limit of sampling as the temperature goes to 0)."""
    logits = logits.float() / params.temperature
    if params.top_k and params.top_k < logits.shape[-1]:
        kth = torch.topk(logits, params.top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        # Drop a token when the mass strictly before it already reaches top_p. The top-1 always stays: a top_p
        # below float32's smallest value would round to 0 and drop it too.
        drop_sorted = probs.cumsum(-1) - probs >= params.top_p
        drop_sorted[..., 0] = False
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """murmur3 fmix32 on int64 tensors holding 32-bit values (a product may wrap; its low 32 bits are exact)."""
    x = x ^ (x >> 16)
    x = (x * 0x85EBCA6B) & _M32
    x = x ^ (x >> 13)
    x = (x * 0xC2B2AE35) & _M32
    return x ^ (x >> 16)


def _per_token(value, like: torch.Tensor) -> torch.Tensor:
    """An int or one int per token, as an int64 tensor like `like`."""
    if isinstance(value, int):
        return torch.full_like(like, value)
    return torch.as_tensor(value, dtype=torch.long, device=like.device).reshape(-1)


def uniform_noise(seed, positions: torch.Tensor, step, vocab: int, rows=None) -> torch.Tensor:
    """Uniform (0, 1) float64 noise [N, V], a pure function of (seed, row, position, step, vocabulary index).
    `seed` and `step` are ints or one per token (the decision stage samples many requests at once)."""
    dev = positions.device
    pos = positions.reshape(-1).long()
    row = torch.zeros_like(pos) if rows is None else torch.as_tensor(rows, dtype=torch.long, device=dev).reshape(-1)
    seeds = [seed] if isinstance(seed, int) else list(seed)  # Python ints: any size, the low 64 bits count
    hi = _per_token([(s >> 32) & _M32 for s in seeds] if len(seeds) > 1 else (seeds[0] >> 32) & _M32, pos)
    lo = _per_token([s & _M32 for s in seeds] if len(seeds) > 1 else seeds[0] & _M32, pos)
    key = _mix32(hi ^ _mix32(lo))
    for counter in (row, pos & _M32, pos >> 32, _per_token(step, pos) & _M32):
        key = _mix32((key + _GOLDEN * (counter & _M32)) & _M32)
    v = torch.arange(vocab, device=dev, dtype=torch.long)[None, :]
    hi = _mix32((key[:, None] ^ _mix32(2 * v)) & _M32)
    lo = _mix32((key[:, None] ^ _mix32(2 * v + 1)) & _M32)
    bits = (hi << 21) | (lo >> 11)  # 53 random bits
    return (bits.double() + 0.5) / float(1 << 53)


def gumbel_noise(seed, positions: torch.Tensor, step: int, vocab: int, device, rows=None) -> torch.Tensor:
    """Standard Gumbel noise [N, V], a pure function of (seed, batch row, position, step)."""
    u = uniform_noise(seed, positions.to(device), step, vocab, rows)
    return -torch.log(-torch.log(u))


ARGMAX_BLOCK = 64


def argmax_last(x: torch.Tensor) -> torch.Tensor:
    """`x.argmax(-1)` of [N, V]: the same indices (each row's first maximum; a NaN counts as the maximum).

    On a CPU torch's index-returning reductions go element by element while `amax` is vectorized. A large [N, V]
    is therefore reduced by blocks of `ARGMAX_BLOCK`: the maximum of each block, the first block holding the row's
    maximum, then the first maximum inside it, which is the row's first maximum."""
    if x.dim() != 2 or x.device.type != "cpu" or x.shape[1] % ARGMAX_BLOCK or x.numel() < 1 << 15:
        return x.argmax(-1)
    n, v = x.shape
    blocks = x.view(n, v // ARGMAX_BLOCK, ARGMAX_BLOCK)
    best = blocks.amax(-1).argmax(-1)
    return best * ARGMAX_BLOCK + blocks[torch.arange(n, device=x.device), best].argmax(-1)


def choose(
    logits: torch.Tensor, positions: torch.Tensor | int, params: SamplingParams, step: int = 0, rows=None
) -> torch.Tensor:
    """Tokens [N] for logits [N, V]: argmax when greedy, else a keyed sample of the filtered distribution (argmax
    too in a row where logits / temperature overflows float32: see `filter_logits`).

    `positions` [N] are the absolute positions of the tokens being chosen (an int: all at that position), `rows`
    [N] their batch rows.
    """
    if params.greedy:
        return argmax_last(logits)
    if isinstance(positions, int):
        positions = torch.full((logits.shape[0],), positions, device=logits.device)
    filtered = filter_logits(logits, params).double()
    noise = gumbel_noise(params.seed, positions, step, logits.shape[-1], logits.device, rows)
    sampled = argmax_last(filtered + noise)
    # A row whose top logit / temperature overflowed (a temperature near 0) is greedy, the limit it tends to.
    overflowed = ~torch.isfinite(filtered.amax(-1))
    return torch.where(overflowed, argmax_last(logits), sampled)


def confidence(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Probability of `tokens` under softmax(logits) (raw logits, no temperature), float32."""
    return logits.float().softmax(-1).gather(-1, tokens[..., None]).squeeze(-1)
