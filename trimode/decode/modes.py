"""The one registry of decoding modes: each mode module declares its facts as `SPEC` (a `ModeSpec`: knobs, KV
slots, widest pass, forwards per cycle, lossless, editing, engine-only) next to its step machine; this module
collects them and answers every question about modes. No other list of modes, knobs or per-mode facts exists.

    spec = MODES["linear_spec"]
    names(editing=False, engine_only=False)                 # ("ar", "diffusion", "linear_spec", "quadratic_spec")
    knobs = resolve_knobs("linear_spec", defaults, block_length=8)      # LinearSpecKnobs(block_length=8, ...)
    machine = spec.machine(prompt_ids, stop, sampling, mask_id, knobs, thinking=..., steer=...)

Knobs are per mode; the request-level settings every mode shares (max_new_tokens, sampling, stop strings, EOS,
the thinking budget) are not knobs. A knob of another mode is ignored (code that runs several modes with one
set of knobs, and a server layering its own and a route's defaults, need not sort them); a name that is no
mode's knob is an error. `GenerationResult.knobs` shows what ran.
"""

from __future__ import annotations

from collections.abc import Iterable

from trimode.decode import ar, auto, diffusion, edit, linear_spec, quadratic_spec
from trimode.decode.spec import ModelDefaults, ModeSpec

__all__ = ["KNOB_NAMES", "MODES", "ModeSpec", "ModelDefaults", "forwards_per_cycle", "kv_slots", "mode_spec",
           "names", "pass_tokens", "resolve_knobs", "try_order"]

MODES: dict[str, ModeSpec] = {m.SPEC.name: m.SPEC for m in (ar, diffusion, linear_spec, quadratic_spec, auto, edit)}
KNOB_NAMES: tuple[str, ...] = tuple(dict.fromkeys(n for s in MODES.values() for n in s.knob_names))


def mode_spec(mode: str) -> ModeSpec:
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; choose one of {', '.join(MODES)}")
    return MODES[mode]


def names(*, lossless: bool | None = None, editing: bool | None = None, engine_only: bool | None = None,
          batch_rows: bool | None = None) -> tuple[str, ...]:
    """The modes (in registry order) whose facts equal every given one; None: either."""
    wanted = {"lossless": lossless, "editing": editing, "engine_only": engine_only, "batch_rows": batch_rows}
    return tuple(name for name, spec in MODES.items()
                 if all(v is None or getattr(spec, k) == v for k, v in wanted.items()))


def forwards_per_cycle(mode: str, steps: int = 1) -> int:
    """Forward passes of one cycle of `mode` (diffusion: a block of `steps` denoising steps and its refresh)."""
    count = mode_spec(mode).forwards_per_cycle
    if count is None:
        raise ValueError(f"mode {mode} has no fixed number of forwards per cycle")
    return count(steps)


def pass_tokens(mode: str, block: int) -> int:
    """Tokens per row of the widest pass of one cycle of `mode` with block length `block` (AR: 1)."""
    tokens = mode_spec(mode).pass_tokens
    if tokens is None:
        raise ValueError(f"mode {mode} has no cycle: its pass is the whole edit")
    return tokens(block)


def kv_slots(mode: str, prompt_len: int, max_new_tokens: int, knobs) -> int:
    """The most KV cache slots a request of `mode` uses (see `ModeSpec.kv_slots`)."""
    return mode_spec(mode).kv_slots(prompt_len, max_new_tokens, knobs)


def try_order(modes: Iterable[str]) -> list[str]:
    """`modes` in cold-start try order (widest passes first); a mode without a rank is an error."""
    unranked = [m for m in modes if mode_spec(m).try_rank is None]
    if unranked:
        raise ValueError(f"mode(s) {', '.join(unranked)} have no try order")
    return sorted(modes, key=lambda m: MODES[m].try_rank)


def resolve_knobs(mode: str, defaults: ModelDefaults, max_new_tokens: int | None = None, **given):
    """The validated knobs `mode` runs with: given values (None = unset), else defaults. Unknown names raise;
    knobs of other modes are ignored. With `max_new_tokens`, no block is longer than the request can use."""
    spec = mode_spec(mode)
    unknown = sorted(set(given) - set(KNOB_NAMES))
    if unknown:
        raise ValueError(f"unknown knob(s) {', '.join(unknown)}; known: {', '.join(KNOB_NAMES)}")
    values = {k: v for k, v in given.items() if v is not None and k in spec.knob_names}
    if spec.least_block is not None:
        block, least = values.get("block_length", defaults.block_size), spec.least_block
        if max_new_tokens is not None and isinstance(block, int) and not isinstance(block, bool) and block > least:
            block = max(least, min(block, max_new_tokens))  # a longer block only drafts or denoises unused slots
        values["block_length"] = block
    settle = getattr(spec.knobs, "settle", None)
    if settle is not None:
        settle(values, given)
    if "use_drafter" in spec.knob_names and values.get("use_drafter") is None:
        values["use_drafter"] = defaults.has_drafter
    if values.get("unmask") == "learned":
        values["sampler"] = defaults.sampler  # None: the knobs' check names the missing sampler
    knobs = spec.knobs(**values)
    knobs.check(defaults)
    return knobs
