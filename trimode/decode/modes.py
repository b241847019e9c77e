"""The one registry of decoding modes: name -> step machine, knobs (defaults, validation), KV slots, peak memory.

The API, CLI, engine, server, policy and benchmarks read this table; no other list of modes or knobs exists.

    spec = MODES["linear_spec"]
    knobs = resolve_knobs("linear_spec", defaults, block_length=8)      # LinearSpecKnobs(block_length=8, ...)
    machine = spec.machine(prompt_ids, stop, sampling, mask_id, knobs, thinking=..., steer=...)

Knobs are per mode; the request-level settings every mode shares (max_new_tokens, sampling, stop strings, EOS,
the thinking budget) are not knobs. A knob of another mode is ignored (code that runs several modes with one
set of knobs, and a server layering its own and a route's defaults, need not sort them); a name that is no
mode's knob is an error. `GenerationResult.knobs` shows what ran.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass, field

from trimode.decode import ar as _ar
from trimode.decode import auto as _auto
from trimode.decode import diffusion as _diffusion
from trimode.decode import edit as _edit
from trimode.decode import linear_spec as _linear
from trimode.decode import quadratic_spec as _quadratic


@dataclass(frozen=True)
class ModelDefaults:
    """What a model contributes to knob defaults."""

    block_size: int = 32
    has_drafter: bool = False


def _check_block(name: str, block_length: int, least: int) -> None:
    if isinstance(block_length, bool) or not isinstance(block_length, int):
        raise ValueError(f"block_length must be an integer, got {block_length!r}")
    if block_length < least:
        raise ValueError(f"block_length {block_length} is too small for {name} (at least {least})")


def _check_threshold(threshold) -> None:
    if threshold is not None and (isinstance(threshold, bool) or not isinstance(threshold, int | float)
                                  or not 0 <= threshold <= 1):
        raise ValueError(f"threshold must be in [0, 1], got {threshold!r}")


def _check_bool(name: str, value) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be true or false, got {value!r}")


@dataclass(frozen=True)
class ARKnobs:
    def check(self, defaults: ModelDefaults) -> None:
        pass


@dataclass(frozen=True)
class DiffusionKnobs:
    block_length: int = 0  # 0: the model's block size
    threshold: float | None = 0.9  # None: the fixed-step schedule
    steps: int | None = None  # denoising passes per block with the fixed-step schedule (default block_length)
    causal_context: bool = True
    remask_threshold: float | None = None  # remask a committed token of the block whose confidence falls below

    def check(self, defaults: ModelDefaults) -> None:
        _check_block("diffusion", self.block_length, 1)
        _check_threshold(self.threshold)
        _check_threshold(self.remask_threshold)
        if self.remask_threshold is not None and self.threshold is None:
            raise ValueError("remask_threshold works with the threshold schedule, not with steps")
        _check_bool("causal_context", self.causal_context)
        if self.steps is not None and (isinstance(self.steps, bool) or not isinstance(self.steps, int)
                                       or self.steps < 1):
            raise ValueError(f"steps must be an integer >= 1, got {self.steps!r}")


@dataclass(frozen=True)
class LinearSpecKnobs:
    block_length: int = 0
    threshold: float = 0.0  # draft threshold: 0 fills every mask in one pass
    use_drafter: bool | None = None  # None: on when the model has a drafter adapter

    def check(self, defaults: ModelDefaults) -> None:
        _check_block("linear_spec", self.block_length, 2)
        _check_threshold(self.threshold)
        _check_bool("use_drafter", self.use_drafter)
        if self.use_drafter and not defaults.has_drafter:
            raise ValueError("use_drafter=True but this model has no linear_spec_lora adapter loaded")


@dataclass(frozen=True)
class QuadraticSpecKnobs:
    block_length: int = 0
    ar_mix_weight: float | None = None  # None: lossless; l mixes l * causal + (1 - l) * diffusion logits

    def check(self, defaults: ModelDefaults) -> None:
        _check_block("quadratic_spec", self.block_length, 2)
        w = self.ar_mix_weight
        if w is not None and (isinstance(w, bool) or not isinstance(w, int | float) or not 0 <= w <= 1):
            raise ValueError(f"ar_mix_weight must be in [0, 1], got {w!r}")


@dataclass(frozen=True)
class AutoKnobs:
    block_length: int = 0
    use_drafter: bool | None = None

    def check(self, defaults: ModelDefaults) -> None:
        _check_block("auto", self.block_length, 2)
        _check_bool("use_drafter", self.use_drafter)
        if self.use_drafter and not defaults.has_drafter:
            raise ValueError("use_drafter=True but this model has no linear_spec_lora adapter loaded")


@dataclass(frozen=True)
class EditKnobs:
    threshold: float = 0.9  # a pass commits the masked slots at least this confident (at least one)
    rounds: int = 1  # revision rounds after the holes are filled (1: fill only)
    revise_threshold: float = 0.9  # a revision remasks a slot whose other prediction is at least this confident
    hole_window: int = 6  # a hole starts this many slots long, doubling while filled to the end (0: all at once)

    def check(self, defaults: ModelDefaults) -> None:
        _check_threshold(self.threshold)
        _check_threshold(self.revise_threshold)
        if isinstance(self.rounds, bool) or not isinstance(self.rounds, int) or not 1 <= self.rounds <= 64:
            raise ValueError(f"rounds must be an integer in [1, 64], got {self.rounds!r}")
        if isinstance(self.hole_window, bool) or not isinstance(self.hole_window, int) or self.hole_window < 0:
            raise ValueError(f"hole_window must be an integer >= 0, got {self.hole_window!r}")


@dataclass(frozen=True)
class ModeSpec:
    name: str
    summary: str
    knobs: type
    build: Callable  # (prompt_ids, stop, sampling, mask_id, knobs, thinking, provisional, steer) -> Machine
    lossless: bool  # the output is AR's output (greedy, and sampled with the same seed)
    batch_rows: bool = False  # decodes several prompt rows of one length together (batch-1 driver only)
    engine_only: bool = False  # needs the engine (auto steers by load)
    editing: bool = False  # rewrites a given block (`TriMode.infill` / `revise` / `fill`), does not append
    knob_names: tuple[str, ...] = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "knob_names", tuple(f.name for f in dataclasses.fields(self.knobs)))

    def machine(self, prompt_ids, stop, sampling, mask_id, knobs, thinking=None, provisional=False, steer=None,
                block=None):
        if self.name == "edit":
            if block is None:
                raise ValueError("an edit needs its block (holes, or a draft to revise)")
            return _edit.edit(prompt_ids, block, sampling, mask_id, knobs.threshold, knobs.rounds,
                              knobs.revise_threshold, provisional, knobs.hole_window)
        return self.build(prompt_ids, stop, sampling, mask_id, knobs, thinking, provisional, steer)

    def kv_slots(self, prompt_len: int, max_new_tokens: int, knobs) -> int:
        """The most KV cache slots a request uses: committed tokens plus the widest pass's scratch."""
        b = getattr(knobs, "block_length", 1)
        if self.name in ("ar", "edit"):  # an edit's block is its max_new_tokens
            return prompt_len + max_new_tokens
        if self.name == "diffusion":
            return prompt_len + math.ceil(max_new_tokens / b) * b
        if self.name == "linear_spec":
            return prompt_len + max_new_tokens + b
        return prompt_len + max_new_tokens + max(b * (b + 1), b)  # quadratic_spec, auto

    def widest_pass(self, prompt_len: int, knobs) -> int:
        """Tokens in the widest single pass (besides a causal prompt pass, which the engine runs in chunks)."""
        b = getattr(knobs, "block_length", 1)
        if self.name == "edit":
            return prompt_len  # the block is at most the budget; see peak_activation_bytes
        if self.name in ("quadratic_spec", "auto"):
            return max(b * (b + 1), prompt_len + b)  # the init pass [prompt, MASK x B] is not causal: one piece
        return b

    def peak_activation_bytes(self, config, prompt_len: int, max_new_tokens: int, knobs, dtype_bytes: int = 4,
                              prefill_chunk: int = 512) -> int:
        """Upper estimate of the activation memory of the request's widest pass (one row): the attention scores
        and mask over the whole context (float32, as the math kernel keeps them), the MLP activations and the
        logits. The KV cache is not included (the pool holds it)."""
        t = max(self.widest_pass(prompt_len, knobs), min(prompt_len, prefill_chunk))
        if self.name == "edit":
            t = max(min(prompt_len, prefill_chunk), max_new_tokens)
        keys = self.kv_slots(prompt_len, max_new_tokens, knobs)
        heads, hidden = config.num_attention_heads, config.hidden_size
        scores = 3 * heads * t * keys * 4 + t * keys  # scores, softmax and its copy in float32; the boolean mask
        mlp = t * (3 * config.intermediate_size + 4 * hidden) * dtype_bytes
        logits = t * config.vocab_size * 4
        return scores + mlp + logits


