"""Pieces shared by the speculative modes and `auto`: draft a block, verify it, accept, the quadratic passes.

Each is written once and used by `linear_spec`, `quadratic_spec` and `auto`. The ones that need a forward pass
are sub-generators (`drafts = yield from draft_block(...)`); they count their passes in `stats`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from trimode.decode.decide import Decision, History, Pick
from trimode.decode.grammar import GrammarMatcher
from trimode.decode.sampling import SamplingParams, choose
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
                threshold: float = 0.0, use_drafter: bool = False, device="cpu", rule=None,
                grammar: GrammarMatcher | None = None, history: History = NO_HISTORY,
                eos: frozenset[int] = frozenset()):
    """Drafts for the block - 1 tokens after `pending` (at position `start`): diffusion over [pending, MASK x B-1]
    on the read-only cache, drafter adapter on when asked for. Threshold 0 fills every mask in one pass; above 0,
    passes repeat, each committing the masks with confidence >= threshold (at least the best one). A `rule`
    (decode/unmask.py, e.g. the learned sampler) picks each pass's slots instead. With a `grammar` (at the state
    after `pending`) and the one-pass fill, the drafts are chosen left to right under it (`grammar_draft`).
    `history`: what the penalties see (the committed output). Returns the block [pending, d_1, .., d_{B-1}]."""
    ids = torch.full((1, block), mask_id, dtype=torch.long, device=device)
    ids[0, 0] = pending
    positions = torch.arange(start, start + block, device=device)
    # Undecided slots are tracked explicitly: the model may legitimately emit the mask id as a token.
    masked = torch.arange(block, device=device)[None, :] > 0
    draft_pass = 0
    while masked.any():
        read_logits = rule is not None or (grammar is not None and threshold == 0)
        pick = Pick(sampling, range(start, start + block), DRAFT_STEP_KEY + draft_pass,
                    histories=histories(sampling, history), eos=eos, confidence=threshold > 0 or rule is not None,
                    logits=read_logits)
        decision = yield Forward(ids.clone(), mask="bidirectional", positions=positions, lora=use_drafter, pick=pick)
        stats.forward_passes += 1
        proposal = decision.tokens[None].clone()
        draft_pass += 1
        if threshold == 0 and rule is None:
            if grammar is not None:
                proposal[0, 1:] = torch.tensor(grammar_draft(decision.logits[1:], positions[1:], sampling,
                                                             DRAFT_STEP_KEY + draft_pass - 1, grammar))
            ids = torch.where(masked, proposal, ids)
            break
        conf = masked_confidence(decision.confidence[None], masked)
        if rule is None:
            transfer = commit_by_threshold(conf, masked, threshold)
        else:
            transfer = rule(conf, masked, decision.logits[None], proposal)
        ids[transfer] = proposal[transfer]
        masked &= ~transfer
    return ids[0].tolist()


def grammar_draft(logits: torch.Tensor, positions: torch.Tensor, sampling: SamplingParams, step: int,
                  grammar: GrammarMatcher) -> list[int]:
    """Draft tokens [T] from draft logits [T, V], each chosen under the grammar as it would be after the drafts
    before it (the grammar is left as it was). A draft the grammar rejects could never be accepted: drafting
    under it raises acceptance and costs one mask per drafted token."""
    mark = grammar.checkpoint()
    drafts: list[int] = []
    try:
        for i in range(logits.shape[0]):
            token = int(choose(grammar.mask(logits[i : i + 1]), positions[i : i + 1], sampling, step=step)[0])
            drafts.append(token)
            grammar.advance(token)
    finally:
        grammar.restore(mark)
    return drafts


def verify_block(drafts: list[int], start: int, sampling: SamplingParams, stats: DecodeStats, device="cpu",
                 history: History = NO_HISTORY, eos: frozenset[int] = frozenset(),
                 grammar: GrammarMatcher | None = None, forced: tuple[int, int] | None = None):
    """Causal pass over the drafted block at positions start..; K/V left as scratch (the caller commits the
    accepted part). Returns (ar, the decision), where ar[i] is the token chosen at position start + i + 1,
    exactly as AR would: its penalties see `history` (the output, which ends with drafts[0]) and drafts[1..i].
    With a `grammar`, position i is chosen under the grammar as after drafts[1..i] (`verify_masks`), ar holds
    the accepted tokens only (`verify_constrained`) and the grammar advances by them."""
    n = len(drafts)
    positions = torch.arange(start, start + n, device=device)
    pick = Pick(sampling, range(start + 1, start + n + 1), histories=histories(sampling, history, drafts[1:]),
                seen=range(n), eos=eos, logprobs=sampling.logprobs,
                masks=None if grammar is None else verify_masks(grammar, drafts, n))
    decision = yield Forward(torch.tensor([drafts], device=device), mask="causal", positions=positions, pick=pick)
    stats.forward_passes += 1
    if grammar is not None:
        return verify_constrained(decision.tokens.tolist(), drafts, grammar, n, forced), decision
    return decision.tokens.tolist(), decision


def verify_masks(grammar: GrammarMatcher, drafts: list[int], width: int) -> torch.Tensor:
    """[width, V] bool: at i, what the grammar allows after drafts[1..i] (AR's mask there had it written them).
    Past a draft the grammar refuses, all tokens (no position there can be accepted: the verified token before
    it, chosen under the grammar, differs from it). The grammar is left as it was."""
    masks = torch.ones((width, grammar.vocab_size), dtype=torch.bool)
    mark = grammar.checkpoint()
    try:
        for i in range(width):
            masks[i] = grammar.allowed()
            if i + 1 >= len(drafts) or grammar.finished or not grammar.accepts(drafts[i + 1]):
                break
            grammar.advance(drafts[i + 1])
    finally:
        grammar.restore(mark)
    return masks


def verify_constrained(chosen: list[int], drafts: list[int], grammar: GrammarMatcher, limit: int,
                       forced: tuple[int, int] | None = None) -> list[int]:
    """The verified tokens of one cycle under a grammar: chosen[i] is the decision stage's choice after
    drafts[0..i] under the grammar's mask as AR would have it after drafts[1..i] (`verify_masks`), so the
    grammar advances by each verified token; the cycle stops after the first that differs from the next draft,
    after `limit`, or when the grammar ends. `forced` = (index, token): the thinking budget's end-think token
    replaces the choice at that index and ends the cycle. Returns verified[:accepted] (accepted >= 1)."""
    if grammar.finished:  # it ended with drafts[0] (EOS): nothing after it is output
        return [drafts[0]]
    verified: list[int] = []
    for i in range(limit):
        token = chosen[i]
        was_forced = forced is not None and i == forced[0] and forced[1] not in verified
        if was_forced:
            token = forced[1]
        grammar.advance(token)
        verified.append(token)
        if was_forced or i + 1 >= limit or token != drafts[i + 1] or grammar.finished:
            break
    return verified


def think_forced_at(out_before: list[int], offset: int, thinking: ThinkingBudget | None,
                    width: int) -> tuple[int, int] | None:
    """Where the thinking budget forces the end-think token among the next `width` verified tokens (generated
    indices offset..): (index, token), or None. The rule of `force_end_think`."""
    if thinking is None:
        return None
    k = thinking.max_thinking_tokens - offset
    if 0 <= k < width and thinking.end_think_token_id not in out_before:
        return k, thinking.end_think_token_id
    return None


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
    pred_pos: torch.Tensor | None = None  # [B, B + 1] the position each slot predicts (drafts under a grammar)
    sampling: SamplingParams | None = None

    def tail(self, j: int, grammar: GrammarMatcher | None = None) -> list[int]:
        """With a `grammar` (at the state after verified[j]), drafted under it (`grammar_draft`)."""
        if grammar is not None:
            block = self.tokens.shape[0]
            logits = self.decision.logits.view(block, block + 1, -1)
            return grammar_draft(logits[j, 2:], self.pred_pos[j, 2:], self.sampling, DRAFT_STEP_KEY, grammar)
        return self.tokens[j, 2:].tolist()


def quadratic_pass(leaders: list[int], start: int, mask_id: int, sampling: SamplingParams, stats: DecodeStats,
                   ar_mix_weight: float | None = None, device="cpu", history: History = NO_HISTORY,
                   eos: frozenset[int] = frozenset(), grammar: GrammarMatcher | None = None):
    """One quadratic pass (spec 2.4): B groups [d_j, MASK x B], group j at positions start + j .. start + j + B.
    Slot 0 of group j gives the causal prediction after d_j (verified, its penalties seeing `history`, which ends
    with d_0, and d_1..d_j); slots 2.. draft the tokens after it. With `ar_mix_weight` = l slot 0 reads
    l * slot0 + (1 - l) * slot1. K/V left as scratch: commit the accepted leaders' slots
    (`Commit(slots=[j * (B + 1) ...])`); the leaders see only leaders, so theirs are causal K/V. With a `grammar`
    (at the state after d_0), slot 0 of group j is chosen under it as after d_1..d_j (`verify_masks`), and the
    pass keeps its logits for `tail` to draft under it."""
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
    if grammar is not None:
        pick.masks, pick.masked_at, pick.logits = verify_masks(grammar, leaders, block), slot0, True
    decision = yield Forward(ids.view(1, -1), mask=QuadraticStep(block), positions=positions.flatten(), pick=pick)
    stats.forward_passes += 1
    tokens = decision.tokens.view(block, width)
    return QuadraticPass(tokens[:, 0].tolist(), tokens, decision, torch.tensor(pred_pos).view(block, width), sampling)


def quadratic_init(prompt_ids: torch.Tensor, block: int, mask_id: int, sampling: SamplingParams,
                   stats: DecodeStats, eos: frozenset[int] = frozenset(), grammar: GrammarMatcher | None = None):
    """The first quadratic pass (spec 2.4 init): [prompt, MASK x B], the prompt causal, the masks seeing
    everything; the cache keeps the prompt. Returns (the draft [d_0, .., d_{B-1}]: d_0 the causal choice after
    the prompt (as AR's, under the `grammar` when given; the caller advances it), d_1.. the diffusion choices
    at mask slots 1..B-1; the decision)."""
    prompt_len = prompt_ids.shape[1]
    masks = torch.full((1, block), mask_id, dtype=torch.long, device=prompt_ids.device)
    read = [prompt_len - 1, *range(prompt_len + 1, prompt_len + block)]  # the causal next token, mask slots 1..
    history = History(prompt_ids[0].tolist(), [])
    pick = Pick(sampling, range(prompt_len, prompt_len + block), [0] + [DRAFT_STEP_KEY] * (block - 1),
                histories=histories(sampling, history), eos=eos, logprobs=sampling.logprobs)
    if grammar is not None:  # d_0 is AR's choice under the grammar
        pick.masks, pick.masked_at = grammar.allowed()[None], [0]
    decision = yield Forward(torch.cat([prompt_ids, masks], 1), mask=QuadraticInit(prompt_len), logits=read,
                             pick=pick)
    yield Commit(prompt_len)
    stats.forward_passes += 1
    return decision.tokens.tolist(), decision
