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

Two options teach editing (both off by default, which is the reference objective, bit for bit):
- substitution (`corrupt(..., substitute_rate=q)`): each loss token the mask left visible is replaced, with
  probability q, by another token (of the same row, or of the vocabulary); the noisy stream predicts the original
  there (`sub` term, revision: find and fix a wrong token) and the token itself at the other visible loss tokens
  (`keep` term, so that a right token is predicted as itself);
- per-row blocks (`block_spans`): spans of a row that form one noisy block each, whatever the grid of
  `block_size` (infill: `middle + pads + suffix` is one block of any length, seeing the clean prefix before it),
  and an AR mask that differs from the loss mask (no next-token loss on pads and the suffix after them).
"""

from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass, field, fields

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


SUBSTITUTE_FROM = ("row", "vocab")


@dataclass
class Noise:
    """The corrupted copy of a batch: `noisy` [B, L] ids, `masked` [B, L] bool, `p` [B] mask probability;
    `substituted` [B, L] bool (visible loss tokens replaced by another token), None when substitution is off."""

    noisy: torch.Tensor
    masked: torch.Tensor
    p: torch.Tensor
    substituted: torch.Tensor | None = None


def corrupt(input_ids: torch.Tensor, loss_mask: torch.Tensor, mask_token_id: int, keys: list[int],
            eps: float = EPS, substitute_rate: float = 0.0, substitute_from: str = "row",
            vocab_size: int | None = None) -> Noise:
    """Mask each loss token (loss_mask = 1) of row b with probability p_b = (1 - eps) t_b + eps, t_b ~ U(0, 1).

    Row b draws t_b and its L uniforms from a CPU generator seeded with `keys[b]`. Tokens outside the loss mask
    (SFT prompts, padding) are never masked.

    `substitute_rate` q > 0: then the same generator draws 2L more uniforms, and each loss token left visible is
    replaced with probability q by another token: one of the row's loss tokens (`substitute_from="row"`: a
    plausible wrong token, e.g. another digit in a list of digits) or of the vocabulary (`"vocab"`, uniform over
    `vocab_size`). A draw equal to the original token (or to the mask token) leaves the token as it was. With
    q = 0 nothing more is drawn: the noise is exactly the reference objective's.
    """
    b, length = input_ids.shape
    if len(keys) != b:
        raise ValueError(f"need one noise key per row: {len(keys)} keys for {b} rows")
    if substitute_rate and substitute_from not in SUBSTITUTE_FROM:
        raise ValueError(f"substitute_from must be one of {', '.join(SUBSTITUTE_FROM)}, got {substitute_from!r}")
    if substitute_rate and substitute_from == "vocab" and not vocab_size:
        raise ValueError("substitute_from='vocab' needs vocab_size")
    t = torch.empty(b, dtype=torch.float64)
    u = torch.empty(b, length, dtype=torch.float64)
    s = torch.empty(b, 2, length, dtype=torch.float64) if substitute_rate else None
    for row, key in enumerate(keys):
        g = torch.Generator().manual_seed(key)
        t[row] = torch.rand((), generator=g, dtype=torch.float64)
        u[row] = torch.rand(length, generator=g, dtype=torch.float64)
        if s is not None:  # drawn after t and u, so that the masks are those of the reference objective
            s[row] = torch.rand(2, length, generator=g, dtype=torch.float64)
    p = (1 - eps) * t + eps
    masked = (u < p[:, None]).to(input_ids.device) & loss_mask.bool()
    noisy = torch.where(masked, torch.full_like(input_ids, mask_token_id), input_ids)
    if s is None:
        return Noise(noisy, masked, p.to(input_ids.device))
    s = s.to(input_ids.device)
    replacement = _replacements(input_ids, loss_mask.bool(), s[:, 1], substitute_from, vocab_size)
    substituted = (s[:, 0] < substitute_rate) & loss_mask.bool() & ~masked
    substituted &= (replacement != input_ids) & (replacement != mask_token_id)
    noisy = torch.where(substituted, replacement, noisy)
    return Noise(noisy, masked, p.to(input_ids.device), substituted)


def _replacements(input_ids: torch.Tensor, loss_mask: torch.Tensor, r: torch.Tensor, source: str,
                  vocab_size: int | None) -> torch.Tensor:
    """[B, L] candidate tokens from uniforms r [B, L]: the row's k-th loss token (k = floor(r * n_loss)), or
    floor(r * vocab_size)."""
    if source == "vocab":
        return (r * vocab_size).long().clamp_(max=vocab_size - 1)
    n = loss_mask.sum(1, keepdim=True)
    k = (r * n).long().clamp_(max=(n - 1).clamp(min=0))
    # The k-th loss token of the row: positions of loss tokens first, in order (a stable sort on ~loss_mask).
    order = torch.sort((~loss_mask).to(torch.uint8), dim=1, stable=True).indices
    picked = torch.gather(input_ids, 1, torch.gather(order, 1, k))
    return torch.where(n > 0, picked, input_ids)


def dual_stream_inputs(noisy: torch.Tensor, clean: torch.Tensor, block_size: int,
                       block_spans: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`(input_ids [B, 2L], positions [2L], mask [2L, 2L] or [B, 1, 2L, 2L])` of the dual-stream pass.

    `block_spans` [B, L] int (optional): 0 where the fixed grid of `block_size` applies, k > 0 on the positions of
    the row's k-th span, which forms one block (see `block_ids`); then the mask is per row.
    """
    length = clean.shape[1]
    ids = torch.cat([noisy, clean], dim=1)
    positions = torch.arange(length, device=clean.device).repeat(2)
    if block_spans is None:
        return ids, positions, _dual_stream_mask(length, block_size, clean.device)
    return ids, positions, dual_stream_row_masks(block_ids(block_spans, block_size))[:, None]