def _build_ar(ids, stop, sampling, mask_id, k, thinking, provisional, steer):
    return _ar.ar(ids, stop, sampling, thinking)


def _build_diffusion(ids, stop, sampling, mask_id, k, thinking, provisional, steer):
    return _diffusion.diffusion(ids, stop, sampling, mask_id, k.block_length, k.threshold, k.causal_context,
                                k.steps, thinking, provisional, k.remask_threshold)


def _build_linear(ids, stop, sampling, mask_id, k, thinking, provisional, steer):
    return _linear.linear_spec(ids, stop, sampling, mask_id, k.block_length, k.threshold, k.use_drafter, thinking)


def _build_quadratic(ids, stop, sampling, mask_id, k, thinking, provisional, steer):
    return _quadratic.quadratic_spec(ids, stop, sampling, mask_id, k.block_length, k.ar_mix_weight, thinking)


def _build_auto(ids, stop, sampling, mask_id, k, thinking, provisional, steer):
    if steer is None:
        raise ValueError("mode auto chooses by the engine's load: run it through the engine (trimode serve)")
    return _auto.auto(ids, stop, sampling, mask_id, steer, k.block_length, k.use_drafter, thinking)


MODES: dict[str, ModeSpec] = {
    spec.name: spec
    for spec in (
        ModeSpec("ar", "causal prefill, one token per forward", ARKnobs, _build_ar, lossless=True, batch_rows=True),
        ModeSpec("diffusion", "block diffusion, seed token + post-block cache refresh", DiffusionKnobs,
                 _build_diffusion, lossless=False, batch_rows=True),
        ModeSpec("linear_spec", "diffusion draft (LoRA drafter) + causal verify, longest agreeing prefix + bonus",
                 LinearSpecKnobs, _build_linear, lossless=True),
        ModeSpec("quadratic_spec", "B(B+1)-token pass that verifies and redrafts at once", QuadraticSpecKnobs,
                 _build_quadratic, lossless=True),
        ModeSpec("auto", "per cycle AR, linear or quadratic speculation, whichever the load favours", AutoKnobs,
                 _build_auto, lossless=True, engine_only=True),
        ModeSpec("edit", "fill holes and revise a draft in one bidirectional block (infill, revise, fill)",
                 EditKnobs, None, lossless=False, editing=True),
    )
}
KNOB_NAMES: tuple[str, ...] = tuple(dict.fromkeys(n for s in MODES.values() for n in s.knob_names))


