"""Pieces shared by the speculative modes and `auto`: draft a block, verify it, accept, the quadratic passes.

Each is written once and used by `linear_spec`, `quadratic_spec` and `auto`. The ones that need a forward pass
are sub-generators (`drafts = yield from draft_block(...)`); they count their passes in `stats`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from trimode.decode.decide import Decision, History, Pick
from trimode.decode.sampling import SamplingParams
from trimode.decode.stats import DecodeStats
from trimode.decode.step import Commit, Forward
from trimode.decode.stopping import ThinkingBudget
from trimode.decode.transfer import commit_by_threshold, masked_confidence
from trimode.model.masks import QuadraticInit, QuadraticStep

DRAFT_STEP_KEY = 1 << 12  # keeps draft sampling noise apart from the verify noise at the same position
NO_HISTORY = History((), ())


def histories(sampling: SamplingParams, history: History, ahead: list[int] = ()) -> list[History] | None:
    """The one row's history for a pick, when a processor reads it."""
    return [History(history.prompt, history.output, ahead)] if sampling.penalized else None


def draft_block(pending: int, start: int, block: int, mask_id: int, sampling: SamplingParams, stats: DecodeStats,
                threshold: float = 0.0, use_drafter: bool = False, device="cpu", history: History = NO_HISTORY,
                eos: frozenset[int] = frozenset()):
    """Drafts for the block - 1 tokens after `pending` (at position `start`): diffusion over [pending, MASK x B-1]
    on the read-only cache, drafter adapter on when asked for. Threshold 0 fills every mask in one pass; above 0,
    passes repeat, each committing the masks with confidence >= threshold (at least the best one). `history`:
    what the penalties see (the committed output). Returns the block [pending, d_1, .., d_{B-1}]."""
    ids = torch.full((1, block), mask_id, dtype=torch.long, device=device)
    ids[0, 0] = pending
    positions = torch.arange(start, start + block, device=device)
    # Undecided slots are tracked explicitly: the model may legitimately emit the mask id as a token.
    masked = torch.arange(block, device=device)[None, :] > 0
    draft_pass = 0
    while masked.any():
        pick = Pick(sampling, range(start, start + block), DRAFT_STEP_KEY + draft_pass,
                    histories=histories(sampling, history), eos=eos, confidence=threshold > 0)
        decision = yield Forward(ids.clone(), mask="bidirectional", positions=positions, lora=use_drafter, pick=pick)
        stats.forward_passes += 1
        proposal = decision.tokens[None]
        draft_pass += 1
        if threshold == 0:
            ids = torch.where(masked, proposal, ids)
            break
        conf = masked_confidence(decision.confidence[None], masked)
        transfer = commit_by_threshold(conf, masked, threshold)
        ids[transfer] = proposal[transfer]
        masked &= ~transfer
    return ids[0].tolist()


def verify_block(drafts: list[int], start: int, sampling: SamplingParams, stats: DecodeStats, device="cpu",
                 history: History = NO_HISTORY, eos: frozenset[int] = frozenset()):
    """Causal pass over the drafted block at positions start..; K/V left as scratch (the caller commits the
    accepted part). Returns (ar, the decision), where ar[i] is the token chosen at position start + i + 1,
    exactly as AR would: its penalties see `history` (the output, which ends with drafts[0]) and drafts[1..i]."""
    n = len(drafts)
    positions = torch.arange(start, start + n, device=device)
    pick = Pick(sampling, range(start + 1, start + n + 1), histories=histories(sampling, history, drafts[1:]),
                seen=range(n), eos=eos, logprobs=sampling.logprobs)
    decision = yield Forward(torch.tensor([drafts], device=device), mask="causal", positions=positions, pick=pick)
    stats.forward_passes += 1
    return decision.tokens.tolist(), decision


def accepted_length(verified: list[int], drafts: list[int], limit: int) -> int:
    """1 + the number of leading drafts (drafts[1:]) equal to the verified token before them, at most `limit`."""
    accepted = 1
    while accepted < limit and verified[accepted - 1] == drafts[accepted]:
        accepted += 1
    return accepted


