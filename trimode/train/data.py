"""Training data: documents -> token rows of fixed length with loss masks -> a resumable stream of global batches.

A `Document` is a text with an optional SFT `prompt` prefix. Tokenised, a document is
`prompt ids (loss 0) + text ids (loss 1) + EOS (loss 1)`: prompt tokens are never masked and carry no loss.
Packing lays the tokenised documents into rows of `seq_len`:
- `"concat"`: one stream cut every `seq_len` tokens (documents may straddle rows; no padding but the last row);
- `"pad"`: a document starts a new row when it does not fit in the current one (rows are EOS-padded with loss 0);
  a document longer than `seq_len` still continues over several rows.
Attention is not blocked between documents that share a row (standard packing).

Infill examples (`infill_examples`, for the editing skills; none by default): from a document,
`prefix | middle | pad x k | suffix`, where the middle (a hole of 1..max_hole words of the text) is followed by
k pad tokens and the visible suffix (the rest of the text, at most max_suffix tokens, then EOS when the text
ends there: always when the rest is empty, half of the time otherwise); a share of them are tails
`prefix | end of the text | EOS x (1 + k)` with nothing after (the block of plain diffusion decoding). The
middle and the pads carry the loss (they are what the noisy stream masks), the suffix does not; the AR targets
stop after the middle (no next-token loss on pads); `middle + pads + suffix` is one span, which the objective
makes one noisy block (`objective.block_ids`). It is how infill runs: one block `[MASK x N] + suffix` after the
cached prefix, the middle written left-aligned and the rest of the N slots filled with the pad token. An
example with a span is never split over two rows (it starts a new row when it does not fit), in either packing.

`BatchStream` walks the rows in a seeded order, a new permutation each epoch, `batch_size` rows at a time; its
`position` (epoch, index) is saved in checkpoints, so a resumed run sees exactly the rows it would have seen.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import torch

from trimode.model.tokenizer import NLDTokenizer
from trimode.train.objective import noise_key

PACKING = ("concat", "pad")


@dataclass
class Document:
    text: str
    prompt: str = ""
    infill: bool = True  # may infill examples be cut from it (a source's `infill: false` says no)


@dataclass
class Example:
    """One tokenised document: `ids`, `loss` (tokens the noisy stream may mask, with a loss), `ar` (the AR targets,
    when they differ from `loss`), `span` (start, end): positions that form one noisy block (infill)."""

    ids: list[int]
    loss: list[bool]
    ar: list[bool] | None = None
    span: tuple[int, int] | None = None


@dataclass
class PackedData:
    """`input_ids` [N, L] long and `loss_mask` [N, L] bool; when some example has them, `ar_mask` [N, L] bool
    (AR targets) and `block_spans` [N, L] int32 (0: the fixed block grid; k > 0: the row's k-th span, one block)."""

    input_ids: torch.Tensor
    loss_mask: torch.Tensor
    ar_mask: torch.Tensor | None = None
    block_spans: torch.Tensor | None = None

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    @property
    def tokens(self) -> int:
        return int(self.loss_mask.sum())

    def fingerprint(self) -> str:
        """A hash of the rows, to refuse resuming on different data."""
        h = hashlib.sha256()
        h.update(self.input_ids.to(torch.int64).numpy().tobytes())
        h.update(self.loss_mask.to(torch.uint8).numpy().tobytes())
        if self.ar_mask is not None:
            h.update(self.ar_mask.to(torch.uint8).numpy().tobytes())
        if self.block_spans is not None:
            h.update(self.block_spans.to(torch.int32).numpy().tobytes())
        return h.hexdigest()[:16]


class Batch(NamedTuple):
    """One global batch: rows of `PackedData` (`ar_mask` / `block_spans` None when the data has none)."""

    input_ids: torch.Tensor
    loss_mask: torch.Tensor
    ar_mask: torch.Tensor | None = None
    block_spans: torch.Tensor | None = None


def read_jsonl(path: str | Path, text_field: str = "text", prompt_field: str | None = "prompt",
               strict: bool = True) -> list[Document]:
    """Documents from a JSONL file, one object per line with a string `text_field` and optionally a string
    `prompt_field` (None: no prompts). `strict`: other fields are an error (they are likely misspellings)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise ValueError(f"data file {path} does not exist")
    docs = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{n}: not valid JSON: {e}") from None
        if not isinstance(obj, dict) or not isinstance(obj.get(text_field), str):
            raise ValueError(f"{path}:{n}: needs a string field {text_field!r}")
        extra = set(obj) - {text_field, prompt_field}
        if strict and extra:
            raise ValueError(f"{path}:{n}: unknown field(s) {', '.join(sorted(extra))} (use {text_field} and "
                             f"{prompt_field})")
        prompt = obj.get(prompt_field, "") if prompt_field is not None else ""
        if not isinstance(prompt, str):
            raise ValueError(f"{path}:{n}: field {prompt_field!r} must be a string")
        docs.append(Document(obj[text_field], prompt))
    return docs


def tokenize(docs: list[Document], tokenizer: NLDTokenizer, eos_id: int) -> list[tuple[list[int], list[bool]]]:
    """(ids, loss mask) per document: prompt (no loss) + text + EOS."""
    texts = [d.text for d in docs]
    prompts = [d.prompt for d in docs]
    text_ids = [e.ids for e in tokenizer.tok.encode_batch(texts, add_special_tokens=False)]
    prompt_ids = [e.ids for e in tokenizer.tok.encode_batch(prompts, add_special_tokens=False)]
    out = []
    for p, t in zip(prompt_ids, text_ids, strict=True):
        ids = p + t + [eos_id]
        out.append((ids, [False] * len(p) + [True] * (len(t) + 1)))
    return out


def pack(examples: list[tuple[list[int], list[bool]] | Example], seq_len: int, pad_id: int,
         packing: str = "concat") -> PackedData:
    """Rows of `seq_len` from tokenised documents (see the module docstring for the two packings). Examples are
    `(ids, loss mask)` pairs or `Example`s; an `Example` with a span always lies within one row."""
    if packing not in PACKING:
        raise ValueError(f"packing must be one of {', '.join(PACKING)}, got {packing!r}")
    if seq_len < 2:
        raise ValueError(f"seq_len must be >= 2, got {seq_len}")
    examples = [e if isinstance(e, Example) else Example(list(e[0]), list(e[1])) for e in examples]
    extras = any(e.ar is not None or e.span is not None for e in examples)
    rows: list[tuple[list[int], list[bool], list[bool], list[int]]] = []
    ids: list[int] = []
    mask: list[bool] = []
    ar: list[bool] = []
    spans: list[int] = []

    def flush() -> None:
        nonlocal ids, mask, ar, spans
        if ids:
            pad = seq_len - len(ids)
            rows.append((ids + [pad_id] * pad, mask + [False] * pad, ar + [False] * pad, spans + [0] * pad))
        ids, mask, ar, spans = [], [], [], []

    for e in examples:
        if e.span is not None and len(e.ids) > seq_len:
            raise ValueError(f"an example with a span has {len(e.ids)} tokens, more than seq_len {seq_len}")
        if ids and len(ids) + len(e.ids) > seq_len and (packing == "pad" or e.span is not None):
            flush()
        doc_ar = e.ar if e.ar is not None else e.loss
        doc_spans = [0] * len(e.ids)
        if e.span is not None:
            k = 1 + max(spans, default=0)  # numbered within the row
            doc_spans[e.span[0] : e.span[1]] = [k] * (e.span[1] - e.span[0])
        start = 0
        while start < len(e.ids):
            take = min(seq_len - len(ids), len(e.ids) - start)
            ids += e.ids[start : start + take]
            mask += e.loss[start : start + take]
            ar += doc_ar[start : start + take]
            spans += doc_spans[start : start + take]
            start += take
            if len(ids) == seq_len:
                flush()
    flush()
    if not rows:
        return PackedData(torch.zeros(0, seq_len, dtype=torch.long), torch.zeros(0, seq_len, dtype=torch.bool))
    data = PackedData(torch.tensor([r[0] for r in rows], dtype=torch.long),
                      torch.tensor([r[1] for r in rows], dtype=torch.bool))
    if extras:
        data.ar_mask = torch.tensor([r[2] for r in rows], dtype=torch.bool)
        data.block_spans = torch.tensor([r[3] for r in rows], dtype=torch.int32)
    return data


@dataclass(frozen=True)
class InfillOptions:
    """How infill examples are cut (see `infill_examples`)."""

    share: float = 0.0  # infill examples per document (0: none; 0.5: one for about every second document)
    max_hole: int = 4  # middle: 1..max_hole words (a word carries the whitespace before it)
    max_pad: int = 8  # pad tokens after the middle: uniform in 0..max_pad
    max_suffix: int = 32  # the visible suffix: the rest of the text when it is this short, else 0..max_suffix tokens
    tail: float = 0.25  # share of tails: the last 1..max_hole words, EOS, then EOS x k, with nothing after
    prefix_space: float = 0.0  # share of holes whose leading whitespace stays in the prefix ("a b " | "c" | " d")
    holes: int = 1  # holes per example: uniform in 1..holes (more than one: a template's holes, filled together)


WORD = re.compile(r"\s*\S+")


def split_words(text: str) -> list[str]:
    """Pieces that join back to `text`, each one word with the whitespace before it ('1 2 3' -> '1', ' 2', ' 3');
    trailing whitespace goes with the last word. [] for a blank text."""
    words = WORD.findall(text)
    if words:
        words[-1] += text[len("".join(words)) :]
    return words


@dataclass
class InfillCut:
    """Where one infill example cuts its document's text: before | middle | rest; `pads` pad tokens; the suffix
    is the first `n_suffix` tokens of the rest (None: all of it), then EOS when `eos`. A `tail` has no rest and
    no suffix: the middle is the end of the text, followed by EOS and `pads` more EOS."""

    before: str
    middle: str
    rest: str
    pads: int
    n_suffix: int | None
    eos: bool
    tail: bool = False
    more: list[tuple[str, str, int]] = field(default_factory=list)  # further holes: (text before it, middle, pads)


def cut_infill(text: str, rng: random.Random, options: InfillOptions, count_tokens) -> InfillCut | None:
    """A hole of 1..max_hole words placed uniformly in `text` (None for a blank text). `count_tokens(rest)`: the
    token count of the rest; the suffix is the whole rest when it has at most max_suffix tokens, else the first
    0..max_suffix of them. A whole rest is followed by EOS half of the time, and always when it is empty: the
    suffix is never empty, so a hole is never an all-mask block with nothing after it (such a block is plain
    diffusion decoding, whose answer ends in EOS, not in pads).

    A share `options.prefix_space` of the holes leave the whitespace before the middle in the prefix, as a caller
    who cuts after a space does ("a b " | "c d" | " e"): tokenised apart, that whitespace is a token of its own
    (byte-level BPE writes " c" as one token), so both ways of cutting must be trained.

    A share `options.tail` of the cuts are tails instead: that very block, the last 1..max_hole words of the
    text then EOS and 0..max_pad more EOS, with nothing after; without them, the pads of infill examples also
    fill a block of plain diffusion decoding.
    """
    words = split_words(text)
    if not words:
        return None
    w = rng.randint(1, min(options.max_hole, len(words)))
    if rng.random() < options.tail:
        return InfillCut("".join(words[:-w]), "".join(words[-w:]), "", rng.randint(0, options.max_pad), None,
                         False, tail=True)
    a = rng.randint(0, len(words) - w)
    before, middle = "".join(words[:a]), "".join(words[a : a + w])
    if rng.random() < options.prefix_space:
        word = middle.lstrip()
        if before and word and len(word) < len(middle):
            before, middle = before + middle[: len(middle) - len(word)], word
    more = []
    after = words[a + w :]
    count = rng.randint(1, options.holes) if options.holes > 1 else 1  # (no draw for one: the same cuts as before)
    for _ in range(count - 1):  # a further hole in the rest, after 1-3 words of given text
        if len(after) < 2:
            break
        gap = rng.randint(1, min(3, len(after) - 1))
        w2 = rng.randint(1, min(options.max_hole, len(after) - gap))
        more.append(("".join(after[:gap]), "".join(after[gap : gap + w2]), rng.randint(0, options.max_pad)))
        after = after[gap + w2 :]
    rest = "".join(after)
    whole = (count_tokens(rest) if rest else 0) <= options.max_suffix
    n_suffix = None if whole else rng.randint(0, options.max_suffix)
    eos = whole and (not rest or rng.random() < 0.5)
    return InfillCut(before, middle, rest, rng.randint(0, options.max_pad), n_suffix, eos, more=more)


def infill_example(prompt_ids: list[int], before: list[int], middle: list[int], suffix: list[int], pads: int,
                   pad_id: int, seq_len: int, more: list[tuple[list[int], list[int], int]] = ()) -> Example | None:
    """`prompt | before | middle | pad x pads | suffix` as an `Example`, the prefix (prompt + before) cut on the
    left to fit `seq_len`; None when a middle is empty or the holes and suffix alone do not fit. `more`: further
    holes (given text, middle, pads), in order, between the first hole's pads and the suffix.

    Loss: `before`, the middles and the pads (not the prompt, the given text or the suffix); AR targets: `before`
    and the first middle (none after the first pad); span: from the first middle to the end, one noisy block.
    """
    h = len(middle)
    block, loss, ar = middle + [pad_id] * pads, [True] * (h + pads), [True] * h + [False] * pads
    for given, m, p in more:
        if not m:
            return None
        block += given + m + [pad_id] * p
        loss += [False] * len(given) + [True] * (len(m) + p)
        ar += [False] * (len(given) + len(m) + p)
    room = seq_len - (len(block) + len(suffix))
    if h == 0 or room < 0:
        return None
    prefix = prompt_ids + before
    prefix_loss = [False] * len(prompt_ids) + [True] * len(before)
    cut = max(0, len(prefix) - room)
    prefix, prefix_loss = prefix[cut:], prefix_loss[cut:]
    ids = prefix + block + suffix
    return Example(ids=ids, loss=prefix_loss + loss + [False] * len(suffix),
                   ar=prefix_loss + ar + [False] * len(suffix), span=(len(prefix), len(ids)))


def infill_examples(docs: list[Document], tokenizer: NLDTokenizer, eos_id: int, options: InfillOptions, seed: int,
                    pad_id: int, seq_len: int) -> list[tuple[list[int], list[bool]] | Example]:
    """The tokenised documents (`tokenize`) with infill examples mixed in: after each document, with
    probability `options.share` (`share` > 1: int(share), plus one more with probability frac(share)), an infill
    example cut from its text at word boundaries (`cut_infill`). Prompt, before, middle and rest are tokenised
    separately, as a caller of infill tokenises the text before and after a hole. Seeded: the same arguments
    give the same list."""
    examples = tokenize(docs, tokenizer, eos_id)
    if options.share <= 0:
        return list(examples)

    def enc(texts: list[str]) -> list[list[int]]:
        return [e.ids for e in tokenizer.tok.encode_batch(texts, add_special_tokens=False)]

    def count_tokens(text: str) -> int:
        return len(enc([text])[0])

    rng = random.Random(f"infill:{seed}")
    whole, frac = int(options.share), options.share - int(options.share)
    cuts: list[tuple[int, InfillCut]] = []
    for i, d in enumerate(docs):
        if not d.infill:
            continue
        for _ in range(whole + (rng.random() < frac)):
            c = cut_infill(d.text, rng, options, count_tokens)
            if c is not None:
                cuts.append((i, c))
    texts = [[c.before, c.middle, c.rest] + [t for given, m, _ in c.more for t in (given, m)] for _, c in cuts]
    pieces = enc([t for ts in texts for t in ts] + [d.prompt for d in docs])
    prompts = pieces[sum(map(len, texts)) :]
    made: dict[int, list[Example]] = {}
    at = 0
    for ts, (i, c) in zip(texts, cuts):
        (before, middle, rest), extra = pieces[at : at + 3], pieces[at + 3 : at + len(ts)]
        at += len(ts)
        if c.tail:  # the end of the text, EOS, and EOS as the filler: plain diffusion decoding of a block
            e = infill_example(prompts[i], before, middle + [eos_id], [], c.pads, eos_id, seq_len)
        else:
            suffix = (rest if c.n_suffix is None else rest[: c.n_suffix]) + [eos_id] * c.eos
            more = [(extra[2 * k], extra[2 * k + 1], p) for k, (_, _, p) in enumerate(c.more)]
            e = infill_example(prompts[i], before, middle, suffix, c.pads, pad_id, seq_len, more)
        if e is not None:
            made.setdefault(i, []).append(e)
    out: list[tuple[list[int], list[bool]] | Example] = []
    for i, ex in enumerate(examples):
        out += [ex, *made.get(i, [])]
    return out


def pack_documents(docs: list[Document], tokenizer: NLDTokenizer, seq_len: int, eos_id: int,
                   packing: str = "concat", infill: InfillOptions | None = None, seed: int = 0,
                   pad_id: int | None = None) -> PackedData:
    """Tokenise and pack; with `infill` (share > 0), infill examples with the pad token `pad_id` mixed in."""
    if infill is not None and infill.share > 0:
        if pad_id is None:
            raise ValueError("infill examples need a pad token id")
        examples = infill_examples(docs, tokenizer, eos_id, infill, seed, pad_id, seq_len)
        return pack(examples, seq_len, eos_id, packing)
    return pack(tokenize(docs, tokenizer, eos_id), seq_len, eos_id, packing)


class BatchStream:
    """Global batches of `batch_size` rows: epoch e visits the rows in the order `randperm(N)` keyed by
    (seed, e), dropping the last `N mod batch_size` rows of that order."""

    def __init__(self, data: PackedData, batch_size: int, seed: int, position: dict | None = None) -> None:
        if len(data) < batch_size:
            raise ValueError(f"the training data packs into {len(data)} rows, fewer than one batch ({batch_size} rows)")
        self.data, self.batch_size, self.seed = data, batch_size, seed
        self.epoch, self.index = 0, 0
        if position is not None:
            self.epoch, self.index = int(position["epoch"]), int(position["index"])
        self._order = self._permutation(self.epoch)

    @property
    def position(self) -> dict:
        return {"epoch": self.epoch, "index": self.index}

    def _permutation(self, epoch: int) -> torch.Tensor:
        return torch.randperm(len(self.data), generator=torch.Generator().manual_seed(noise_key(self.seed, epoch)))

    def next(self) -> Batch:
        """The next global batch: (input_ids [G, L], loss_mask [G, L], ar_mask, block_spans)."""
        if self.index + self.batch_size > len(self.data):
            self.epoch, self.index = self.epoch + 1, 0
            self._order = self._permutation(self.epoch)
        rows = self._order[self.index : self.index + self.batch_size]
        self.index += self.batch_size
        d = self.data
        return Batch(d.input_ids[rows], d.loss_mask[rows], None if d.ar_mask is None else d.ar_mask[rows],
                     None if d.block_spans is None else d.block_spans[rows])