def mode_spec(mode: str) -> ModeSpec:
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; choose one of {', '.join(MODES)}")
    return MODES[mode]


def resolve_knobs(mode: str, defaults: ModelDefaults, max_new_tokens: int | None = None, **given):
    """The validated knobs `mode` runs with: given values (None = unset), else defaults. Unknown names raise;
    knobs of other modes are ignored. With `max_new_tokens`, no block is longer than the request can use."""
    spec = mode_spec(mode)
    unknown = sorted(set(given) - set(KNOB_NAMES))
    if unknown:
        raise ValueError(f"unknown knob(s) {', '.join(unknown)}; known: {', '.join(KNOB_NAMES)}")
    values = {k: v for k, v in given.items() if v is not None and k in spec.knob_names}
    if "block_length" in spec.knob_names:
        block = values.get("block_length", defaults.block_size)
        least = 1 if mode == "diffusion" else 2
        if max_new_tokens is not None and isinstance(block, int) and not isinstance(block, bool) and block > least:
            block = max(least, min(block, max_new_tokens))  # a longer block only drafts or denoises unused slots
        values["block_length"] = block
    if mode == "diffusion" and values.get("steps") is not None:  # a step count selects the fixed-step schedule
        if given.get("threshold") is not None:
            raise ValueError("give either threshold or steps for diffusion, not both")
        values["threshold"] = None
    if "use_drafter" in spec.knob_names and values.get("use_drafter") is None:
        values["use_drafter"] = defaults.has_drafter
    knobs = spec.knobs(**values)
    knobs.check(defaults)
    return knobs
