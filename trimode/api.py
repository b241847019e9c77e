"""The Python API: `trimode.load(...)` and `TriMode.generate(prompt, mode=...)`.

    import trimode
    tm = trimode.load()                                   # the bundled default model
    r = tm.generate("def add(a, b):", mode="linear_spec", max_new_tokens=64)
    r.text, r.token_ids, r.stats.forward_passes, r.stats.tokens_per_forward

Modes: the registry `trimode.decode.modes.MODES` (`ar`, `diffusion`, `linear_spec`, `quadratic_spec`; `auto` runs
in the engine). Each is a step machine (`trimode/decode/`) that this class drives one sequence at a time over a
contiguous KV cache; `trimode.engine` drives many over a paged pool. Both take their requests from the request
core (`trimode.request`: validation, the edit builders, the outputs); this module is the facade over it.
`stream(...)` yields the same generation as events (committed text deltas, optional provisional diffusion blocks)
and can be abandoned at any point, which stops the work.
"""

from __future__ import annotations

import time
from collections.abc import Generator
from importlib import resources
from pathlib import Path

import torch

from trimode.decode.driver import run
from trimode.decode.modes import ModelDefaults, mode_spec, names, resolve_knobs
from trimode.decode.result import BlockState, Delta, GenerationResult
from trimode.model.config import CheckpointError
from trimode.model.handle import ModelHandle
from trimode.model.loading import LORA_DIR, load_lora, load_model, resolve_checkpoint
from trimode.model.tokenizer import NLDTokenizer
from trimode.request import (
    HOLE,
    EditPlan,
    Prepared,
    fill_request,
    infill_request,
    model_defaults,
    prepare,
    revise_request,
)

# The modes `generate` runs (auto steers by load, so it runs in the engine only; edits have their own methods).
MODES = names(engine_only=False, editing=False)
__all__ = ["HOLE", "MODES", "BlockState", "Delta", "EditPlan", "GenerationResult", "TriMode", "Prepared", "load",
           "default_model_path"]


def default_model_path() -> Path:
    return Path(str(resources.files("trimode") / "data" / "default_model"))


def _finish(gen: Generator[Delta | BlockState, None, GenerationResult]) -> GenerationResult:
    """Run a stream to its end; its result."""
    while True:
        try:
            next(gen)
        except StopIteration as done:
            return done.value


