"""The Python API: `trimode.load(...)` and `TriMode.generate(prompt, mode=...)`.

    import trimode
    tm = trimode.load()                                   # the bundled default model
    r = tm.generate("def add(a, b):", mode="linear_spec", max_new_tokens=64)
    r.text, r.token_ids, r.stats.forward_passes, r.stats.tokens_per_forward

Modes: the registry `trimode.decode.modes.MODES` (`ar`, `diffusion`, `linear_spec`, `quadratic_spec`; `auto` runs
in the engine). Each is a step machine (`trimode/decode/`) that this class drives one sequence at a time over a
contiguous KV cache; `trimode.engine` drives many over a paged pool. `stream(...)` yields the same generation as
events (committed text deltas, optional provisional diffusion blocks) and can be abandoned at any point, which
stops the work.
"""

from __future__ import annotations

import re
import time
from collections.abc import Generator
from importlib import resources
from pathlib import Path

import torch

from trimode.decode.driver import run
from trimode.decode.edit import EditBlock
from trimode.decode.modes import MODES as MODE_SPECS
from trimode.decode.modes import ModelDefaults, mode_spec, resolve_knobs
from trimode.decode.result import BlockState, Delta, GenerationResult
from trimode.decode.sampling import SamplingParams
from trimode.decode.stats import DecodeStats
from trimode.decode.step import Committed, Machine, Provisional
from trimode.decode.stopping import StopRule, ThinkingBudget
from trimode.decode.text import TextStream
from trimode.model.config import CheckpointError
from trimode.model.loading import LORA_DIR, load_lora, load_model, resolve_checkpoint
from trimode.model.tokenizer import NLDTokenizer
from trimode.model.transformer import NLDTransformer

# The modes `generate` runs (auto steers by load, so it runs in the engine only; edits have their own methods).
MODES = tuple(name for name, spec in MODE_SPECS.items() if not spec.engine_only and not spec.editing)
HOLE = "[[hole]]"  # a template's placeholder; "[[hole:N]]" gives the hole N tokens (default: fill's hole_tokens)
_HOLE_RE = re.compile(r"\[\[hole(?::(\d+))?\]\]")
__all__ = ["HOLE", "MODES", "BlockState", "Delta", "EditPlan", "GenerationResult", "TriMode", "Prepared", "load",
           "default_model_path"]


def _runs(holes: list[bool]) -> list[tuple[str, int]]:
    """Segments of a revision with spans: runs of hole and kept tokens."""
    segments: list[tuple[str, int]] = []
    for h in holes:
        kind = "hole" if h else "keep"
        if segments and segments[-1][0] == kind:
            segments[-1] = (kind, segments[-1][1] + 1)
        else:
            segments.append((kind, 1))
    return segments


def default_model_path() -> Path:
    return Path(str(resources.files("trimode") / "data" / "default_model"))


class Prepared:
    """A validated request: its prompt ids, stop rule, sampling, thinking budget and effective knobs."""

    def __init__(self, prompt_ids: list[int], mode: str, knobs, rule: StopRule, sampling: SamplingParams,
                 thinking: ThinkingBudget | None, stop: list[str] | None, edit: EditPlan | None = None) -> None:
        self.prompt_ids, self.mode, self.knobs = prompt_ids, mode, knobs
        self.rule, self.sampling, self.thinking, self.stop = rule, sampling, thinking, stop
        self.edit = edit

    @property
    def knob_dict(self) -> dict:
        return {k: getattr(self.knobs, k) for k in mode_spec(self.mode).knob_names}

    def kv_slots(self) -> int:
        return mode_spec(self.mode).kv_slots(len(self.prompt_ids), self.rule.max_new_tokens, self.knobs)


