"""Linear self-speculation (spec 2.3), one sequence.

Cycle: block = [next_token, MASK x (B-1)] at positions cache_len.. ;
1. draft: bidirectional over the read-only cache, drafter adapter on (if loaded and asked for); threshold 0
   fills every mask in one pass, threshold > 0 repeats passes committing masks with conf >= threshold (at
   least the best one per pass);
2. verify: causal pass of the drafted block, adapter off; ar[i] = choice at block position i, i.e. the token at
   position cache_len + i + 1;
3. accept: a = 1 + number of leading i with ar[i] == block[i + 1]; emit ar[:a]; keep the K/V of next_token and
   the accepted drafts (a tokens); next_token = ar[a - 1].
Verified tokens are chosen with `choose` keyed by absolute position, exactly as AR does, so the output equals
AR output for greedy decoding and for sampling with the same seed.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from trimode.decode.cycles import (
    accepted_length,
    draft_block,
    force_end_think,
    histories,
    think_forced_at,
    verify_block,
)
from trimode.decode.decide import History, Pick, logprobs_of
from trimode.decode.grammar import GrammarMatcher
from trimode.decode.sampling import SamplingParams
from trimode.decode.spec import ModeSpec, check_block, check_drafter, check_threshold
from trimode.decode.stats import DecodeStats
from trimode.decode.step import Commit, Committed, DecodeOutput, Forward, Machine
from trimode.decode.stopping import StopRule, ThinkingBudget
from trimode.decode.unmask import LEARNED_THRESHOLD, check_unmask, rule_for


def linear_spec(prompt_ids: torch.Tensor, stop: StopRule, sampling: SamplingParams, mask_id: int,
                block_length: int = 32, threshold: float = 0.0, use_drafter: bool = False,
                thinking: ThinkingBudget | None = None, thinking_as_reference: bool = False, rule=None,
                grammar: GrammarMatcher | None = None) -> Machine:
    """`thinking`: the token at generated index `max_thinking_tokens` is forced to the end-think id unless it
    appeared before, exactly as in AR. `thinking_as_reference=True` reproduces the reference instead: after
    each cycle past the budget, the end-think id replaces the next block's slot 0 in the context only.
    `rule`: the draft's unmasking rule (decode/unmask.py) instead of the threshold. `grammar`: every verified
    position is chosen under the grammar as AR would choose it (decode/grammar.py), the drafts under it too."""
    if prompt_ids.shape[0] != 1:
        raise ValueError("linear_spec decodes one sequence at a time (batch size 1)")
    if block_length < 2:
        raise ValueError("linear_spec needs block_length >= 2")
    dev = prompt_ids.device
    prompt_len = prompt_ids.shape[1]
    stats = DecodeStats("linear_spec", prompt_tokens=prompt_len)

    eos = stop.eos_token_ids
    history = History(prompt_ids[0].tolist(), [])
    pick = Pick(sampling, [prompt_len], histories=histories(sampling, history), eos=eos, logprobs=sampling.logprobs,
                masks=None if grammar is None else grammar.allowed()[None])
    decision = yield Forward(prompt_ids, mask="causal", cache="append", logits="last", pick=pick)
    stats.forward_passes += 1
    next_token = int(decision.tokens[0])
    if thinking is not None and not thinking_as_reference and thinking.max_thinking_tokens == 0:
        next_token = thinking.end_think_token_id
    if grammar is not None:
        if thinking_as_reference:
            raise ValueError("a grammar needs AR's thinking budget, not thinking_as_reference")
        grammar.advance(next_token)
    out, over = stop.finish([next_token])
    yield Committed([out], stats, logprobs_of(decision, [[0]]))

    start = prompt_len  # the position of next_token: the cache holds everything before it
    while not over:
        history = History(history.prompt, out)
        drafts = yield from draft_block(next_token, start, block_length, mask_id, sampling, stats, threshold,
                                        use_drafter, dev, rule, grammar, history, eos)
        forced = None if grammar is None else think_forced_at(out, len(out), thinking, block_length)
        ar, decision = yield from verify_block(drafts, start, sampling, stats, dev, history, eos, grammar, forced)
        if grammar is None:
            limit = block_length
            if not thinking_as_reference:
                limit = force_end_think(ar, out, len(out), thinking, limit)
            accepted = accepted_length(ar, drafts, limit)
        else:
            accepted = len(ar)
        yield Commit(accepted)
        start += accepted
        next_token = ar[accepted - 1]

        before = len(out)
        out, over = stop.extend(out, ar[:accepted])
        stats.acceptance.append(len(out) - before)  # what the cycle output: nothing past EOS or the budget
        yield Committed([out[before:]], stats, logprobs_of(decision, [list(range(len(out) - before))]))
        if thinking_as_reference and thinking is not None and len(out) > thinking.max_thinking_tokens:
            if thinking.end_think_token_id not in out:
                # As the reference: the end-think token enters the context as the next block's slot 0,
                # while the emitted text keeps the AR token it replaces, so this repeats every cycle.
                next_token = thinking.end_think_token_id

    stats.generated_tokens = len(out)
    return DecodeOutput([out], stats)


@dataclass(frozen=True)
class LinearSpecKnobs:
    block_length: int = 0
    threshold: float = 0.0  # draft threshold: 0 fills every mask in one pass
    use_drafter: bool | None = None  # None: on when the model has a drafter adapter
    unmask: str = "threshold"  # the draft's unmasking policy (decode/unmask.py): threshold or learned
    # unmask="learned": the model's sampler, filled in by resolve_knobs from the model (not a knob: no name)
    sampler: object = field(default=None, repr=False, compare=False, metadata={"knob": False})

    @staticmethod
    def settle(values: dict, given: dict) -> None:
        """unmask="learned" without a threshold uses the sampler's default probability threshold."""
        if values.get("unmask") == "learned" and given.get("threshold") is None:
            values["threshold"] = LEARNED_THRESHOLD

    def check(self, defaults) -> None:
        check_block("linear_spec", self.block_length, 2)
        check_threshold(self.threshold)
        check_drafter(self.use_drafter, defaults)
        check_unmask(self.unmask, ("threshold", "learned"), defaults)


def _build(ids, stop, sampling, mask_id, k, thinking, provisional, steer, block, grammar=None):
    return linear_spec(ids, stop, sampling, mask_id, k.block_length, k.threshold, k.use_drafter, thinking,
                       rule=rule_for(k.unmask, k.threshold, k.sampler), grammar=grammar)


SPEC = ModeSpec("linear_spec", "diffusion draft (LoRA drafter) + causal verify, longest agreeing prefix + bonus",
                LinearSpecKnobs, _build, lossless=True, kv_scratch=lambda max_new, b: max_new + b,
                pass_tokens=lambda b: b, forwards_per_cycle=lambda steps: 2,  # draft, verify
                least_block=2, try_rank=2)
