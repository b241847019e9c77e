"""The joint training objective: AR loss + alpha * block-diffusion loss on one network (spec section 3.1).

One forward pass over `[noisy | clean]` (2L tokens, positions `arange(L)` for both halves) with the dual-stream
mask (`trimode.model.masks.dual_stream_mask`):
- the noisy half is a copy of the row with loss tokens masked i.i.d. with probability p = (1 - eps) t + eps,
  t ~ U(0, 1) per row; its logit at position i predicts the clean token i (diffusion, no shift);
- the clean half is the row itself under a causal mask; its logit at position i predicts token i + 1 (AR).

The objective returns *sums and counts*, never per-batch means, so the trainer can divide by counts summed over
the whole global batch (gradient-accumulation micro-batches and data-parallel ranks): "global loss averaging",
    loss = alpha * sum_masked(CE / p) / N_masked_global + sum_supervised(CE_AR) / N_supervised_global.

Noise is drawn per row from a generator keyed by an integer (`noise_key(seed, step, row)`), so a row gets the
same noise whichever rank or micro-batch it lands in, and a resumed run draws exactly what it would have drawn.
"""

from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn

from trimode.model.masks import dual_stream_mask
from trimode.model.transformer import NLDTransformer

EPS = 1e-3


def noise_key(*parts: int) -> int:
    """A 63-bit generator seed from integers (e.g. seed, step, row index in the global batch)."""
    digest = hashlib.blake2b(repr(tuple(int(p) for p in parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


@dataclass
class Noise:
    """The corrupted copy of a batch: `noisy` [B, L] ids, `masked` [B, L] bool, `p` [B] mask probability."""

    noisy: torch.Tensor
    masked: torch.Tensor
    p: torch.Tensor


def corrupt(input_ids: torch.Tensor, loss_mask: torch.Tensor, mask_token_id: int, keys: list[int],
            eps: float = EPS) -> Noise:
    """Mask each loss token (loss_mask = 1) of row b with probability p_b = (1 - eps) t_b + eps, t_b ~ U(0, 1).

    Row b draws t_b and its L uniforms from a CPU generator seeded with `keys[b]`. Tokens outside the loss mask
    (SFT prompts, padding) are never masked.
    """
    b, length = input_ids.shape
    if len(keys) != b:
        raise ValueError(f"need one noise key per row: {len(keys)} keys for {b} rows")
    t = torch.empty(b, dtype=torch.float64)
    u = torch.empty(b, length, dtype=torch.float64)
    for row, key in enumerate(keys):
        g = torch.Generator().manual_seed(key)
        t[row] = torch.rand((), generator=g, dtype=torch.float64)
        u[row] = torch.rand(length, generator=g, dtype=torch.float64)
    p = (1 - eps) * t + eps
    masked = (u < p[:, None]).to(input_ids.device) & loss_mask.bool()
    noisy = torch.where(masked, torch.full_like(input_ids, mask_token_id), input_ids)
    return Noise(noisy, masked, p.to(input_ids.device))


def dual_stream_inputs(noisy: torch.Tensor, clean: torch.Tensor, block_size: int
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`(input_ids [B, 2L], positions [2L], mask [2L, 2L])` of the dual-stream pass."""
    length = clean.shape[1]
    ids = torch.cat([noisy, clean], dim=1)
    positions = torch.arange(length, device=clean.device).repeat(2)
    return ids, positions, _dual_stream_mask(length, block_size, clean.device)


@functools.lru_cache(maxsize=4)
def _dual_stream_mask(length: int, block_size: int, device: torch.device) -> torch.Tensor:
    """Built once per shape: at L = 4096 the mask has 67M entries and every micro-batch needs it."""
    return dual_stream_mask(length, block_size, device)


def dual_stream_logits(net: NLDTransformer, noisy: torch.Tensor, clean: torch.Tensor, block_size: int
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """`(diffusion logits [B, L, V], causal logits [B, L, V])` of one dual-stream pass (used by tests and
    diagnostics; training uses `JointObjective`, which applies the head only where there is a loss)."""
    ids, positions, mask = dual_stream_inputs(noisy, clean, block_size)
    logits = net(ids, mask=mask, positions=positions)
    length = clean.shape[1]
    return logits[:, :length], logits[:, length:]


@dataclass
class LossSums:
    """Loss sums and counts of one micro-batch (or of many, added together).

    ar_sum: sum of next-token CE over supervised targets; ar_count: their number (loss_mask[:, 1:]);
    diff_sum: sum of CE / p over masked positions; diff_count: their number;
    diff_ce_sum: sum of plain CE over masked positions (reported, not optimised).
    """

    ar_sum: torch.Tensor
    ar_count: torch.Tensor
    diff_sum: torch.Tensor
    diff_count: torch.Tensor
    diff_ce_sum: torch.Tensor

    def detach(self) -> LossSums:
        return LossSums(*(getattr(self, f.name).detach() for f in fields(self)))

    def __add__(self, other: LossSums) -> LossSums:
        return LossSums(*(getattr(self, f.name) + getattr(other, f.name) for f in fields(self)))

    def as_tensor(self) -> torch.Tensor:
        """[5] float64, in field order (for one all-reduce)."""
        return torch.stack([getattr(self, f.name).double() for f in fields(self)])

    @classmethod
    def from_tensor(cls, t: torch.Tensor) -> LossSums:
        return cls(*t.unbind())


def global_loss(sums: LossSums, alpha: float, ar_count: float, diff_count: float) -> torch.Tensor:
    """alpha * diff_sum / N_masked + ar_sum / N_supervised, with the counts of the whole global batch."""
    return alpha * sums.diff_sum / max(diff_count, 1.0) + sums.ar_sum / max(ar_count, 1.0)


def losses(sums: LossSums, alpha: float) -> dict[str, float]:
    """The reported losses of (globally summed) `sums`."""
    ar = float(sums.ar_sum) / max(float(sums.ar_count), 1.0)
    diff = float(sums.diff_sum) / max(float(sums.diff_count), 1.0)
    return {
        "loss": alpha * diff + ar,
        "ar_loss": ar,
        "diff_loss": diff,
        "diff_ce": float(sums.diff_ce_sum) / max(float(sums.diff_count), 1.0),
        "masked_tokens": int(sums.diff_count),
        "ar_tokens": int(sums.ar_count),
    }


class JointObjective(nn.Module):
    """The training view of an `NLDTransformer` (held by reference, not copied): forward = `LossSums`.

    It is the module the trainer wraps in DDP / FSDP, so the head is applied inside the wrapped forward, and
    only at positions that carry a loss (masked noisy tokens, supervised causal targets): with a 131k vocabulary
    the full [B, 2L, V] logits would dominate memory.
    """

    def __init__(self, net: NLDTransformer, block_size: int) -> None:
        super().__init__()
        self.net = net
        self.block_size = block_size

    def forward(self, input_ids: torch.Tensor, loss_mask: torch.Tensor, noise: Noise) -> LossSums:
        length = input_ids.shape[1]
        ids, positions, mask = dual_stream_inputs(noise.noisy, input_ids, self.block_size)
        hidden = self.net(ids, mask=mask, positions=positions, return_hidden=True)
        head = self.net.diffusion_head

        masked = noise.masked
        diff_logits = _at_least_fp32(head(hidden[:, :length][masked]))
        diff_ce = F.cross_entropy(diff_logits, input_ids[masked], reduction="none")
        weight = 1.0 / noise.p[:, None].expand(-1, length)[masked]

        supervised = loss_mask[:, 1:].bool()
        ar_logits = _at_least_fp32(head(hidden[:, length:-1][supervised]))
        ar_ce = F.cross_entropy(ar_logits, input_ids[:, 1:][supervised], reduction="sum")

        return LossSums(
            ar_sum=ar_ce,
            ar_count=supervised.sum().double(),
            diff_sum=(diff_ce.double() * weight.double()).sum(),
            diff_count=masked.sum().double(),
            diff_ce_sum=diff_ce.detach().double().sum(),
        )


def _at_least_fp32(logits: torch.Tensor) -> torch.Tensor:
    """Cross-entropy in float32 for bf16 / fp16 logits (float64 stays float64)."""
    return logits.to(torch.promote_types(logits.dtype, torch.float32))