class EditPlan:
    """An edit's block, built from text, and how its filled tokens become the result: the token ids and text
    the caller sees, and the character spans of that text which the edit wrote.

    `segments` cover the block in order: (kind, token count) with kind "keep" (given text), "hole" (a hole: the
    empty token is stripped from it), "draft" (revisable text) or "open" (the open end after a revised draft:
    one mask slot, never written, never shown). `heals`: segment index -> the text of the token before that hole
    which token healing moved into the hole (its first slot rewrites it); `healed_prefix`: that text when the
    token came from the prefix, outside the block, so the shown text drops it."""

    def __init__(self, tm: TriMode, block: EditBlock, segments: list[tuple[str, int]], show: str,
                 heals: dict[int, str] | None = None, healed_prefix: str = "") -> None:
        self.tm, self.block, self.segments, self.show = tm, block, segments, show
        self.heals, self.healed_prefix = heals or {}, healed_prefix

    @property
    def empty_id(self) -> int:
        """The token a hole is padded with where its answer is shorter: pad, or EOS where there is none."""
        c = self.tm.config
        return c.pad_token_id if c.pad_token_id is not None else c.eos_token_id

    def render(self, tokens: list[int]) -> tuple[list[int], str, list[tuple[int, int]]]:
        """(token ids, text, written spans) of a filled block. `show`: "holes" (the middle of an infill: only the
        holes' tokens) or "all" (the whole block: a revised draft, a filled template)."""
        ids: list[int] = []
        spans: list[tuple[int, int]] = []
        text = ""
        at = 0
        for i, (kind, n) in enumerate(self.segments):
            part, given = tokens[at : at + n], self.block.tokens[at : at + n]
            at += n
            if kind == "open" or (self.show == "holes" and kind != "hole"):
                continue
            if kind == "hole":
                part = [t for t in part if t != self.empty_id]
            before = len(text)
            ids += part
            text = self.tm.decode(ids) or ""
            if kind == "hole":
                spans.append((min(before + len(self.heals.get(i, "")), len(text)), len(text)))
            elif kind == "draft" and part != given:
                spans.append(_changed(self.tm, given, part, before))
        cut = len(self.healed_prefix) if text.startswith(self.healed_prefix) else 0
        text = text[cut:]
        return ids, text, [(max(a - cut, 0), b - cut) for a, b in spans if b > a]


def _changed(tm: TriMode, old: list[int], new: list[int], offset: int) -> tuple[int, int]:
    """The character span of `new`'s text (at `offset`) from its first to its last token that differs."""
    first = next(i for i, (a, b) in enumerate(zip(old, new)) if a != b)
    last = max(i for i, (a, b) in enumerate(zip(old, new)) if a != b)
    start = len(tm.decode(new[:first]) or "")
    end = len(tm.decode(new[: last + 1]) or "")
    return offset + start, offset + end


