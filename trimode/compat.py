"""Drop-in adapter with the NLD reference implementation's method names, signatures and nfe counting.

`NLDReference(model)` exposes `ar_generate`, `generate` (block diffusion), `linear_spec_generate` and
`self_spec_generate` (quadratic), each returning `(output_ids including the prompt, nfe)`, so scripts written
against the reference run unchanged. Differences, on purpose: outputs never exceed `max_new_tokens` (the
reference's linear spec can overshoot), and `temperature > 0` samples with this project's keyed sampler.
`model` is what `trimode.load` returns (or a bare `NLDTransformer`).
"""

from __future__ import annotations

import torch

from trimode.decode.driver import decode, drive, run
from trimode.decode.linear_spec import linear_spec
from trimode.decode.sampling import SamplingParams
from trimode.decode.step import DecodeOutput
from trimode.decode.stopping import StopRule, ThinkingBudget


class NLDReference:
    def __init__(self, model) -> None:
        self.net = getattr(model, "net", model)
        self.config = self.net.config

    def _stop(self, max_new_tokens: int, eos_token_id: int | None) -> StopRule:
        eos = self.config.eos_token_id if eos_token_id is None else eos_token_id
        return StopRule(max_new_tokens, frozenset([eos]) if eos >= 0 else frozenset())

    @staticmethod
    def _thinking(max_thinking_tokens, end_think_token_id) -> ThinkingBudget | None:
        if max_thinking_tokens is None or end_think_token_id is None:
            return None
        return ThinkingBudget(max_thinking_tokens, end_think_token_id)

    def _ids(self, prompt_ids) -> torch.Tensor:
        ids = torch.as_tensor(prompt_ids, dtype=torch.long, device=self.net.device)
        return ids[None] if ids.dim() == 1 else ids

    @staticmethod
    def _join(prompt: torch.Tensor, out: DecodeOutput) -> torch.Tensor:
        width = max(len(t) for t in out.tokens)
        rows = [t + [t[-1] if t else 0] * (width - len(t)) for t in out.tokens]
        return torch.cat([prompt, torch.tensor(rows, dtype=torch.long, device=prompt.device)], 1)

    def ar_generate(self, prompt_ids, max_new_tokens=128, temperature=0.0, eos_token_id=None,
                    max_thinking_tokens=None, end_think_token_id=None):
        ids = self._ids(prompt_ids)
        out = drive(decode(self.net, "ar", ids, self._stop(max_new_tokens, eos_token_id), SamplingParams(temperature),
                           self._thinking(max_thinking_tokens, end_think_token_id)))
        return self._join(ids, out), out.stats.forward_passes

    def generate(self, prompt_ids, max_new_tokens=128, block_length=32, threshold=None, causal_context=True,
                 temperature=0.0, eos_token_id=None, max_thinking_tokens=None, end_think_token_id=None, **_):
        assert max_new_tokens % block_length == 0, "max_new_tokens must be a multiple of block_length"
        ids = self._ids(prompt_ids)
        out = drive(decode(
            self.net, "diffusion", ids, self._stop(max_new_tokens, eos_token_id), SamplingParams(temperature),
            self._thinking(max_thinking_tokens, end_think_token_id), block_length=block_length,
            threshold=threshold, causal_context=causal_context,
            steps=block_length if threshold is None else None))  # the reference's fixed schedule: B steps
        # The reference does not count the prefill in nfe, and runs (and counts) a cache refresh after the last
        # block, whose seed nobody reads; trimode skips that pass.
        return self._join(ids, out), out.stats.forward_passes - out.stats.prefill_passes + 1

    def linear_spec_generate(self, prompt_ids, max_new_tokens=128, block_length=32, temperature=0.0,
                             mask_token_id=None, eos_token_id=None, max_thinking_tokens=None,
                             end_think_token_id=None, threshold=0.0):
        ids = self._ids(prompt_ids)
        has_adapter = self.net.encoder.layers[0].self_attn.o_proj.lora_A is not None
        stop = self._stop(max_new_tokens, eos_token_id)
        machine = linear_spec(ids, stop, SamplingParams(temperature), self.config.mask_token_id, block_length,
                              threshold, has_adapter, self._thinking(max_thinking_tokens, end_think_token_id),
                              thinking_as_reference=True)
        out = drive(run(self.net, machine, ids.shape[1] + max_new_tokens + block_length))
        return self._join(ids, out), out.stats.forward_passes

    def self_spec_generate(self, prompt_ids, max_new_tokens=128, steps=128, block_length=32, ar_mix_weight=None,
                           temperature=0.0, eos_token_id=None, **_):
        if max_new_tokens % block_length or steps % (max_new_tokens // block_length):
            raise ValueError("max_new_tokens must be a multiple of block_length and steps of the block count")
        ids = self._ids(prompt_ids)
        out = drive(decode(self.net, "quadratic_spec", ids, self._stop(max_new_tokens, eos_token_id), SamplingParams(),
                           block_length=block_length, ar_mix_weight=ar_mix_weight))
        return self._join(ids, out), out.stats.forward_passes
