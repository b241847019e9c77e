"""The edit builders: infill, revise and template fill, from text (or token ids) to a prepared edit.

Each builds the block its machine fills (`trimode.decode.edit.EditBlock`) and the plan that renders the filled block
(`EditPlan`), then validates the whole (`prepare_edit`). Every size a caller gives (text lengths, hole sizes, the
budget, spans) is checked against the model's context before anything of that size is allocated or converted, and
a bad one is a one-line ValueError naming the field.

Token healing: byte-level BPE writes a word with the space before it as one token (" c"), so text cut after a
space ends in a token of its own, which the model rarely saw before a word. A hole right after such text takes
that token's place: its first slot rewrites it and may only take a token that starts with the same text
(`NLDTokenizer.heal_trailing_space`).
"""

from __future__ import annotations

import re

from trimode.decode.edit import EditBlock
from trimode.model.handle import ModelHandle
from trimode.request.edit_plan import EditPlan
from trimode.request.prepared import (
    Prepared,
    check_count,
    check_edit_context,
    check_edit_model,
    check_text,
    prepare_edit,
    show,
    token_ids,
)

HOLE = "[[hole]]"  # a template's placeholder; "[[hole:N]]" gives the hole N tokens (default: fill's hole_tokens)
_HOLE_RE = re.compile(r"\[\[hole(?::(\d+))?\]\]")


def empty_id(model: ModelHandle) -> int:
    """The token a hole is padded with where its answer is shorter: pad, or EOS where there is none."""
    c = model.config
    return c.pad_token_id if c.pad_token_id is not None else c.eos_token_id


def infill_request(model: ModelHandle, prefix: str | list[int], suffix: str | list[int], max_new_tokens: int = 32,
                   heal: bool | None = None, **kwargs) -> Prepared:
    """The middle between `prefix` and `suffix`: a hole of `max_new_tokens` slots before the suffix. `heal`: token
    healing of a prefix that ends in a space token (default: when the prefix is given as text). The healed slot
    counts in the budget: the middle is at most `max_new_tokens` tokens, the first of them the healed one.
    Keywords: `stop` (strings that cut the middle) and those of `prepare_edit`."""
    check_count(max_new_tokens, "max_new_tokens", model.max_context)
    if heal is not None and not isinstance(heal, bool):
        raise ValueError(f"heal must be true or false, got {show(heal)}")
    pre, suf = token_ids(model, prefix, "prefix"), token_ids(model, suffix, "suffix")
    n, allowed, healed = max_new_tokens, {}, ""
    if heal is None:
        heal = isinstance(prefix, str)
    healing = model.tokenizer.heal_trailing_space(pre) if heal and model.tokenizer is not None else None
    if healing is not None:  # the first slot rewrites the prefix's trailing space token
        pre, healed, allowed = healing[0], healing[1], {0: healing[2]}
    check_edit_context(model, len(pre), n + len(suf))
    block = EditBlock([0] * n + suf, [True] * n + [False] * len(suf), [False] * (n + len(suf)), allowed,
                      empty_id(model))
    plan = EditPlan(block, [("hole", n), ("keep", len(suf))], "holes", empty_id(model), {0: healed}, healed)
    return prepare_edit(model, pre, plan, **kwargs)


