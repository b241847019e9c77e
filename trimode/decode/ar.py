"""AR decoding (spec 2.1): causal prefill, then one token per forward pass over the KV cache.

Batch rows share the prompt length. The forward pass that yields token 1 is the prefill, and no forward is run
after the last token, so forward_passes == generated tokens (the reference's nfe).
"""

from __future__ import annotations

import torch

from trimode.decode.sampling import SamplingParams, choose
from trimode.decode.stats import Committed, DecodeOutput, DecodeStats, DecodeStream
from trimode.decode.stopping import StopRule, ThinkingBudget
from trimode.model.transformer import NLDTransformer


@torch.no_grad()
def ar_decode(
    model: NLDTransformer,
    prompt_ids: torch.Tensor,
    stop: StopRule,
    sampling: SamplingParams = SamplingParams(),
    thinking: ThinkingBudget | None = None,
) -> DecodeStream:
    batch, prompt_len = prompt_ids.shape
    stats = DecodeStats("ar", prompt_tokens=prompt_len)
    cache = model.new_cache(batch, prompt_len + stop.max_new_tokens)
    rows = torch.arange(batch)

    logits = model(prompt_ids, mask="causal", cache=cache)[:, -1]
    cache.commit(prompt_len)
    stats.forward_passes += 1

    out: list[list[int]] = [[] for _ in range(batch)]
    done = [False] * batch
    thought = [False] * batch
    for step in range(stop.max_new_tokens):
        pos = torch.full((batch,), prompt_len + step)
        tokens = choose(logits, pos, sampling, rows=rows)
        if thinking is not None and step >= thinking.max_thinking_tokens:
            for r in range(batch):
                if not thought[r]:
                    tokens[r] = thinking.end_think_token_id
        new: list[list[int]] = [[] for _ in range(batch)]
        for r, t in enumerate(tokens.tolist()):
            if thinking is not None and t == thinking.end_think_token_id:
                thought[r] = True
            if not done[r]:
                out[r].append(t)
                new[r].append(t)
                done[r] = t in stop.eos_token_ids
        stats.generated_tokens = len(out[0])
        yield Committed(new, stats)
        if all(done) or step == stop.max_new_tokens - 1:
            break
        logits = model(tokens[:, None], mask="causal", cache=cache)[:, -1]
        cache.commit(1)
        stats.forward_passes += 1

    stats.generated_tokens = sum(len(o) for o in out)
    return DecodeOutput(out, stats)
