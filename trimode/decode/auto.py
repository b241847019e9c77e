"""`mode: auto` as a step machine: every cycle runs AR, linear or quadratic self-speculation, whichever a steering
policy picks now (the engine's `AutoPolicy` picks by load; see trimode/engine/auto.py).

All three are lossless: a token is only emitted when it is the token AR would choose at that position (greedy,
or sampled with the same keyed noise), so switching between them from one cycle to the next never changes the
output. A *choice* is a mode and the block length of its cycle. The state all cycles share: the cache holds
every token but the last emitted one (`pending`), plus optional draft guesses `tail` for the tokens after it
(left by a quadratic pass). One cycle is
- ar:             1 forward of 1 token: the causal next token;
- linear_spec:    2 forwards of B tokens: draft [pending, MASK x B-1] (adapter on), verify causally, accept;
- quadratic_spec: 1 forward of B(B+1) tokens: B groups [leader_j, MASK x B], leaders = pending + tail (drafted
                  by a linear_spec draft pass first when there are fewer than B - 1 guesses); accept the leaders
                  that match the causal predictions, and the masks of the last accepted group become the tail.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from trimode.decode.cycles import (
    accepted_length,
    draft_block,
    histories,
    quadratic_init,
    quadratic_pass,
    verify_block,
    verify_constrained,
)
from trimode.decode.decide import History, Pick, logprobs_of
from trimode.decode.grammar import GrammarMatcher
from trimode.decode.sampling import SamplingParams
from trimode.decode.spec import ModeSpec, check_block, check_drafter
from trimode.decode.stats import DecodeStats
from trimode.decode.step import Commit, Committed, DecodeOutput, Forward, Machine
from trimode.decode.stopping import StopRule, ThinkingBudget

Choice = tuple[str, int]  # (mode, block length of its cycle); AR's block is 1
AR: Choice = ("ar", 1)


class Steer(Protocol):
    """What auto asks before each cycle, and tells after it."""

    def pick(self) -> Choice: ...

    def observe(self, choice: Choice, tokens: int) -> None: ...


class FixedChoice:
    """A steer that always picks one choice (for timing a choice, and for tests)."""

    def __init__(self, choice: Choice) -> None:
        self.choice = choice

    def pick(self) -> Choice:
        return self.choice

    def observe(self, choice: Choice, tokens: int) -> None:
        pass


def auto(prompt_ids: torch.Tensor, stop: StopRule, sampling: SamplingParams, mask_id: int, steer: Steer,
         block_length: int = 32, use_drafter: bool = False, thinking: ThinkingBudget | None = None,
         grammar: GrammarMatcher | None = None) -> Machine:
    """`grammar`: every emitted token is chosen under it as AR would choose it, whichever mode a cycle runs."""
    if prompt_ids.shape[0] != 1:
        raise ValueError("auto decodes one sequence at a time (batch size 1)")
    dev, B = prompt_ids.device, block_length
    prompt_len = prompt_ids.shape[1]
    stats = DecodeStats("auto", prompt_tokens=prompt_len)

    eos = stop.eos_token_ids
    prompt = prompt_ids[0].tolist()
    tail: list[int] = []  # guesses for the tokens after `pending`
    mode, b = steer.pick()
    if mode == "quadratic_spec":  # the prefill also drafts, as quadratic_spec's first pass does
        (pending, *tail), decision = yield from quadratic_init(prompt_ids, b, mask_id, sampling, stats, eos, grammar)
    else:
        pick = Pick(sampling, [prompt_len], histories=histories(sampling, History(prompt, [])), eos=eos,
                    logprobs=sampling.logprobs, masks=None if grammar is None else grammar.allowed()[None])
        decision = yield Forward(prompt_ids, mask="causal", cache="append", logits="last", pick=pick)
        stats.forward_passes += 1
        pending = int(decision.tokens[0])
    if thinking is not None and thinking.max_thinking_tokens == 0:
        pending = thinking.end_think_token_id
    if grammar is not None:
        grammar.advance(pending)
    out, over = stop.finish([pending])
    yield Committed([out], stats, logprobs_of(decision, [[0]]))

    clean = prompt_len  # the position of `pending`: the cache holds everything before it
    while not over:
        choice = steer.pick()
        budget_near = (thinking is not None and thinking.end_think_token_id not in out
                       and len(out) + B >= thinking.max_thinking_tokens)
        if budget_near:
            choice = AR  # AR steps place the forced end-think token exactly where AR would
        mode, b = choice
        history = History(prompt, out)  # out ends with `pending`
        if mode == "ar":
            pick = Pick(sampling, [clean + 1], histories=histories(sampling, history), eos=eos,
                        logprobs=sampling.logprobs, masks=None if grammar is None else grammar.allowed()[None])
            decision = yield Forward(torch.tensor([[pending]], device=dev), mask="causal", cache="append",
                                     logits="last", pick=pick)
            stats.forward_passes += 1
            emitted, at = [int(decision.tokens[0])], [0]
            if budget_near and len(out) >= thinking.max_thinking_tokens:
                emitted = [thinking.end_think_token_id]
            if grammar is not None:
                grammar.advance(emitted[0])
            tail = []
        elif mode == "linear_spec":
            drafts = yield from draft_block(pending, clean, b, mask_id, sampling, stats, 0.0, use_drafter, dev,
                                            grammar=grammar, history=history, eos=eos)
            verified, decision = yield from verify_block(drafts, clean, sampling, stats, dev, history, eos, grammar)
            accepted = accepted_length(verified, drafts, b) if grammar is None else len(verified)
            yield Commit(accepted)
            emitted, at = verified[:accepted], list(range(accepted))
            tail = []
        else:
            if len(tail) < b - 1:  # too few guesses (from another mode or a smaller block): draft them first
                tail = (yield from draft_block(pending, clean, b, mask_id, sampling, stats, 0.0, use_drafter,
                                               dev, grammar=grammar, history=history, eos=eos))[1:]
            leaders = [pending] + tail[: b - 1]
            result = yield from quadratic_pass(leaders, clean, mask_id, sampling, stats, device=dev,
                                               history=history, eos=eos, grammar=grammar)
            verified = result.verified
            if grammar is not None:
                verified = verify_constrained(verified, leaders, grammar, b)
            accepted = accepted_length(verified, leaders, b) if grammar is None else len(verified)
            yield Commit(slots=[j * (b + 1) for j in range(accepted)])
            tail = result.tail(accepted - 1, grammar)
            emitted, at, decision = verified[:accepted], [j * (b + 1) for j in range(accepted)], result.decision
        clean += len(emitted)
        pending = emitted[-1]
        before = len(out)
        out, over = stop.extend(out, emitted)
        # The policy learns what a cycle delivers: accepted tokens past EOS or max_new_tokens are not output (a
        # model that predicts EOS again and again would otherwise look like a perfect drafter).
        steer.observe(choice, len(out) - before)
        if mode != "ar":
            stats.acceptance.append(len(out) - before)
        stats.generated_tokens = len(out)
        logprobs = logprobs_of(decision, [at[: len(out) - before]])
        yield Committed([out[before:]], stats, logprobs)

    stats.generated_tokens = len(out)
    return DecodeOutput([out], stats)


@dataclass(frozen=True)
class AutoKnobs:
    block_length: int = 0
    use_drafter: bool | None = None

    def check(self, defaults) -> None:
        check_block("auto", self.block_length, 2)
        check_drafter(self.use_drafter, defaults)


def _build(ids, stop, sampling, mask_id, k, thinking, provisional, steer, block, grammar=None):
    if steer is None:
        raise ValueError("mode auto chooses by the engine's load: run it through the engine (trimode serve)")
    return auto(ids, stop, sampling, mask_id, steer, k.block_length, k.use_drafter, thinking, grammar)


SPEC = ModeSpec("auto", "per cycle AR, linear or quadratic speculation, whichever the load favours", AutoKnobs,
                _build, lossless=True, kv_scratch=lambda max_new, b: max_new + max(b * (b + 1), b),
                pass_tokens=lambda b: b * (b + 1), forwards_per_cycle=None,  # that of the cycle's choice
                init_tokens=lambda prompt_len, b: prompt_len + b, least_block=2, try_rank=3, engine_only=True)
