"""Quadratic self-speculation (spec 2.4), batch size 1.

Init (1 pass): `[prompt, MASK x B]`, prompt causal, masks see everything; draft d_0 = causal choice after
the prompt, d_1.. = diffusion choices at mask slots 1..B-1. The cache keeps the prompt.
Each pass: B groups `[d_j, MASK x B]`, group j at positions clean+j .. clean+j+B (mask `quadratic_step_mask`).
Logits [B, B+1, V]; slot 1 of every group takes slot 0's logits (the causal prediction after d_j), or with
`ar_mix_weight` = l both become l*slot0 + (1-l)*slot1. Accept c = 1 + leading j with pred[j, 0] == d[j+1];
commit d[:c] (the cache keeps the leaders' K/V, which are causal); next draft = pred[c-1, 1:].
Verified tokens are chosen by absolute position like AR, so without mixing the output equals AR output
(greedy, and sampling with the same seed).

Positions: the reference computes the Llama-4 query scale of a quadratic pass from a flattened index
(clean + arange(B(B+1))); we use the true positions of each token for RoPE and query scale alike. The two
agree wherever the scale is 1 (positions below `original_max_position_embeddings`).
"""

from __future__ import annotations

import torch

from trimode.decode.sampling import SamplingParams, choose
from trimode.decode.stats import Committed, DecodeOutput, DecodeStats, DecodeStream
from trimode.decode.stopping import StopRule, ThinkingBudget
from trimode.model.masks import quadratic_init_mask, quadratic_step_mask
from trimode.model.transformer import NLDTransformer

DRAFT_STEP_KEY = 1 << 12


@torch.no_grad()
def quadratic_spec_decode(
    model: NLDTransformer,
    prompt_ids: torch.Tensor,
    stop: StopRule,
    sampling: SamplingParams = SamplingParams(),
    block_length: int = 32,
    ar_mix_weight: float | None = None,
    thinking: ThinkingBudget | None = None,
) -> DecodeStream:
    if prompt_ids.shape[0] != 1:
        raise ValueError("quadratic_spec decodes one sequence at a time (batch size 1)")
    if block_length < 2:
        raise ValueError("quadratic_spec needs block_length >= 2")
    mask_id, dev, B = model.config.mask_token_id, prompt_ids.device, block_length
    prompt_len = prompt_ids.shape[1]
    stats = DecodeStats("quadratic_spec", prompt_tokens=prompt_len)
    cache = model.new_cache(1, prompt_len + stop.max_new_tokens + B * (B + 1) + B)

    masks = torch.full((1, B), mask_id, dtype=torch.long, device=dev)
    logits = model(
        torch.cat([prompt_ids, masks], 1), mask=quadratic_init_mask(prompt_len, B, dev), cache=cache
    )[0]
    cache.commit(prompt_len)
    stats.forward_passes += 1
    first = choose(logits[prompt_len - 1 : prompt_len], torch.tensor([prompt_len]), sampling)
    rest = choose(
        logits[prompt_len + 1 :], torch.arange(prompt_len + 1, prompt_len + B), sampling, step=DRAFT_STEP_KEY
    )
    draft = [int(first)] + rest.tolist()
    if thinking is not None and thinking.max_thinking_tokens == 0:
        draft[0] = thinking.end_think_token_id

    group = torch.arange(B + 1, device=dev)
    out: list[int] = []
    over = False
    while not over:
        clean = cache.length
        ids = torch.full((B, B + 1), mask_id, dtype=torch.long, device=dev)
        ids[:, 0] = torch.tensor(draft, device=dev)
        positions = (clean + torch.arange(B, device=dev)[:, None] + group[None, :]).flatten()
        logits = model(ids.view(1, -1), mask=quadratic_step_mask(B, clean, dev), cache=cache, positions=positions)
        stats.forward_passes += 1
        logits = logits.view(B, B + 1, -1).clone()
        if ar_mix_weight is None:
            logits[:, 1] = logits[:, 0]
        else:
            mixed = ar_mix_weight * logits[:, 0] + (1 - ar_mix_weight) * logits[:, 1]
            logits[:, 0] = mixed
            logits[:, 1] = mixed
        # Slot k of group j predicts the token at position clean + j + k (slot 0: the causal next token).
        pred_pos = positions.view(B, B + 1) + (group == 0).long()
        verified = choose(logits[:, 0], pred_pos[:, 0], sampling).tolist()
        limit = B
        if thinking is not None:
            # verified[k - 1] is the token at generated index len(out) + k; force it at the budget, as AR does.
            k = thinking.max_thinking_tokens - len(out)
            if 1 <= k <= B and thinking.end_think_token_id not in out + draft[:1] + verified[: k - 1]:
                verified[k - 1] = thinking.end_think_token_id
                limit = k
        accepted = 1
        while accepted < limit and verified[accepted - 1] == draft[accepted]:
            accepted += 1
        committed = draft[:accepted]
        cache.commit_slots([j * (B + 1) for j in range(accepted)])
        stats.acceptance.append(accepted)
        j = accepted - 1
        tail = choose(logits[j, 2:], pred_pos[j, 2:], sampling, step=DRAFT_STEP_KEY)
        draft = [verified[j]] + tail.tolist()

        before = len(out)
        out, over = stop.finish(out + committed)
        yield Committed([out[before:]], stats)

    stats.generated_tokens = len(out)
    return DecodeOutput([out], stats)
