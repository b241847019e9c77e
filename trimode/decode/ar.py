"""AR decoding (spec 2.1): causal prefill, then one token per forward pass over the KV cache.

Batch rows share the prompt length. The forward pass that yields token 1 is the prefill, and no forward is run
after the last token, so forward_passes == generated tokens (the reference's nfe).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from trimode.decode.decide import History, Pick, logprobs_of
from trimode.decode.grammar import GrammarMatcher
from trimode.decode.sampling import SamplingParams
from trimode.decode.spec import ModeSpec
from trimode.decode.stats import DecodeStats
from trimode.decode.step import Committed, DecodeOutput, Forward, Machine
from trimode.decode.stopping import StopRule, ThinkingBudget


def ar(prompt_ids: torch.Tensor, stop: StopRule, sampling: SamplingParams = SamplingParams(),
       thinking: ThinkingBudget | None = None, grammar: list[GrammarMatcher] | GrammarMatcher | None = None
       ) -> Machine:
    """`grammar`: one matcher per row (or one for a single row); each step chooses among the tokens its grammar
    allows (decode/grammar.py): its masks travel in the pick, one more logit processor of the decision stage."""
    grammars = [grammar] if isinstance(grammar, GrammarMatcher) else grammar
    batch, prompt_len = prompt_ids.shape
    stats = DecodeStats("ar", prompt_tokens=prompt_len)
    out: list[list[int]] = [[] for _ in range(batch)]
    prompts = prompt_ids.tolist()
    rows = list(range(batch))

    def pick(step: int) -> Pick:  # the token at position prompt_len + step of every row, keyed by its row
        histories = [History(prompts[r], out[r]) for r in range(batch)] if sampling.penalized else None
        masks = None if grammars is None else torch.stack([g.allowed() for g in grammars])
        return Pick(sampling, [prompt_len + step] * batch, rows=rows, histories=histories,
                    eos=stop.eos_token_ids, logprobs=sampling.logprobs, masks=masks)

    decision = yield Forward(prompt_ids, mask="causal", cache="append", logits="last", pick=pick(0),
                             host_ids=prompts[0])
    stats.forward_passes += 1

    done = [False] * batch
    thought = [False] * batch
    for step in range(stop.max_new_tokens):
        tokens = list(decision.token_ids)
        if thinking is not None and step >= thinking.max_thinking_tokens and not all(thought):
            for r in range(batch):
                if not thought[r]:
                    tokens[r] = thinking.end_think_token_id
        # The next pass's input: one row's token as a host list (the engine batches them), several rows' as a tensor.
        ids = None if batch == 1 else torch.tensor(tokens)[:, None]
        new: list[list[int]] = [[] for _ in range(batch)]
        for r, t in enumerate(tokens):
            if thinking is not None and t == thinking.end_think_token_id:
                thought[r] = True
            if not done[r]:
                if grammars is not None:
                    grammars[r].advance(t)
                out[r].append(t)
                new[r].append(t)
                done[r] = t in stop.eos_token_ids
        stats.generated_tokens = len(out[0])
        logprobs = None if decision.logprobs is None else logprobs_of(decision, [[r] if new[r] else [] for r in rows])
        yield Committed(new, stats, logprobs)
        if all(done) or step == stop.max_new_tokens - 1:
            break
        decision = yield Forward(ids, mask="causal", cache="append", logits="last", pick=pick(step + 1),
                                 host_ids=tokens[:1])
        stats.forward_passes += 1

    stats.generated_tokens = sum(len(o) for o in out)
    return DecodeOutput(out, stats)


@dataclass(frozen=True)
class ARKnobs:
    def check(self, defaults) -> None:
        pass


def _build(ids, stop, sampling, mask_id, k, thinking, provisional, steer, block, grammar=None):
    return ar(ids, stop, sampling, thinking, grammar)


SPEC = ModeSpec("ar", "causal prefill, one token per forward", ARKnobs, _build, lossless=True,
                kv_scratch=lambda max_new, b: max_new, pass_tokens=lambda b: 1, forwards_per_cycle=lambda steps: 1,
                try_rank=4, batch_rows=True)