class TriMode(ModelHandle):
    """A loaded NLD model (network + optional tokenizer and drafter adapter) with the user's methods: `generate` /
    `stream` a continuation, `infill` / `revise` / `fill` text. The engine takes one too (it is a model handle)."""

    @property
    def defaults(self) -> ModelDefaults:
        return model_defaults(self)

    def knobs_for(self, mode: str, max_new_tokens: int | None = None, **given) -> dict:
        """The effective knobs of `mode` as a dict: given values, else the model's defaults."""
        knobs = resolve_knobs(mode, self.defaults, max_new_tokens, **given)
        return {k: getattr(knobs, k) for k in mode_spec(mode).knob_names}

    def drive(self, req: Prepared, provisional: bool = False) -> Generator[Delta | BlockState, None, GenerationResult]:
        """Run a prepared request (`trimode.request`) on the batch-1 driver: its events, then its result.
        Abandoning the stream stops the work."""
        out = req.output(self)
        t0 = time.perf_counter()
        events = run(self.net, req.machine(self, provisional), req.kv_slots())
        try:
            for event in events:
                yield from out.events(event)
                if out.stop_hit:
                    break  # otherwise the machine ends by itself, without another forward
        finally:
            events.close()  # abandoning the stream (client gone, stop string) ends the decode here
        return out.result(seconds=time.perf_counter() - t0)

    def stream(self, prompt: str | list[int], mode: str = "ar", provisional: bool = False,
               **kwargs) -> Generator[Delta | BlockState, None, GenerationResult]:
        """Generate as events: `Delta` (committed tokens and text), `BlockState` (with `provisional`, the diffusion
        block being denoised); returns the GenerationResult. Keyword arguments: max_new_tokens, temperature,
        top_p, top_k, seed, stop (strings), eos_token_id, max_thinking_tokens, end_think_token_id, and the mode's
        knobs (see `trimode.decode.modes`). Abandoning the stream stops the work."""
        if mode_spec(mode).engine_only:
            raise ValueError(f"mode {mode} chooses by load: it runs in the engine (trimode serve, trimode.engine)")
        if mode_spec(mode).editing:
            raise ValueError(f"mode {mode} rewrites given text: use infill, revise or fill")
        return (yield from self.drive(prepare(self, prompt, mode, **kwargs), provisional))

    def generate(self, prompt: str | list[int], mode: str = "ar", **kwargs) -> GenerationResult:
        """Generate for one prompt (text or token ids); see `stream` for the keyword arguments."""
        return _finish(self.stream(prompt, mode=mode, **kwargs))

    def infill(self, prefix: str | list[int], suffix: str | list[int], max_new_tokens: int = 32,
               **kwargs) -> GenerationResult:
        """Fill the middle between `prefix` and `suffix`: `.text` / `.token_ids` are the middle only, at most
        `max_new_tokens` tokens (the model ends it early by writing the empty token, which is stripped). The
        middle sees the whole suffix. The hole starts `hole_window` (6) slots long and doubles, up to
        `max_new_tokens`, while the model fills it to the end. A text prefix that ends in a space token is healed:
        that token becomes the hole's first slot, which may only take a token starting with it (`.token_ids` then
        start with that token, which counts in `max_new_tokens`; `.text` leaves its space out, as the prefix has
        it). `stop`: strings that cut the middle (finish_reason "stop"); a middle that ran to `max_new_tokens`
        without the model ending it finishes with "length". Keywords: threshold, hole_window, heal, stop,
        temperature, top_p, top_k, seed."""
        return _finish(self.drive(infill_request(self, prefix, suffix, max_new_tokens, **kwargs)))

    def revise(self, prompt: str | list[int], draft: str | list[int], spans: list[tuple[int, int]] | None = None,
               **kwargs) -> GenerationResult:
        """Revise `draft` (written after `prompt`): `.text` is the whole revised draft, `.spans` the character
        ranges of it that changed. With `spans` (character ranges of the draft) those are remasked and refilled
        (widened to whole tokens and whole characters); without, the model finds what to rewrite itself: up to
        `rounds` (default 4) rounds, each rewriting the tokens it predicts differently with confidence >=
        `revise_threshold`. Keywords: threshold, rounds, revise_threshold, temperature, top_p, top_k, seed."""
        return _finish(self.drive(revise_request(self, prompt, draft, spans, **kwargs)))

    def fill(self, template: str, hole_tokens: int = 8, **kwargs) -> GenerationResult:
        """Fill every hole of `template` in parallel: holes are `[[hole]]` (`hole_tokens` tokens) or `[[hole:N]]`
        (N tokens); a hole may end early. `.text` is the template with its holes filled (the text before the first
        hole is the context and is returned too), `.spans` where the holes' text is; the template's text counts as
        prompt tokens. Text before a hole that ends in a space token is healed as in `infill`. Keywords:
        threshold, hole_window, temperature, top_p, top_k, seed."""
        return _finish(self.drive(fill_request(self, template, hole_tokens, **kwargs)))


def load(
    path_or_repo: str | Path | None = None,
    dtype: str | torch.dtype | None = None,
    device: str | torch.device | None = None,
    lora: bool | str | Path = True,
    revision: str | None = None,
) -> TriMode:
    """Load an NLD checkpoint directory or Hub repo id (default: the bundled small model).

    dtype: "float32" / "bfloat16" / "float16" or a torch dtype; default float32 on CPU, bfloat16 on CUDA.
    lora: True loads `linear_spec_lora/` when present, False skips it, a path loads that adapter directory.
    """
    if path_or_repo is None:
        path_or_repo = default_model_path()
        if not (Path(path_or_repo) / "config.json").is_file():
            raise CheckpointError(f"the bundled default model is missing from {path_or_repo}; name a model")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if dtype is None:
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, str):
        try:
            dtype = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
                     "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16,
                     "float64": torch.float64}[dtype]
        except KeyError:
            raise ValueError(f"unknown dtype {dtype!r}") from None
    ckpt = resolve_checkpoint(path_or_repo, revision=revision)
    net = load_model(ckpt, dtype=dtype, device=device)
    if lora is True:
        if (ckpt / LORA_DIR / "adapter_config.json").is_file():
            load_lora(net, ckpt / LORA_DIR)
    elif lora:
        load_lora(net, Path(lora))
    return TriMode(net, NLDTokenizer.from_dir(ckpt), ckpt)
