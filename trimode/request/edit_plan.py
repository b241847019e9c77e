"""An edit's plan: the block its machine fills (`trimode.decode.edit.EditBlock`) and how the filled block becomes
what the caller sees (token ids, text, the character spans the edit wrote)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from trimode.decode.edit import EditBlock

Decode = Callable[[list[int]], "str | None"]


@dataclass(frozen=True)
class EditPlan:
    """`segments` cover the block in order: (kind, token count) with kind "keep" (given text), "hole" (a hole: the
    empty token is stripped from it), "draft" (revisable text) or "open" (the open end after a revised draft: one
    mask slot, never written, never shown). `show`: "holes" (an infill's middle: only the holes' tokens) or "all"
    (the whole block: a revised draft, a filled template). `heals`: segment index -> the text of the token before
    that hole which token healing moved into the hole (its first slot rewrites it); `healed_prefix`: that text when
    the token came from the prefix, outside the block, so the shown text drops it. `lead`: text shown before the
    block (a template's text before its first hole, which is the prompt). `context_tokens`: given tokens inside the
    block that count as prompt (a template's text between holes)."""

    block: EditBlock
    segments: list[tuple[str, int]]
    show: str
    empty_id: int  # the token a hole is padded with where its answer is shorter
    heals: dict[int, str] = field(default_factory=dict)
    healed_prefix: str = ""
    lead: str = ""
    context_tokens: int = 0

    def render(self, tokens: list[int], decode: Decode) -> tuple[list[int], str, list[tuple[int, int]]]:
        """(token ids, text, written spans) of a filled block; `lead` is not included."""
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
            text = decode(ids) or ""
            if kind == "hole":
                spans.append((min(before + len(self.heals.get(i, "")), len(text)), len(text)))
            elif kind == "draft" and part != given:
                spans.append(_changed(decode, given, part, before))
        cut = len(self.healed_prefix) if text.startswith(self.healed_prefix) else 0
        text = text[cut:]
        return ids, text, [(max(a - cut, 0), b - cut) for a, b in spans if b > a]

    def hole_full(self, tokens: list[int]) -> bool:
        """Whether some hole was written to its last slot (the model did not end it: its budget ran out)."""
        at = 0
        for kind, n in self.segments:
            if kind == "hole" and self.empty_id not in tokens[at : at + n]:
                return True
            at += n
        return False


def _changed(decode: Decode, old: list[int], new: list[int], offset: int) -> tuple[int, int]:
    """The character span of `new`'s text (at `offset`) from its first to its last token that differs."""
    first = next(i for i, (a, b) in enumerate(zip(old, new)) if a != b)
    last = max(i for i, (a, b) in enumerate(zip(old, new)) if a != b)
    start = len(decode(new[:first]) or "")
    end = len(decode(new[: last + 1]) or "")
    return offset + start, offset + end
