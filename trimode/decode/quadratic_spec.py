"""Quadratic self-speculation (spec 2.4), one sequence.

Init (1 pass): `[prompt, MASK x B]`, prompt causal, masks see everything; draft d_0 = causal choice after
the prompt, d_1.. = diffusion choices at mask slots 1..B-1. The cache keeps the prompt.
Each pass (`cycles.quadratic_pass`): B groups `[d_j, MASK x B]`, group j at positions clean+j .. clean+j+B.
Accept c = 1 + leading j with pred[j, 0] == d[j+1]; commit d[:c] (the cache keeps the leaders' K/V, which are
causal); next draft = [pred[c-1, 0]] + the masks' drafts of group c-1.
Verified tokens are chosen by absolute position like AR, so without mixing the output equals AR output
(greedy, and sampling with the same seed).

Positions: the reference computes the Llama-4 query scale of a quadratic pass from a flattened index
(clean + arange(B(B+1))); we use the true positions of each token for RoPE and query scale alike. The two
agree wherever the scale is 1 (positions below `original_max_position_embeddings`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from trimode.decode.cycles import (
    accepted_length,
    force_end_think,
    quadratic_init,
    quadratic_pass,
    think_forced_at,
    verify_constrained,
)
from trimode.decode.decide import History, logprobs_of
from trimode.decode.grammar import GrammarMatcher
from trimode.decode.sampling import SamplingParams
from trimode.decode.spec import ModeSpec, check_block
from trimode.decode.stats import DecodeStats
from trimode.decode.step import Commit, Committed, DecodeOutput, Machine
from trimode.decode.stopping import StopRule, ThinkingBudget


def quadratic_spec(prompt_ids: torch.Tensor, stop: StopRule, sampling: SamplingParams, mask_id: int,
                   block_length: int = 32, ar_mix_weight: float | None = None,
                   thinking: ThinkingBudget | None = None, grammar: GrammarMatcher | None = None) -> Machine:
    """`grammar`: every verified leader is chosen under the grammar as AR would choose it, the masks' drafts under
    it too, and the grammar advances by the accepted tokens only (decode/grammar.py)."""
    if prompt_ids.shape[0] != 1:
        raise ValueError("quadratic_spec decodes one sequence at a time (batch size 1)")
    if block_length < 2:
        raise ValueError("quadratic_spec needs block_length >= 2")
    dev, B = prompt_ids.device, block_length
    prompt_len = prompt_ids.shape[1]
    stats = DecodeStats("quadratic_spec", prompt_tokens=prompt_len)

    eos = stop.eos_token_ids
    draft, decision = yield from quadratic_init(prompt_ids, B, mask_id, sampling, stats, eos, grammar)
    if thinking is not None and thinking.max_thinking_tokens == 0:
        draft[0] = thinking.end_think_token_id
    if grammar is not None:
        grammar.advance(draft[0])
    lead = logprobs_of(decision, [[0]])  # the log-probability of draft[0], from the pass that verified it

    prompt = prompt_ids[0].tolist()
    out: list[int] = []
    over = False
    clean = prompt_len  # the position of draft[0]: the cache holds everything before it
    while not over:
        result = yield from quadratic_pass(draft, clean, mask_id, sampling, stats, ar_mix_weight, dev,
                                           History(prompt, out + draft[:1]), eos, grammar)
        if grammar is None:
            verified = result.verified
            limit = force_end_think(verified, out + draft[:1], len(out) + 1, thinking, B)
            accepted = accepted_length(verified, draft, limit)
        else:
            forced = think_forced_at(out + draft[:1], len(out) + 1, thinking, B)
            verified = verify_constrained(result.verified, draft, grammar, B, forced)
            accepted = len(verified)
        yield Commit(slots=[j * (B + 1) for j in range(accepted)])
        committed = draft[:accepted]
        clean += accepted
        draft = [verified[accepted - 1]] + result.tail(accepted - 1, grammar)
        # committed[0] was verified by the pass before; committed[i] by this pass's group i - 1.
        width = B + 1
        logprobs = None if lead is None else [lead[0] + logprobs_of(result.decision, [
            [j * width for j in range(accepted - 1)]])[0]]
        lead = logprobs_of(result.decision, [[(accepted - 1) * width]])

        before = len(out)
        out, over = stop.extend(out, committed)
        stats.acceptance.append(len(out) - before)  # what the cycle output: nothing past EOS or the budget
        yield Committed([out[before:]], stats, None if logprobs is None else [logprobs[0][: len(out) - before]])

    stats.generated_tokens = len(out)
    return DecodeOutput([out], stats)


@dataclass(frozen=True)
class QuadraticSpecKnobs:
    block_length: int = 0
    ar_mix_weight: float | None = None  # None: lossless; l mixes l * causal + (1 - l) * diffusion logits

    def check(self, defaults) -> None:
        check_block("quadratic_spec", self.block_length, 2)
        w = self.ar_mix_weight
        if w is not None and (isinstance(w, bool) or not isinstance(w, int | float) or not 0 <= w <= 1):
            raise ValueError(f"ar_mix_weight must be in [0, 1], got {w!r}")


def _build(ids, stop, sampling, mask_id, k, thinking, provisional, steer, block, grammar=None):
    return quadratic_spec(ids, stop, sampling, mask_id, k.block_length, k.ar_mix_weight, thinking, grammar)


SPEC = ModeSpec("quadratic_spec", "B(B+1)-token pass that verifies and redrafts at once", QuadraticSpecKnobs, _build,
                lossless=True, kv_scratch=lambda max_new, b: max_new + max(b * (b + 1), b),
                pass_tokens=lambda b: b * (b + 1), forwards_per_cycle=lambda steps: 1,
                init_tokens=lambda prompt_len, b: prompt_len + b, least_block=2, try_rank=1)