class TriMode:
    """A loaded NLD model (network + optional tokenizer and drafter adapter)."""

    def __init__(self, net: NLDTransformer, tokenizer: NLDTokenizer | None = None, path: Path | None = None) -> None:
        self.net = net
        self.tokenizer = tokenizer
        self.path = path
        self.config = net.config

    @property
    def has_drafter(self) -> bool:
        return self.net.encoder.layers[0].self_attn.o_proj.lora_A is not None

    @property
    def max_context(self) -> int:
        return self.config.max_position_embeddings

    @property
    def defaults(self) -> ModelDefaults:
        return ModelDefaults(self.config.block_size, self.has_drafter, self.net.sampler)

    def encode(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("this checkpoint has no tokenizer.json: pass token ids instead of text")
            return self.tokenizer.encode(prompt)
        return list(prompt)

    def decode(self, ids: list[int]) -> str | None:
        return self.tokenizer.decode(ids) if self.tokenizer is not None else None

    def eos_ids(self, eos_token_id: int | None = None) -> frozenset[int]:
        ids = {self.config.eos_token_id if eos_token_id is None else eos_token_id}
        if self.tokenizer is not None and eos_token_id is None:
            for name in ("eos_token", "eot_token"):
                tok = self.tokenizer.config.get(name)
                if isinstance(tok, str) and (tid := self.tokenizer.token_id(tok)) is not None:
                    ids.add(tid)
        return frozenset(i for i in ids if i >= 0)

    def knobs_for(self, mode: str, max_new_tokens: int | None = None, **given) -> dict:
        """The effective knobs of `mode` as a dict: given values, else the model's defaults."""
        knobs = resolve_knobs(mode, self.defaults, max_new_tokens, **given)
        return {k: getattr(knobs, k) for k in mode_spec(mode).knob_names}

    def prepare(self, prompt: str | list[int], mode: str = "ar", max_new_tokens: int = 128, temperature: float = 0.0,
                top_p: float = 1.0, top_k: int = 0, seed: int | None = None, stop: list[str] | None = None,
                eos_token_id: int | None = None, max_thinking_tokens: int | None = None,
                end_think_token_id: int | None = None, **knobs) -> Prepared:
        """Validate a request (ValueError naming the problem) and resolve everything it will run with."""
        mode_spec(mode)
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int):
            raise ValueError(f"max_new_tokens must be an integer, got {max_new_tokens!r}")
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        k = resolve_knobs(mode, self.defaults, max_new_tokens, **knobs)
        if not isinstance(prompt, str) and not (
                isinstance(prompt, list | tuple) and all(isinstance(t, int) and not isinstance(t, bool)
                                                         for t in prompt)):
            raise ValueError("the prompt must be text or a list of token ids")
        prompt_ids = self.encode(prompt)
        if not prompt_ids:
            raise ValueError("the prompt is empty")
        vocab = self.config.vocab_size
        if any(not 0 <= t < vocab for t in prompt_ids):
            raise ValueError(f"prompt token ids must be in [0, {vocab})")
        if len(prompt_ids) + max_new_tokens > self.max_context:
            raise ValueError(
                f"prompt ({len(prompt_ids)} tokens) + max_new_tokens ({max_new_tokens}) exceeds the context "
                f"length {self.max_context}"
            )
        if stop is not None and not (isinstance(stop, list) and all(isinstance(s, str) for s in stop)):
            raise ValueError("stop must be a list of strings")
        sampling = SamplingParams(temperature, top_p, top_k, seed).with_seed()
        thinking = None
        if max_thinking_tokens is not None:
            if end_think_token_id is None:
                end_think_token_id = self.tokenizer.token_id("</think>") if self.tokenizer else None
            if end_think_token_id is None:
                raise ValueError("max_thinking_tokens needs end_think_token_id (no </think> token in the vocabulary)")
            if max_thinking_tokens < 0 or not 0 <= end_think_token_id < vocab:
                raise ValueError(f"max_thinking_tokens must be >= 0 and end_think_token_id in [0, {vocab})")
            thinking = ThinkingBudget(max_thinking_tokens, end_think_token_id)
        rule = StopRule(max_new_tokens, self.eos_ids(eos_token_id))
        return Prepared(list(prompt_ids), mode, k, rule, sampling, thinking, stop)

    def machine(self, req: Prepared, provisional: bool = False, steer=None) -> Machine:
        """The step machine of a prepared request (one sequence)."""
        ids = torch.tensor([req.prompt_ids], dtype=torch.long, device=self.net.device)
        return mode_spec(req.mode).machine(ids, req.rule, req.sampling, self.config.mask_token_id, req.knobs,
                                           req.thinking, provisional, steer, req.edit.block if req.edit else None)

    # -- editing ---------------------------------------------------------------------------------------------
    def _ids(self, text: str | list[int], what: str) -> list[int]:
        if isinstance(text, str):
            return self.encode(text) if text else []
        if not all(isinstance(t, int) and not isinstance(t, bool) for t in text):
            raise ValueError(f"{what} must be text or a list of token ids")
        return list(text)

    def prepare_edit(self, prefix: list[int], plan: EditPlan, temperature: float = 0.0, top_p: float = 1.0,
                     top_k: int = 0, seed: int | None = None, **knobs) -> Prepared:
        """Validate an edit (ValueError naming the problem) and resolve what it runs with."""
        if self.config.mask_token_id is None or self.config.mask_token_id < 0:
            raise ValueError("this checkpoint has no mask token, so it cannot fill or revise text")
        k = resolve_knobs("edit", self.defaults, **knobs)
        if not prefix:
            raise ValueError("an edit needs some text before the first hole or the draft (a prompt or a prefix)")
        n = len(plan.block.tokens)
        vocab = self.config.vocab_size
        if any(not 0 <= t < vocab for t in prefix + plan.block.tokens):
            raise ValueError(f"token ids must be in [0, {vocab})")
        if len(prefix) + n > self.max_context:
            raise ValueError(f"the text before the edit ({len(prefix)} tokens) and the edited block ({n} tokens) "
                             f"exceed the context length {self.max_context}")
        sampling = SamplingParams(temperature, top_p, top_k, seed).with_seed()
        return Prepared(list(prefix), "edit", k, StopRule(n), sampling, None, None, plan)

    def infill_request(self, prefix: str | list[int], suffix: str | list[int], max_new_tokens: int = 32,
                       heal: bool | None = None, **kwargs) -> Prepared:
        """The middle between `prefix` and `suffix`, at most `max_new_tokens` tokens (see `infill`). `heal`:
        token healing of a prefix that ends in a space token (default: when the prefix is given as text)."""
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
        pre, suf = self._ids(prefix, "prefix"), self._ids(suffix, "suffix")
        n, allowed, healed = max_new_tokens, {}, ""
        if heal is None:
            heal = isinstance(prefix, str)
        healing = self.tokenizer.heal_trailing_space(pre) if heal and self.tokenizer is not None else None
        if healing is not None:  # the first slot rewrites the prefix's trailing space token (token healing)
            pre, healed, allowed = healing[0], healing[1], {0: healing[2]}
            n += 1
        block = EditBlock([0] * n + suf, [True] * n + [False] * len(suf), [False] * (n + len(suf)), allowed)
        plan = EditPlan(self, block, [("hole", n), ("keep", len(suf))], "holes", {0: healed}, healed)
        block.empty = plan.empty_id
        return self.prepare_edit(pre, plan, **kwargs)

    def revise_request(self, prompt: str | list[int], draft: str | list[int],
                       spans: list[tuple[int, int]] | None = None, **kwargs) -> Prepared:
        """Revise `draft` (see `revise`)."""
        pre, ids = self._ids(prompt, "prompt"), self._ids(draft, "draft")
        if not ids:
            raise ValueError("the draft is empty")
        if spans is None:
            if kwargs.get("rounds") is None:
                kwargs["rounds"] = 4  # the default budget of detect-and-rewrite rounds
            # The draft, then one mask slot that is never written: with every token of the block visible, the
            # last ones would see just what the causal stream sees there, where the AR loss taught the model to
            # predict the *next* token; the open end tells the two apart (docs/editing.md, measured there).
            block = EditBlock(ids + [self.config.mask_token_id], [False] * (len(ids) + 1), [True] * len(ids) + [False])
            segments = [("draft", len(ids)), ("open", 1)]
            return self.prepare_edit(pre, EditPlan(self, block, segments, "all"), **kwargs)
        if not isinstance(draft, str):
            raise ValueError("spans are character ranges of a text draft; give the draft as text")
        holes = self._span_tokens(draft, ids, spans)
        block = EditBlock(ids, holes, [False] * len(ids))
        segments = _runs(holes)
        return self.prepare_edit(pre, EditPlan(self, block, segments, "all"), **kwargs)

    def fill_request(self, template: str, hole_tokens: int = 8, **kwargs) -> Prepared:
        """Fill the holes of `template` (see `fill`)."""
        if not isinstance(template, str):
            raise ValueError("a template is text with [[hole]] or [[hole:N]] placeholders")
        pieces = _HOLE_RE.split(template)  # text, length, text, length, ..., text
        if len(pieces) == 1:
            raise ValueError(f"the template has no hole: mark them with {HOLE} or [[hole:N]] (N tokens)")
        if self.tokenizer is None:
            raise ValueError("this checkpoint has no tokenizer.json: a template needs one")
        prefix = self._ids(pieces[0], "template")
        tokens: list[int] = []
        holes: list[bool] = []
        segments: list[tuple[str, int]] = []
        allowed: dict[int, list[int]] = {}
        heals: dict[int, str] = {}
        healed_prefix = ""
        heal = self.tokenizer.heal_trailing_space(prefix)
        if heal is not None:  # token healing: the first hole's first slot rewrites the lead's trailing space
            prefix, healed_prefix = heal[0], heal[1]
            allowed[0], heals[0] = heal[2], heal[1]
        for i in range(1, len(pieces), 2):
            n = int(pieces[i]) if pieces[i] is not None else hole_tokens
            if n < 1:
                raise ValueError("a hole needs at least 1 token ([[hole:N]] with N >= 1)")
            n += len(tokens) in allowed
            tokens += [0] * n
            holes += [True] * n
            segments.append(("hole", n))
            text = self._ids(pieces[i + 1], "template")
            heal = self.tokenizer.heal_trailing_space(text) if i + 2 < len(pieces) else None
            if heal is not None:  # the same between holes: the next hole's first slot rewrites the space token
                text = heal[0]
                allowed[len(tokens) + len(text)], heals[len(segments) + 1] = heal[2], heal[1]
            tokens += text
            holes += [False] * len(text)
            if text:
                segments.append(("keep", len(text)))
        block = EditBlock(tokens, holes, [False] * len(tokens), allowed)
        plan = EditPlan(self, block, segments, "all", heals)
        block.empty = plan.empty_id
        plan.lead = pieces[0][: len(pieces[0]) - len(healed_prefix)]  # the block's first token writes the rest
        return self.prepare_edit(prefix, plan, **kwargs)

    def _span_tokens(self, draft: str, ids: list[int], spans) -> list[bool]:
        """Which draft tokens overlap the character `spans` (validated: in range, not overlapping)."""
        try:
            ranges = sorted((int(a), int(b)) for a, b in spans)
        except (TypeError, ValueError):
            raise ValueError("spans must be [start, end] character ranges") from None
        if not ranges:
            raise ValueError("spans is empty (leave it out to let the model find what to rewrite)")
        for (a, b), nxt in zip(ranges, ranges[1:] + [None]):
            if not 0 <= a < b <= len(draft):
                raise ValueError(f"span [{a}, {b}] is out of range for a draft of {len(draft)} characters")
            if nxt is not None and nxt[0] < b:
                raise ValueError(f"spans [{a}, {b}] and [{nxt[0]}, {nxt[1]}] overlap")
        ends = [len(self.decode(ids[: i + 1]) or "") for i in range(len(ids))]
        starts = [0] + ends[:-1]
        return [any(s < b and a < e for a, b in ranges) for s, e in zip(starts, ends)]

    def _edit(self, req: Prepared, provisional: bool) -> Generator[Delta | BlockState, None, GenerationResult]:
        stats = DecodeStats("edit")
        t0 = time.perf_counter()
        out: list[int] = []
        events = run(self.net, self.machine(req, provisional), req.kv_slots())
        for event in events:
            if event.stats is not None:
                stats = event.stats
            if isinstance(event, Committed):
                out = event.tokens[0]
            yield from self.events(req, None, event, stats)
        return self.result(req, None, stats, seconds=time.perf_counter() - t0, block=out)

    def _run_edit(self, req: Prepared) -> GenerationResult:
        gen = self._edit(req, False)
        while True:
            try:
                next(gen)
            except StopIteration as done:
                return done.value

    def infill(self, prefix: str | list[int], suffix: str | list[int], max_new_tokens: int = 32,
               **kwargs) -> GenerationResult:
        """Fill the middle between `prefix` and `suffix`: `.text` / `.token_ids` are the middle only, at most
        `max_new_tokens` tokens (the model ends it early by writing the empty token, which is stripped). The
        middle sees the whole suffix. The hole starts `hole_window` (6) slots long and doubles, up to
        `max_new_tokens`, while the model fills it to the end. A text prefix that ends in a space token is healed:
        that token becomes the hole's first slot, which may only take a token starting with it (`.token_ids` then
        start with that token; `.text` leaves its space out, as the prefix has it). Keywords: threshold,
        hole_window, heal, temperature, top_p, top_k, seed."""
        return self._run_edit(self.infill_request(prefix, suffix, max_new_tokens, **kwargs))

    def revise(self, prompt: str | list[int], draft: str | list[int], spans: list[tuple[int, int]] | None = None,
               **kwargs) -> GenerationResult:
        """Revise `draft` (written after `prompt`): `.text` is the whole revised draft, `.spans` the character
        ranges of it that changed. With `spans` (character ranges of the draft) those are remasked and refilled;
        without, the model finds what to rewrite itself: up to `rounds` (default 4) rounds, each rewriting the
        tokens it predicts differently with confidence >= `revise_threshold`. Keywords: threshold, rounds,
        revise_threshold, temperature, top_p, top_k, seed."""
        return self._run_edit(self.revise_request(prompt, draft, spans, **kwargs))

    def fill(self, template: str, hole_tokens: int = 8, **kwargs) -> GenerationResult:
        """Fill every hole of `template` in parallel: holes are `[[hole]]` (`hole_tokens` tokens) or `[[hole:N]]`
        (N tokens); a hole may end early. `.text` is the template with its holes filled (the text before the first
        hole is the context and is returned too), `.spans` where the holes' text is. Text before a hole that ends in
        a space token is healed as in `infill`. Keywords: threshold, hole_window, temperature, top_p, top_k, seed."""
        return self._run_edit(self.fill_request(template, hole_tokens, **kwargs))

    def events(self, req: Prepared, text: TextStream | None, event,
               stats: DecodeStats | None = None) -> Generator[Delta | BlockState, None, None]:
        """What the caller sees of one machine event (shared with the engine); `stats`: the live statistics."""
        if event.stats is not None:
            stats = event.stats
        passes = stats.forward_passes if stats is not None else None
        if req.edit is not None:  # an edit shows its whole block while it fills, and the result at the end
            if isinstance(event, Provisional):
                block = [None if t == self.config.mask_token_id else t for t in event.block[0]]
                yield BlockState(block, self.decode([t for t in block if t is not None]) or "", passes)
            elif isinstance(event, Committed):
                ids, shown, _ = req.edit.render(event.tokens[0])
                yield Delta(ids, shown, passes)
            return
        if isinstance(event, Provisional):
            block = [None if t == self.config.mask_token_id else t for t in event.block[0]]
            yield BlockState(block, self.decode([t for t in block if t is not None]) or "", passes)
        elif isinstance(event, Committed):
            delta = text.add(event.tokens[0])
            if delta is not None:
                delta.forward_passes = passes
                yield delta

    def result(self, req: Prepared, text: TextStream | None, stats: DecodeStats, finish: str | None = None,
               seconds: float = 0.0, block: list[int] | None = None) -> GenerationResult:
        if req.edit is not None:
            ids, shown, spans = req.edit.render(block) if block else ([], "", [])
            lead = getattr(req.edit, "lead", "")
            if lead:
                shown = lead + shown
                spans = [(a + len(lead), b + len(lead)) for a, b in spans]
            stats.mode, stats.prompt_tokens, stats.generated_tokens = "edit", len(req.prompt_ids), len(ids)
            stats.seconds = seconds
            return GenerationResult(ids, shown, stats, finish or ("stop" if block else "cancelled"), "edit",
                                    req.knob_dict, spans)
        stats.mode, stats.prompt_tokens, stats.generated_tokens = req.mode, len(req.prompt_ids), len(text.tokens)
        stats.drop_tail(text.cut_tokens)
        stats.seconds = seconds
        return GenerationResult(list(text.tokens), text.text if self.tokenizer else None, stats,
                                finish or text.finish_reason, req.mode, req.knob_dict)

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
        req = self.prepare(prompt, mode, **kwargs)
        text = TextStream(self.tokenizer, req.rule, req.stop)
        stats = DecodeStats(mode)
        t0 = time.perf_counter()
        events = run(self.net, self.machine(req, provisional), req.kv_slots())
        try:
            for event in events:
                if event.stats is not None:
                    stats = event.stats
                yield from self.events(req, text, event, stats)
                if text.stop_hit:
                    break  # otherwise the machine ends by itself, without another forward
        finally:
            events.close()  # abandoning the stream (client gone, stop string) ends the decode here
        return self.result(req, text, stats, seconds=time.perf_counter() - t0)

    def generate(self, prompt: str | list[int], mode: str = "ar", **kwargs) -> GenerationResult:
        """Generate for one prompt (text or token ids); see `stream` for the keyword arguments."""
        gen = self.stream(prompt, mode=mode, **kwargs)
        while True:
            try:
                next(gen)
            except StopIteration as done:
                return done.value


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