def force_end_think(verified: list[int], out_before: list[int], offset: int, thinking: ThinkingBudget | None,
                    limit: int) -> int:
    """AR's thinking budget inside a cycle: the token at generated index `max_thinking_tokens` is forced to the
    end-think id unless it appeared before. verified[i] is the token at generated index offset + i. Changes
    `verified` in place and returns the new acceptance limit (a forced token ends the cycle)."""
    if thinking is None:
        return limit
    k = thinking.max_thinking_tokens - offset
    if 0 <= k < len(verified) and k < limit and thinking.end_think_token_id not in out_before + verified[:k]:
        verified[k] = thinking.end_think_token_id
        return k + 1
    return limit


@dataclass
class QuadraticPass:
    """What one quadratic pass over groups [d_j, MASK x B] gives: verified[j] is the causal choice after leader
    d_j (the token at position start + j + 1); `tail(j)` the drafts its group's masks make for the tokens after
    verified[j]."""

    verified: list[int]
    tokens: torch.Tensor  # [B, B + 1]: slot 0 the verified token, slots 2.. the drafts
    decision: Decision

    def tail(self, j: int) -> list[int]:
        return self.tokens[j, 2:].tolist()


def quadratic_pass(leaders: list[int], start: int, mask_id: int, sampling: SamplingParams, stats: DecodeStats,
                   ar_mix_weight: float | None = None, device="cpu", history: History = NO_HISTORY,
                   eos: frozenset[int] = frozenset()):
    """One quadratic pass (spec 2.4): B groups [d_j, MASK x B], group j at positions start + j .. start + j + B.
    Slot 0 of group j gives the causal prediction after d_j (verified, its penalties seeing `history`, which ends
    with d_0, and d_1..d_j); slots 2.. draft the tokens after it. With `ar_mix_weight` = l slot 0 reads
    l * slot0 + (1 - l) * slot1. K/V left as scratch: commit the accepted leaders' slots
    (`Commit(slots=[j * (B + 1) ...])`); the leaders see only leaders, so theirs are causal K/V."""
    block = len(leaders)
    ids = torch.full((block, block + 1), mask_id, dtype=torch.long, device=device)
    ids[:, 0] = torch.tensor(leaders, device=device)
    group = torch.arange(block + 1, device=device)
    positions = start + torch.arange(block, device=device)[:, None] + group[None, :]
    # Slot k of group j predicts the token at position start + j + k (slot 0: the causal next token).
    pred_pos = (positions + (group == 0).long()).flatten().tolist()
    width = block + 1
    slot0 = [j * width for j in range(block)]
    blend = None if ar_mix_weight is None else (ar_mix_weight, slot0, [a + 1 for a in slot0])
    seen = [0] * (block * width)
    for j in range(block):
        seen[j * width] = j
    steps = [0 if i % width == 0 else DRAFT_STEP_KEY for i in range(block * width)]
    pick = Pick(sampling, pred_pos, steps, histories=histories(sampling, history, leaders[1:]), seen=seen, eos=eos,
                logprobs=sampling.logprobs, blend=blend)
    decision = yield Forward(ids.view(1, -1), mask=QuadraticStep(block), positions=positions.flatten(), pick=pick)
    stats.forward_passes += 1
    tokens = decision.tokens.view(block, width)
    return QuadraticPass(tokens[:, 0].tolist(), tokens, decision)


def quadratic_init(prompt_ids: torch.Tensor, block: int, mask_id: int, sampling: SamplingParams,
                   stats: DecodeStats, eos: frozenset[int] = frozenset()):
    """The first quadratic pass (spec 2.4 init): [prompt, MASK x B], the prompt causal, the masks seeing
    everything; the cache keeps the prompt. Returns (the draft [d_0, .., d_{B-1}]: d_0 the causal choice after
    the prompt (as AR's), d_1.. the diffusion choices at mask slots 1..B-1; the decision)."""
    prompt_len = prompt_ids.shape[1]
    masks = torch.full((1, block), mask_id, dtype=torch.long, device=prompt_ids.device)
    read = [prompt_len - 1, *range(prompt_len + 1, prompt_len + block)]  # the causal next token, mask slots 1..
    history = History(prompt_ids[0].tolist(), [])
    pick = Pick(sampling, range(prompt_len, prompt_len + block), [0] + [DRAFT_STEP_KEY] * (block - 1),
                histories=histories(sampling, history), eos=eos, logprobs=sampling.logprobs)
    decision = yield Forward(torch.cat([prompt_ids, masks], 1), mask=QuadraticInit(prompt_len), logits=read,
                             pick=pick)
    yield Commit(prompt_len)
    stats.forward_passes += 1
    return decision.tokens.tolist(), decision