def revise_request(model: ModelHandle, prompt: str | list[int], draft: str | list[int],
                   spans: list[tuple[int, int]] | None = None, **kwargs) -> Prepared:
    """Revise `draft`, written after `prompt`: the spans' tokens are remasked and refilled, or without spans the
    model finds what to rewrite (`rounds`, default 4). A span is widened to whole tokens and whole characters (the
    byte tokens of one character are all rewritten or all kept)."""
    if kwargs.get("stop") is not None:
        raise ValueError("stop applies to an infill's middle; a revision returns the whole draft")
    kwargs.pop("stop", None)
    pre = token_ids(model, prompt, "prompt")
    if spans is None:
        ids = token_ids(model, draft, "draft")
        if not ids:
            raise ValueError("the draft is empty")
        if kwargs.get("rounds") is None:
            kwargs["rounds"] = 4  # the default budget of detect-and-rewrite rounds
        check_edit_context(model, len(pre), len(ids) + 1)
        # The draft, then one mask slot that is never written: with every token of the block visible, the last
        # ones would see just what the causal stream sees there, where the AR loss taught the model to predict the
        # *next* token; the open end tells the two apart (docs/editing.md, measured there).
        block = EditBlock(ids + [model.config.mask_token_id], [False] * (len(ids) + 1), [True] * len(ids) + [False])
        plan = EditPlan(block, [("draft", len(ids)), ("open", 1)], "all", empty_id(model))
        return prepare_edit(model, pre, plan, **kwargs)
    if not isinstance(draft, str):
        raise ValueError("spans are character ranges of a text draft; give the draft as text")
    if not draft:
        raise ValueError("the draft is empty")
    check_text(model, draft, "draft")
    ranges = _check_spans(spans, len(draft))
    if model.tokenizer is None:
        raise ValueError("this checkpoint has no tokenizer.json: spans of a text draft need one")
    ids, offsets = model.tokenizer.encode_with_offsets(draft)
    check_edit_context(model, len(pre), len(ids))
    holes = span_holes(offsets, ranges)
    block = EditBlock(ids, holes, [False] * len(ids))
    return prepare_edit(model, pre, EditPlan(block, _runs(holes), "all", empty_id(model)), **kwargs)


def _check_spans(spans, chars: int) -> list[tuple[int, int]]:
    """`spans` as sorted (start, end) character ranges of a `chars`-long draft: in range, not overlapping."""
    if not isinstance(spans, list | tuple):
        raise ValueError("spans must be a list of [start, end] character ranges")
    if not spans:
        raise ValueError("spans is empty (leave it out to let the model find what to rewrite)")
    if len(spans) > chars:
        raise ValueError(f"spans holds {len(spans)} ranges; a draft of {chars} characters has room for at most "
                         f"{chars}")
    ranges = []
    for span in spans:
        if (not isinstance(span, list | tuple) or len(span) != 2
                or any(isinstance(x, bool) or not isinstance(x, int) for x in span)):
            raise ValueError("spans must be [start, end] character ranges (two integers each)")
        a, b = span
        if not 0 <= a < b <= chars:
            raise ValueError(f"span [{show(a)}, {show(b)}] is out of range for a draft of {chars} characters")
        ranges.append((a, b))
    ranges.sort()
    for (a, b), (c, d) in zip(ranges, ranges[1:]):
        if c < b:
            raise ValueError(f"spans [{a}, {b}] and [{c}, {d}] overlap")
    return ranges


def span_holes(offsets: list[tuple[int, int]], ranges: list[tuple[int, int]]) -> list[bool]:
    """Which tokens (their character `offsets` in the draft) the sorted, disjoint character `ranges` touch, in one
    pass over both. Tokens that share a character (its byte tokens) form one unit, touched or kept as a whole, so
    a span never cuts a character in two."""
    holes = [False] * len(offsets)
    i, r = 0, 0
    while i < len(offsets):
        start, end = offsets[i]
        j = i + 1
        while j < len(offsets) and offsets[j][0] < end:  # the next token shares a character with this unit
            end = max(end, offsets[j][1])
            j += 1
        while r < len(ranges) and ranges[r][1] <= start:
            r += 1
        if r < len(ranges) and ranges[r][0] < end:
            holes[i:j] = [True] * (j - i)
        i = j
    return holes


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


