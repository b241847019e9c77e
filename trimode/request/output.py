"""What the caller sees of a running request: machine events in, `Delta` / `BlockState` events and one
`GenerationResult` out. One output object per request kind, shared by the batch-1 driver and the engine:

- `TextOutput`: a continuation. Committed tokens become text deltas (incremental detokenization, stop strings,
  EOS, the budget: `trimode.decode.text.TextStream`); a stop string ends the machine early (`stop_hit`).
- `EditOutput`: an edit (infill, revise, fill). It shows its whole block while it fills and the rendered result
  (`EditPlan.render`) once the machine commits the block; stop strings cut an infill's middle.
"""

from __future__ import annotations

from trimode.decode.result import BlockState, Delta, GenerationResult
from trimode.decode.stats import DecodeStats
from trimode.decode.step import Committed, Provisional
from trimode.decode.stopping import StopRule
from trimode.decode.text import TextStream
from trimode.model.handle import ModelHandle
from trimode.request.edit_plan import EditPlan


def _block_state(model: ModelHandle, event: Provisional, passes: int) -> BlockState:
    block = [None if t == model.config.mask_token_id else t for t in event.block[0]]
    forced = event.forced[0] if event.forced is not None else None
    return BlockState(block, model.decode([t for t in block if t is not None]) or "", passes, forced)


class TextOutput:
    """A continuation's output: text deltas as tokens commit, then the result."""

    def __init__(self, model: ModelHandle, mode: str, rule: StopRule, stop: list[str] | None, prompt_tokens: int,
                 knobs: dict, defer_text: bool = False) -> None:
        self.model, self.mode, self.prompt_tokens, self.knobs = model, mode, prompt_tokens, knobs
        # defer_text: without stop strings, the text is left to the reader (deltas and result with text None,
        # filled in by `trimode.decode.text.DeferredText`).
        self.text = TextStream(model.tokenizer, rule, stop, defer=defer_text)
        self.stats = DecodeStats(mode, prompt_tokens=prompt_tokens)  # the machine's live statistics
        self.logprobs: list | None = None  # per committed token, when the request asked for them

    @property
    def stop_hit(self) -> bool:
        """A stop string ended the text: the machine must not run further."""
        return self.text.stop_hit

    def events(self, event) -> list[Delta | BlockState]:
        """What the caller sees of one machine event."""
        if event.stats is not None:
            self.stats = event.stats
        if isinstance(event, Committed):
            before = len(self.text.tokens)
            delta = self.text.add(event.tokens[0])
            if event.logprobs is not None:
                self.logprobs = (self.logprobs or [])[:before] + event.logprobs[0]
            if delta is None:
                return []
            delta.forward_passes = self.stats.forward_passes
            if self.logprobs is not None:
                delta.logprobs = self.logprobs[before : before + len(delta.token_ids)]
            return [delta]
        if isinstance(event, Provisional):
            return [_block_state(self.model, event, self.stats.forward_passes)]
        return []

    def result(self, finish: str | None = None, seconds: float = 0.0) -> GenerationResult:
        """The result so far (`finish`: overrides the reason, e.g. "cancelled")."""
        stats, text = self.stats, self.text
        stats.mode, stats.prompt_tokens, stats.generated_tokens = self.mode, self.prompt_tokens, len(text.tokens)
        stats.drop_tail(text.cut_tokens)
        stats.seconds = seconds
        logprobs = None if self.logprobs is None else self.logprobs[: len(text.tokens)]
        shown = text.text if self.model.tokenizer and not text.deferred else None
        return GenerationResult(list(text.tokens), shown, stats,
                                finish or text.finish_reason, self.mode, self.knobs, logprobs=logprobs)


class EditOutput:
    """An edit's output: the block while it fills (provisional), then the rendered block.

    finish_reason: "stop", except for an infill whose middle ran to its budget without the model ending it
    ("length"); a stop string in an infill's middle cuts it there ("stop"). `prompt_tokens`: the text before the
    block plus the given tokens inside it that count as prompt (a template's text)."""

    stop_hit = False  # an edit's machine ends by itself

    def __init__(self, model: ModelHandle, plan: EditPlan, prompt_ids: list[int], knobs: dict,
                 stop: list[str] | None = None) -> None:
        self.model, self.plan, self.knobs = model, plan, knobs
        self.stops = [s for s in (stop or []) if s]
        self.prompt_tokens = len(prompt_ids) + plan.context_tokens
        self.stats = DecodeStats("edit", prompt_tokens=self.prompt_tokens)
        self.shown: tuple[list[int], str, list[tuple[int, int]]] | None = None  # the rendered block, once filled
        self.finish = "cancelled"

    def events(self, event) -> list[Delta | BlockState]:
        if event.stats is not None:
            self.stats = event.stats
        passes = self.stats.forward_passes
        if isinstance(event, Provisional):
            return [_block_state(self.model, event, passes)]
        if isinstance(event, Committed):
            self._render(event.tokens[0])
            ids, text, _ = self.shown
            return [Delta(ids, text, passes)]
        return []

    def _render(self, block: list[int]) -> None:
        ids, text, spans = self.plan.render(block, self.model.decode)
        self.finish = "length" if self.plan.show == "holes" and self.plan.hole_full(block) else "stop"
        hits = [(i, i + len(s)) for s in self.stops if (i := text.find(s)) >= 0]
        if hits:
            start, end = min(hits)
            ids = self._tokens_through(ids, len(text), end)
            text, spans = text[:start], [(a, min(b, start)) for a, b in spans if a < start]
            self.finish = "stop"
        self.shown = ids, text, spans

    def _tokens_through(self, ids: list[int], shown_chars: int, end: int) -> list[int]:
        """The fewest leading `ids` whose text reaches character `end` of the shown text (as a stop string cuts
        a continuation: the tokens that complete the stop string are kept, the ones after it dropped)."""
        decode = self.model.decode
        hidden = len(decode(ids) or "") - shown_chars  # the healed prefix the shown text leaves out
        lo, hi = 0, len(ids)
        while lo < hi:
            mid = (lo + hi) // 2
            if len(decode(ids[:mid]) or "") - hidden >= end:
                hi = mid
            else:
                lo = mid + 1
        return ids[:lo]

    def result(self, finish: str | None = None, seconds: float = 0.0) -> GenerationResult:
        ids, shown, spans = self.shown or ([], "", [])
        lead = self.plan.lead
        if lead:
            shown = lead + shown
            spans = [(a + len(lead), b + len(lead)) for a, b in spans]
        stats = self.stats
        stats.mode, stats.prompt_tokens, stats.generated_tokens = "edit", self.prompt_tokens, len(ids)
        stats.seconds = seconds
        return GenerationResult(ids, shown, stats, finish or self.finish, "edit", self.knobs, spans)
