"""Linear self-speculation (spec 2.3), batch size 1.

Cycle: block = [next_token, MASK x (B-1)] at positions cache_len.. ;
1. draft: bidirectional over the read-only cache, drafter adapter on (if loaded and asked for); threshold 0
   fills every mask in one pass, threshold > 0 repeats passes committing masks with conf >= threshold (at
   least the best one per pass);
2. verify: causal pass of the drafted block, adapter off, K/V written; ar[i] = choice at block position i,
   i.e. the token at position cache_len + i + 1;
3. accept: a = 1 + number of leading i with ar[i] == block[i + 1]; emit ar[:a]; crop the cache to
   cache_len + a (next_token + accepted drafts); next_token = ar[a - 1].
Verified tokens are chosen with `choose` keyed by absolute position, exactly as AR does, so the output equals
AR output for greedy decoding and for sampling with the same seed.
"""

from __future__ import annotations

import torch

from trimode.decode.sampling import SamplingParams, choose, confidence
from trimode.decode.stats import Committed, DecodeOutput, DecodeStats, DecodeStream
from trimode.decode.stopping import StopRule, ThinkingBudget
from trimode.decode.transfer import commit_by_threshold, masked_confidence
from trimode.model.transformer import NLDTransformer

DRAFT_STEP_KEY = 1 << 12  # keeps draft sampling noise apart from the verify noise at the same position


@torch.no_grad()
def linear_spec_decode(
    model: NLDTransformer,
    prompt_ids: torch.Tensor,
    stop: StopRule,
    sampling: SamplingParams = SamplingParams(),
    block_length: int = 32,
    threshold: float = 0.0,
    use_drafter: bool = False,
    thinking: ThinkingBudget | None = None,
    thinking_as_reference: bool = False,
) -> DecodeStream:
    """`thinking`: the token at generated index `max_thinking_tokens` is forced to the end-think id unless it
    appeared before, exactly as in AR. `thinking_as_reference=True` reproduces the reference instead: after
    each cycle past the budget, the end-think id replaces the next block's slot 0 in the context only."""
    if prompt_ids.shape[0] != 1:
        raise ValueError("linear_spec decodes one sequence at a time (batch size 1)")
    if block_length < 2:
        raise ValueError("linear_spec needs block_length >= 2")
    mask_id = model.config.mask_token_id
    prompt_len = prompt_ids.shape[1]
    stats = DecodeStats("linear_spec", prompt_tokens=prompt_len)
    cache = model.new_cache(1, prompt_len + stop.max_new_tokens + 2 * block_length)
    offsets = torch.arange(block_length)

    logits = model(prompt_ids, mask="causal", cache=cache)
    cache.commit(prompt_len)
    stats.forward_passes += 1
    next_token = int(choose(logits[:, -1], torch.tensor([prompt_len]), sampling))
    if thinking is not None and not thinking_as_reference and thinking.max_thinking_tokens == 0:
        next_token = thinking.end_think_token_id
    out = [next_token]
    yield Committed([[next_token]], stats)
    out, over = stop.finish(out)

    while not over:
        start = cache.length
        block = torch.full((1, block_length), mask_id, dtype=torch.long, device=prompt_ids.device)
        block[0, 0] = next_token
        positions = start + offsets

        # Track undecided slots explicitly: the model may legitimately emit the mask id as a token.
        masked = offsets[None, :].to(block.device) > 0
        draft_pass = 0
        while masked.any():
            logits = model(block, mask="bidirectional", cache=cache, lora=use_drafter)
            stats.forward_passes += 1
            proposal = choose(logits[0], positions, sampling, step=DRAFT_STEP_KEY + draft_pass)[None]
            draft_pass += 1
            if threshold == 0:
                block = torch.where(masked, proposal, block)
                break
            conf = masked_confidence(confidence(logits, proposal), masked)
            transfer = commit_by_threshold(conf, masked, threshold)
            block[transfer] = proposal[transfer]
            masked &= ~transfer

        logits = model(block, mask="causal", cache=cache)
        cache.commit(block_length)
        stats.forward_passes += 1
        ar = choose(logits[0], positions + 1, sampling).tolist()
        drafts = block[0].tolist()
        limit = block_length
        if thinking is not None and not thinking_as_reference:
            k = thinking.max_thinking_tokens - len(out)  # ar[k] is the token at generated index budget
            if 0 <= k < block_length and thinking.end_think_token_id not in out + ar[:k]:
                ar[k] = thinking.end_think_token_id
                limit = k + 1
        accepted = 1
        while accepted < limit and ar[accepted - 1] == drafts[accepted]:
            accepted += 1
        emitted = ar[:accepted]
        cache.crop(start + accepted)
        next_token = emitted[-1]
        stats.acceptance.append(accepted)

        before = len(out)
        out, over = stop.finish(out + emitted)
        yield Committed([out[before:]], stats)
        if thinking_as_reference and thinking is not None and len(out) > thinking.max_thinking_tokens:
            if thinking.end_think_token_id not in out:
                # As the reference: the end-think token enters the context as the next block's slot 0,
                # while the emitted text keeps the AR token it replaces, so this repeats every cycle.
                next_token = thinking.end_think_token_id

    stats.generated_tokens = len(out)
    return DecodeOutput([out], stats)