def block_ids(block_spans: torch.Tensor, block_size: int) -> torch.Tensor:
    """[B, L] non-decreasing block index of each position.

    A block starts at every grid position `pos % block_size == 0` outside spans, at the first position of each
    span, and right after a span; a span (consecutive positions of one value k > 0) is one block whatever its
    length. With no spans (all 0) this is `pos // block_size`, the reference grid.
    """
    b, length = block_spans.shape
    pos = torch.arange(length, device=block_spans.device)
    prev = torch.cat([torch.zeros_like(block_spans[:, :1]), block_spans[:, :-1]], dim=1)
    grid = (pos % block_size == 0)[None, :].expand(b, length)
    start = torch.where(block_spans == 0, grid | (prev != 0), block_spans != prev)
    start[:, 0] = True
    return start.long().cumsum(1) - 1


def dual_stream_row_masks(blocks: torch.Tensor) -> torch.Tensor:
    """[B, 2L, 2L] dual-stream masks from per-row block indices [B, L] (non-decreasing along the row): the rules
    of `dual_stream_mask` with `blk = blocks[b]` instead of `pos // block_size`."""
    b, n = blocks.shape
    blk = torch.cat([blocks, blocks], dim=1)  # [B, 2L]
    idx = torch.arange(2 * n, device=blocks.device)
    noisy = idx < n
    pos = idx % n
    qn, kn = noisy[:, None], noisy[None, :]
    qb, kb = blk[:, :, None], blk[:, None, :]
    cc = ~qn & ~kn & (pos[:, None] >= pos[None, :])
    return (qn & kn & (qb == kb)) | (qn & ~kn & (qb > kb)) | cc


@functools.lru_cache(maxsize=4)
def _dual_stream_mask(length: int, block_size: int, device: torch.device) -> torch.Tensor:
    """Built once per shape: at L = 4096 the mask has 67M entries and every micro-batch needs it."""
    return dual_stream_mask(length, block_size, device)