def fill_request(model: ModelHandle, template: str, hole_tokens: int = 8, **kwargs) -> Prepared:
    """Fill the holes of `template`: `[[hole]]` (`hole_tokens` slots) or `[[hole:N]]` (N slots). The text before
    the first hole is the prompt and is shown again in front of the result; text before a hole that ends in a
    space token is healed."""
    if kwargs.get("stop") is not None:
        raise ValueError("stop applies to an infill's middle; a fill returns the whole template")
    kwargs.pop("stop", None)
    if not isinstance(template, str):
        raise ValueError("a template is text with [[hole]] or [[hole:N]] placeholders")
    check_text(model, template, "template")
    check_count(hole_tokens, "hole_tokens", model.max_context)
    pieces = _HOLE_RE.split(template)  # text, length, text, length, ..., text
    if len(pieces) == 1:
        raise ValueError(f"the template has no hole: mark them with {HOLE} or [[hole:N]] (N tokens)")
    if model.tokenizer is None:
        raise ValueError("this checkpoint has no tokenizer.json: a template needs one")
    check_edit_model(model)
    prefix = token_ids(model, pieces[0], "template")
    heal = model.tokenizer.heal_trailing_space(prefix)
    healed_prefix = heal[1] if heal is not None else ""
    if heal is not None:  # the first hole's first slot rewrites the lead's trailing space token
        prefix = heal[0]
    block, segments, heals = _template_block(model, pieces, hole_tokens, len(prefix), heal)
    kept = sum(n for kind, n in segments if kind == "keep")
    lead = pieces[0][: len(pieces[0]) - len(healed_prefix)]  # the block's first token writes the rest
    plan = EditPlan(block, segments, "all", empty_id(model), heals, lead=lead, context_tokens=kept)
    return prepare_edit(model, prefix, plan, **kwargs)


def _hole_size(model: ModelHandle, digits: str | None, default: int, k: int) -> int:
    """The slots of hole `k` (1-based): its `[[hole:N]]` digits, read only when short enough to fit the context."""
    if digits is None:
        return default
    limit = model.max_context
    if len(digits) > len(str(limit)) or int(digits) > limit:
        shown = digits if len(digits) <= 12 else f"{digits[:6]}...({len(digits)} digits)"
        raise ValueError(f"hole {k} ([[hole:{shown}]]) is larger than the context length {limit}")
    if int(digits) < 1:
        raise ValueError(f"hole {k}: a hole needs at least 1 token ([[hole:N]] with N >= 1)")
    return int(digits)


def _template_block(model: ModelHandle, pieces: list, hole_tokens: int, prefix_len: int,
                    heal) -> tuple[EditBlock, list[tuple[str, int]], dict[int, str]]:
    """The block of a split template (text, hole size, text, ...), the prefix's `heal` applied to the first hole.
    Every hole is checked to fit the context, with all before it, before its slots are allocated."""
    tokens: list[int] = []
    holes: list[bool] = []
    segments: list[tuple[str, int]] = []
    allowed: dict[int, list[int]] = {}
    heals: dict[int, str] = {}
    if heal is not None:
        allowed[0], heals[0] = heal[2], heal[1]
    for i in range(1, len(pieces), 2):
        k = (i + 1) // 2
        n = _hole_size(model, pieces[i], hole_tokens, k) + (len(tokens) in allowed)
        if prefix_len + len(tokens) + n > model.max_context:
            raise ValueError(f"hole {k} ({n} tokens) does not fit: with the template before it, it needs "
                             f"{prefix_len + len(tokens) + n} tokens, more than the context length {model.max_context}")
        tokens += [0] * n
        holes += [True] * n
        segments.append(("hole", n))
        text = token_ids(model, pieces[i + 1], "template")
        heal = model.tokenizer.heal_trailing_space(text) if i + 2 < len(pieces) else None
        if heal is not None:  # the same between holes: the next hole's first slot rewrites the space token
            text = heal[0]
            allowed[len(tokens) + len(text)], heals[len(segments) + 1] = heal[2], heal[1]
        tokens += text
        holes += [False] * len(text)
        if text:
            segments.append(("keep", len(text)))
    return EditBlock(tokens, holes, [False] * len(tokens), allowed, empty_id(model)), segments, heals
