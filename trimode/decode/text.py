"""From committed token ids to text deltas: incremental detokenization, stop strings, EOS and the token budget.

`TextStream` is fed the tokens a step machine commits and returns what to show. Detokenization is incremental
(`Detokenizer`, the scheme vLLM uses): only a short window of recent tokens is decoded per event, so a long output
costs the same per event as a short one. Text that may begin a stop string or ends in an incomplete UTF-8 character
is held back until it is settled.

A stream with no stop strings may leave the text to its reader (`defer=True`, the engine's choice): it counts
tokens only (EOS, the budget) and emits deltas whose `text` is None; whoever reads them turns them into text with a
`Detokenizer` of its own (`RequestHandle`, on the client's thread: the engine's loop thread does no decoding for
such requests). The text is the same either way: the same window decoding over the same tokens.
"""

from __future__ import annotations

from trimode.decode.result import Delta, GenerationResult
from trimode.decode.stopping import StopRule
from trimode.model.tokenizer import NLDTokenizer


class Detokenizer:
    """Incremental detokenization of a growing token list: `decoded` is the text of every token fed so far
    (trailing incomplete UTF-8 characters excepted until more tokens or the end settle them)."""

    def __init__(self, decode) -> None:
        self.decode = decode  # token ids -> text
        self.tokens: list[int] = []
        self.decoded = ""
        self._prefix = 0  # token offsets of the decode window (vLLM's prefix_offset / read_offset)
        self._read = 0

    def feed(self, new: list[int], final: bool = False) -> None:
        """Add tokens and decode the ones after `_read` in the window starting at `_prefix` (so merges at the seam
        are seen). `final`: no more tokens come, an incomplete character is decoded as it is."""
        self.tokens += new
        before = self.decode(self.tokens[self._prefix : self._read])
        after = self.decode(self.tokens[self._prefix :])
        if after.endswith("\ufffd") and len(self.tokens) > self._read and not final:
            return  # an incomplete character: wait for the next token
        if after.startswith(before):
            self.decoded += after[len(before) :]
        else:  # the window's start decodes differently with more context (rare): decode everything once
            self.decoded = self.decode(self.tokens)
        self._prefix, self._read = self._read, len(self.tokens)


class DeferredText:
    """A reader's side of a deferred stream (`TextStream(defer=True)`): fills in the text of its deltas, in
    order, and of the result, as the stream would have (`settle`)."""

    def __init__(self, decode) -> None:
        self.detok = Detokenizer(decode)
        self.shown = 0  # characters of `detok.decoded` shown so far

    def settle(self, item):
        if isinstance(item, Delta) and item.text is None:
            self.detok.feed(item.token_ids, item.final)
            text = self.detok.decoded
            end = len(text) if item.final else max(self.shown, len(text.rstrip("\ufffd")))
            item.text, self.shown = text[self.shown : end], end
        elif isinstance(item, GenerationResult) and item.text is None:
            if self.detok.tokens == item.token_ids:  # the text shown (all of it after the final delta)
                item.text = self.detok.decoded[: self.shown]
            else:  # its deltas were not all read through here: decode the whole output
                item.text = self.detok.decode(list(item.token_ids))
        return item


class TextStream:
    def __init__(self, tokenizer: NLDTokenizer | None, rule: StopRule, stop: list[str] | None = None,
                 defer: bool = False) -> None:
        self.tokenizer = tokenizer
        self.rule = rule
        self.stops = [s for s in (stop or []) if s]
        # Text left to the reader: only without stop strings (a stop string must end the machine here, now).
        self.deferred = defer and tokenizer is not None and not self.stops
        self.tokens: list[int] = []
        self.text = ""  # text shown so far
        self.detok = Detokenizer(tokenizer.decode) if tokenizer is not None and not self.deferred else None
        self.finish_reason = "length"
        self.done = False
        self.stop_hit = False  # a stop string ended the text: the machine must not run further
        self.cut_tokens = 0  # committed tokens dropped because a stop string ended before them

    def add(self, new: list[int]) -> Delta | None:
        """Take newly committed tokens; return the delta to emit (None when there is nothing to show)."""
        if self.done:
            return None
        new, over = self.rule.take(len(self.tokens), new)
        self.tokens += new
        if new and new[-1] in self.rule.eos_token_ids:
            self.finish_reason = "stop"
        self.done = over
        if self.tokenizer is None:
            return Delta(new, "") if new else None
        if self.deferred:  # the reader decodes (DeferredText)
            return Delta(new, None, final=self.done) if new or self.done else None
        self.detok.feed(new, self.done)
        hit = self._find_stop()
        if hit is not None:
            self.finish_reason, self.done, self.stop_hit = "stop", True, True
            full = self._decoded[: hit[0]]
            new = new[: max(0, len(new) - self._trim_tokens(hit[1]))]
        elif self.done:
            full = self._decoded
        else:
            full = self._decoded[: len(self.text) + self._safe_len(self._decoded[len(self.text) :])]
        if new or len(full) > len(self.text):
            delta = full[len(self.text) :]
            self.text = full
            return Delta(new, delta)
        return None

    @property
    def _decoded(self) -> str:
        """All text decoded so far (some of it may be held back)."""
        return self.detok.decoded

    def _find_stop(self) -> tuple[int, int] | None:
        """(start, end) of the first stop string in the text not shown yet, or None."""
        hits = []
        for s in self.stops:
            i = self._decoded.find(s, max(0, len(self.text) - len(s)))
            if i >= 0:
                hits.append((i, i + len(s)))
        return min(hits) if hits else None

    def _trim_tokens(self, end: int) -> int:
        """Keep the tokens up to the one that completes the text through `end` (the stop string's end); return
        how many were dropped."""
        dec = self.tokenizer.decode
        lo, hi = 0, len(self.tokens)  # the smallest k whose text reaches `end`
        while lo < hi:
            mid = (lo + hi) // 2
            if len(dec(self.tokens[:mid])) >= end:
                hi = mid
            else:
                lo = mid + 1
        k = lo
        dropped = len(self.tokens) - k
        self.tokens = self.tokens[:k]
        self.cut_tokens = dropped
        return dropped

    def _safe_len(self, delta: str) -> int:
        """Length of the part of `delta` that can be shown now."""
        n = len(delta.rstrip("\ufffd"))
        for s in self.stops:
            for k in range(min(len(s) - 1, n), 0, -1):
                if delta[:n].endswith(s[:k]):
                    n -= k
                    break
        return n
