"""What a decoding mode states about itself: `ModeSpec`, declared as `SPEC` next to each step machine
(decode/ar.py, diffusion.py, linear_spec.py, quadratic_spec.py, auto.py, edit.py) and collected by
`trimode.decode.modes`, which every other module asks. Also the checks the modes' knob classes share.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass(frozen=True)
class ModelDefaults:
    """What a model contributes to knob defaults."""

    block_size: int = 32
    has_drafter: bool = False
    sampler: object = field(default=None, repr=False, compare=False)  # the learned unmasking sampler, if any


def check_block(name: str, block_length: int, least: int) -> None:
    if isinstance(block_length, bool) or not isinstance(block_length, int):
        raise ValueError(f"block_length must be an integer, got {block_length!r}")
    if block_length < least:
        raise ValueError(f"block_length {block_length} is too small for {name} (at least {least})")


def check_threshold(threshold) -> None:
    if threshold is not None and (isinstance(threshold, bool) or not isinstance(threshold, int | float)
                                  or not 0 <= threshold <= 1):
        raise ValueError(f"threshold must be in [0, 1], got {threshold!r}")


def check_bool(name: str, value) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be true or false, got {value!r}")


def check_drafter(use_drafter, defaults: ModelDefaults) -> None:
    check_bool("use_drafter", use_drafter)
    if use_drafter and not defaults.has_drafter:
        raise ValueError("use_drafter=True but this model has no linear_spec_lora adapter loaded")


@dataclass(frozen=True)
class ModeSpec:
    """A mode's facts. Sizes are per request row; `block` is the block length the mode runs with (1 without a
    block_length knob)."""

    name: str
    summary: str
    knobs: type  # frozen dataclass of the mode's knobs with `check(defaults)`
    # (prompt_ids, stop, sampling, mask_id, knobs, thinking, provisional, steer, block, grammar=None) -> Machine
    build: Callable
    lossless: bool  # the output is AR's output (greedy, and sampled with the same seed)
    kv_scratch: Callable[[int, int], int]  # (max_new_tokens, block) -> KV slots past the prompt at most
    pass_tokens: Callable[[int], int] | None  # block -> tokens of one cycle's widest pass (None: the whole edit)
    forwards_per_cycle: Callable[[int], int] | None  # denoising steps -> forwards of one cycle (None: it varies)
    init_tokens: Callable[[int, int], int] | None = None  # (prompt_len, block) -> a non-causal first pass
    least_block: int | None = None  # the shortest block_length (None: no block)
    try_rank: int | None = None  # cold-start try order of the serving priorities (widest passes first)
    batch_rows: bool = False  # decodes several prompt rows of one length together (batch-1 driver only)
    engine_only: bool = False  # needs the engine (auto steers by load)
    editing: bool = False  # rewrites a given block (`TriMode.infill` / `revise` / `fill`), does not append
    constrained: bool = True  # can write under a grammar (structured output, decode/grammar.py)
    knob_names: tuple[str, ...] = field(init=False)

    def __post_init__(self) -> None:
        # A field marked metadata={"knob": False} is filled from the model (the sampler), never given by name.
        object.__setattr__(self, "knob_names", tuple(f.name for f in dataclasses.fields(self.knobs)
                                                     if f.metadata.get("knob", True)))

    def machine(self, prompt_ids, stop, sampling, mask_id, knobs, thinking=None, provisional=False, steer=None,
                block=None, grammar=None):
        """The step machine; `grammar` (decode/grammar.py: a matcher, or one per row) constrains what it writes
        (a mode without `constrained` refuses one)."""
        if grammar is None:
            return self.build(prompt_ids, stop, sampling, mask_id, knobs, thinking, provisional, steer, block)
        if not self.constrained:
            raise ValueError(f"mode {self.name} cannot write under a grammar (structured output)")
        return self.build(prompt_ids, stop, sampling, mask_id, knobs, thinking, provisional, steer, block, grammar)

    def kv_slots(self, prompt_len: int, max_new_tokens: int, knobs) -> int:
        """The most KV cache slots a request uses: committed tokens plus the widest pass's scratch."""
        return prompt_len + self.kv_scratch(max_new_tokens, getattr(knobs, "block_length", 1))

    def widest_pass(self, prompt_len: int, knobs) -> int:
        """Tokens in the widest single pass (besides a causal prompt pass, which the engine runs in chunks)."""
        b = getattr(knobs, "block_length", 1)
        if self.pass_tokens is None:
            return prompt_len  # the block is at most the budget; see peak_activation_bytes
        init = 0 if self.init_tokens is None else self.init_tokens(prompt_len, b)  # not causal: one piece
        return max(self.pass_tokens(b), init)

    def peak_activation_bytes(self, config, prompt_len: int, max_new_tokens: int, knobs, dtype_bytes: int = 4,
                              prefill_chunk: int = 512) -> int:
        """Upper estimate of the activation memory of the request's widest pass (one row): the attention scores
        and mask over the whole context (float32, as the math kernel keeps them), the MLP activations and the
        logits. The KV cache is not included (the pool holds it)."""
        t = max(self.widest_pass(prompt_len, knobs), min(prompt_len, prefill_chunk))
        if self.pass_tokens is None:  # an edit's pass is its whole block
            t = max(min(prompt_len, prefill_chunk), max_new_tokens)
        keys = self.kv_slots(prompt_len, max_new_tokens, knobs)
        heads, hidden = config.num_attention_heads, config.hidden_size
        scores = 3 * heads * t * keys * 4 + t * keys  # scores, softmax and its copy in float32; the boolean mask
        mlp = t * (3 * config.intermediate_size + 4 * hidden) * dtype_bytes
        logits = t * config.vocab_size * 4
        return scores + mlp + logits
