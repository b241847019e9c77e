"""Attention masks, each built once from its definition. `True` = may attend.

Every forward pass names its mask explicitly (no flag flipped on the layers). In decoding, every token of a
pass sees the whole cached prefix; the kinds differ only in how the pass's own T tokens see each other (their
[T, T] `pass_pattern`):
- `"causal"`: token i sees tokens 0..i of the pass;
- `"bidirectional"`: every token sees the whole pass;
- `QuadraticInit(prompt_len)`: the first quadratic self-speculation pass, `[prompt, MASK x B]`;
- `QuadraticStep(block)`: a quadratic self-speculation pass of B groups `[d_j, MASK x B]`;
- a boolean tensor `[T, past + T]` (or `[B, 1, T, past + T]`) for anything else (training, the engine's rows).
Named kinds keep masks small: the engine and the attention kernels expand the [T, T] part next to the prefix
instead of materialising [T, past + T] per row.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Literal

import torch


@dataclass(frozen=True)
class QuadraticInit:
    prompt_len: int


@dataclass(frozen=True)
class QuadraticStep:
    block: int


MaskSpec = Literal["causal", "bidirectional"] | QuadraticInit | QuadraticStep | torch.Tensor


@lru_cache(maxsize=256)
def _pattern(kind, t: int, device: str) -> torch.Tensor:
    if kind == "causal":
        return causal_mask(t, 0, device)
    if kind == "bidirectional":
        return torch.ones(t, t, dtype=torch.bool, device=device)
    if isinstance(kind, QuadraticStep):
        if t != kind.block * (kind.block + 1):
            raise ValueError(f"a quadratic pass of block {kind.block} has {kind.block * (kind.block + 1)} tokens, "
                             f"got {t}")
        return quadratic_step_mask(kind.block, 0, device)
    if isinstance(kind, QuadraticInit):
        return quadratic_init_mask(kind.prompt_len, t - kind.prompt_len, device)
    raise ValueError(f"unknown mask kind {kind!r}")


def pass_pattern(mask: MaskSpec, t: int, device) -> torch.Tensor:
    """[T, T]: which tokens of a pass each token of it sees (the cached prefix is always fully visible)."""
    return _pattern(mask, t, str(device))


def causal_mask(q_len: int, past_len: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """[q_len, past_len + q_len]: query i sees keys 0 .. past_len + i."""
    q = torch.arange(q_len, device=device)[:, None]
    k = torch.arange(past_len + q_len, device=device)[None, :]
    return k <= q + past_len


def resolve(mask: MaskSpec, q_len: int, past_len: int, device) -> tuple[torch.Tensor | None, bool]:
    """Turn a mask spec into SDPA arguments `(attn_mask, is_causal)`."""
    if isinstance(mask, torch.Tensor):
        return mask.to(device), False
    if mask == "bidirectional":
        return None, False
    if mask == "causal":
        if past_len == 0:
            return None, True
        return causal_mask(q_len, past_len, device), False
    pattern = pass_pattern(mask, q_len, device)
    if past_len == 0:
        return pattern, False
    return torch.cat([torch.ones(q_len, past_len, dtype=torch.bool, device=device), pattern], 1), False


def quadratic_step_mask(block: int, past_len: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Mask of one quadratic self-speculation pass over B groups `[d_j, MASK x B]` (B(B+1) tokens).

    Leader d_j sees the cache and the leaders d_0..d_j (a causal chain, so its K/V are the causal K/V of
    the committed token); the masks of group j see the cache, d_0..d_j and every token of group j.
    """
    g = block + 1
    n = block * g
    idx = torch.arange(n, device=device)
    group, slot = idx // g, idx % g
    is_leader = slot == 0
    q_group, k_group = group[:, None], group[None, :]
    sees_leader = is_leader[None, :] & (k_group <= q_group)
    same_group = (k_group == q_group) & (~is_leader[:, None])
    current = sees_leader | same_group
    prefix = torch.ones(n, past_len, dtype=torch.bool, device=device)
    return torch.cat([prefix, current], dim=1)


def quadratic_init_mask(prompt_len: int, block: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Mask of the first quadratic pass over `[prompt, MASK x B]`: prompt causal, masks see everything."""
    n = prompt_len + block
    mask = causal_mask(n, 0, device)
    mask[prompt_len:] = True
    return mask


def dual_stream_mask(seq_len: int, block_size: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """The 2L x 2L training mask over `[noisy | clean]` (spec section 3.2).

    noisy->noisy: same block; noisy->clean: strictly earlier blocks; clean->clean: causal; clean->noisy: never.
    """
    n = seq_len
    idx = torch.arange(2 * n, device=device)
    noisy = idx < n
    pos = idx % n
    blk = pos // block_size
    qn, kn = noisy[:, None], noisy[None, :]
    qb, kb = blk[:, None], blk[None, :]
    qp, kp = pos[:, None], pos[None, :]
    nn_ = qn & kn & (qb == kb)
    nc = qn & ~kn & (qb > kb)
    cc = ~qn & ~kn & (qp >= kp)
    return nn_ | nc | cc
