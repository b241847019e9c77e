"""Which masked positions a diffusion step commits (spec 2.2 step 4; also the drafting of linear spec).

All functions work on a block [B, L]: `conf` holds the confidence of the proposed token at masked positions
and -inf elsewhere.
"""

from __future__ import annotations

import torch


def masked_confidence(conf: torch.Tensor, masked: torch.Tensor) -> torch.Tensor:
    return torch.where(masked, conf, torch.full_like(conf, float("-inf")))


def commit_by_threshold(conf: torch.Tensor, masked: torch.Tensor, threshold: float) -> torch.Tensor:
    """The most confident masked position of each row, plus every masked position with conf >= threshold."""
    transfer = masked & (conf >= threshold)
    best = conf.argmax(-1)
    has_mask = masked.any(-1)
    transfer[has_mask, best[has_mask]] = True
    return transfer


def transfer_schedule(num_masked: torch.Tensor, steps: int) -> torch.Tensor:
    """[B, steps]: an even split of each row's masks over `steps`, remainder front-loaded (7 over 8 -> 1,..,1,0)."""
    base = num_masked[:, None] // steps
    rem = num_masked[:, None] % steps
    return base + (torch.arange(steps, device=num_masked.device)[None, :] < rem).long()


def commit_top_k(conf: torch.Tensor, masked: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """The `k[r]` most confident masked positions of each row r."""
    transfer = torch.zeros_like(masked)
    for r in range(conf.shape[0]):
        n = int(k[r])
        if n > 0:
            transfer[r, torch.topk(conf[r], n).indices] = True
    return transfer & masked