def dual_stream_logits(net: NLDTransformer, noisy: torch.Tensor, clean: torch.Tensor, block_size: int,
                       block_spans: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """`(diffusion logits [B, L, V], causal logits [B, L, V])` of one dual-stream pass (used by tests and
    diagnostics; training uses `JointObjective`, which applies the head only where there is a loss)."""
    ids, positions, mask = dual_stream_inputs(noisy, clean, block_size, block_spans)
    logits = net(ids, mask=mask, positions=positions)
    length = clean.shape[1]
    return logits[:, :length], logits[:, length:]


def _zero() -> torch.Tensor:
    return torch.zeros((), dtype=torch.float64)


@dataclass
class LossSums:
    """Loss sums and counts of one micro-batch (or of many, added together).

    ar_sum: sum of next-token CE over supervised targets; ar_count: their number (loss_mask[:, 1:], or the AR
    mask's); diff_sum: sum of CE / p over masked positions; diff_count: their number;
    diff_ce_sum: sum of plain CE over masked positions (reported, not optimised);
    sub_sum / sub_count: CE of the original token at substituted positions, and their number;
    keep_sum / keep_count: CE of the token itself at the other visible loss tokens (both 0 without substitution).
    """

    ar_sum: torch.Tensor
    ar_count: torch.Tensor
    diff_sum: torch.Tensor
    diff_count: torch.Tensor
    diff_ce_sum: torch.Tensor
    sub_sum: torch.Tensor = field(default_factory=_zero)
    sub_count: torch.Tensor = field(default_factory=_zero)
    keep_sum: torch.Tensor = field(default_factory=_zero)
    keep_count: torch.Tensor = field(default_factory=_zero)

    def detach(self) -> LossSums:
        return LossSums(*(getattr(self, f.name).detach() for f in fields(self)))

    def __add__(self, other: LossSums) -> LossSums:
        return LossSums(*(getattr(self, f.name) + getattr(other, f.name) for f in fields(self)))

    def as_tensor(self) -> torch.Tensor:
        """[9] float64, in field order (for one all-reduce)."""
        device = self.ar_sum.device  # the substitution fields default to CPU zeros
        return torch.stack([getattr(self, f.name).double().to(device) for f in fields(self)])

    @classmethod
    def from_tensor(cls, t: torch.Tensor) -> LossSums:
        return cls(*t.unbind())


@dataclass(frozen=True)
class EditWeights:
    """Weights of the substitution terms (relative to the diffusion term, i.e. also times alpha)."""

    substitute: float = 1.0
    keep: float = 1.0


def global_loss(sums: LossSums, alpha: float, ar_count: float, diff_count: float, sub_count: float = 0.0,
                keep_count: float = 0.0, weights: EditWeights = EditWeights()) -> torch.Tensor:
    """alpha * diff_sum / N_masked + ar_sum / N_supervised, with the counts of the whole global batch; with
    substitution, plus alpha * (w_sub * sub_sum / N_sub + w_keep * keep_sum / N_keep)."""
    loss = alpha * sums.diff_sum / max(diff_count, 1.0) + sums.ar_sum / max(ar_count, 1.0)
    if sub_count:
        loss = loss + alpha * weights.substitute * sums.sub_sum / sub_count
    if keep_count:
        loss = loss + alpha * weights.keep * sums.keep_sum / keep_count
    return loss


def losses(sums: LossSums, alpha: float, weights: EditWeights = EditWeights()) -> dict[str, float]:
    """The reported losses of (globally summed) `sums` (the substitution keys only when there were any)."""
    ar = float(sums.ar_sum) / max(float(sums.ar_count), 1.0)
    diff = float(sums.diff_sum) / max(float(sums.diff_count), 1.0)
    out = {
        "loss": alpha * diff + ar,
        "ar_loss": ar,
        "diff_loss": diff,
        "diff_ce": float(sums.diff_ce_sum) / max(float(sums.diff_count), 1.0),
        "masked_tokens": int(sums.diff_count),
        "ar_tokens": int(sums.ar_count),
    }
    if float(sums.sub_count) or float(sums.keep_count):
        sub = float(sums.sub_sum) / max(float(sums.sub_count), 1.0)
        keep = float(sums.keep_sum) / max(float(sums.keep_count), 1.0)
        out["loss"] += alpha * (weights.substitute * sub + weights.keep * keep)
        out.update(sub_ce=sub, keep_ce=keep, substituted_tokens=int(sums.sub_count))
    return out


class JointObjective(nn.Module):
    """The training view of an `NLDTransformer` (held by reference, not copied): forward = `LossSums`.

    It is the module the trainer wraps in DDP / FSDP, so the head is applied inside the wrapped forward, and
    only at positions that carry a loss (masked noisy tokens, supervised causal targets, and with substitution
    the visible noisy loss tokens): with a 131k vocabulary the full [B, 2L, V] logits would dominate memory.
    """

    def __init__(self, net: NLDTransformer, block_size: int) -> None:
        super().__init__()
        self.net = net
        self.block_size = block_size

    def forward(self, input_ids: torch.Tensor, loss_mask: torch.Tensor, noise: Noise,
                ar_mask: torch.Tensor | None = None, block_spans: torch.Tensor | None = None) -> LossSums:
        """`ar_mask` [B, L]: the AR targets when they differ from `loss_mask` (default: `loss_mask`);
        `block_spans` [B, L]: per-row blocks (`dual_stream_inputs`; default: the fixed grid)."""
        length = input_ids.shape[1]
        ids, positions, mask = dual_stream_inputs(noise.noisy, input_ids, self.block_size, block_spans)
        hidden = self.net(ids, mask=mask, positions=positions, return_hidden=True)
        head = self.net.diffusion_head

        masked = noise.masked
        diff_logits = _at_least_fp32(head(hidden[:, :length][masked]))
        diff_ce = F.cross_entropy(diff_logits, input_ids[masked], reduction="none")
        weight = 1.0 / noise.p[:, None].expand(-1, length)[masked]

        supervised = (loss_mask if ar_mask is None else ar_mask)[:, 1:].bool()
        ar_logits = _at_least_fp32(head(hidden[:, length:-1][supervised]))
        ar_ce = F.cross_entropy(ar_logits, input_ids[:, 1:][supervised], reduction="sum")

        sums = LossSums(
            ar_sum=ar_ce,
            ar_count=supervised.sum().double(),
            diff_sum=(diff_ce.double() * weight.double()).sum(),
            diff_count=masked.sum().double(),
            diff_ce_sum=diff_ce.detach().double().sum(),
        )
        if noise.substituted is not None:
            visible = loss_mask.bool() & ~masked
            edit_logits = _at_least_fp32(head(hidden[:, :length][visible]))
            edit_ce = F.cross_entropy(edit_logits, input_ids[visible], reduction="none").double()
            sub = noise.substituted[visible]
            sums.sub_sum, sums.sub_count = edit_ce[sub].sum(), sub.sum().double()
            sums.keep_sum, sums.keep_count = edit_ce[~sub].sum(), (~sub).sum().double()
        return sums


def _at_least_fp32(logits: torch.Tensor) -> torch.Tensor:
    """Cross-entropy in float32 for bf16 / fp16 logits (float64 stays float64)."""
    return logits.to(torch.promote_types(logits.dtype, torch.float32))
