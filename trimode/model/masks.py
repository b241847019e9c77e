"""Attention masks, each built once from its definition. `True` = may attend.

Every forward pass names its mask explicitly (no flag flipped on the layers):
- `"causal"`: token i of the pass sees the cached prefix and tokens 0..i of the pass;
- `"bidirectional"`: every token of the pass sees the cached prefix and the whole pass;
- a boolean tensor `[T, past + T]` (or `[B, 1, T, past + T]`) for the quadratic draft layout and training.
"""

from __future__ import annotations

from typing import Literal

import torch

MaskSpec = Literal["causal", "bidirectional"] | torch.Tensor


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
    raise ValueError(f"unknown mask kind {mask!r}")


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
