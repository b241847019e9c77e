"""Training data: documents -> token rows of fixed length with loss masks -> a resumable stream of global batches.

A `Document` is a text with an optional SFT `prompt` prefix. Tokenised, a document is
`prompt ids (loss 0) + text ids (loss 1) + EOS (loss 1)`: prompt tokens are never masked and carry no loss.
Packing lays the tokenised documents into rows of `seq_len`:
- `"concat"`: one stream cut every `seq_len` tokens (documents may straddle rows; no padding but the last row);
- `"pad"`: a document starts a new row when it does not fit in the current one (rows are EOS-padded with loss 0);
  a document longer than `seq_len` still continues over several rows.
Attention is not blocked between documents that share a row (standard packing).

`BatchStream` walks the rows in a seeded order, a new permutation each epoch, `batch_size` rows at a time; its
`position` (epoch, index) is saved in checkpoints, so a resumed run sees exactly the rows it would have seen.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from trimode.model.tokenizer import NLDTokenizer
from trimode.train.objective import noise_key

PACKING = ("concat", "pad")


@dataclass
class Document:
    text: str
    prompt: str = ""


@dataclass
class PackedData:
    """`input_ids` [N, L] long and `loss_mask` [N, L] bool."""

    input_ids: torch.Tensor
    loss_mask: torch.Tensor

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
        return h.hexdigest()[:16]


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


def pack(examples: list[tuple[list[int], list[bool]]], seq_len: int, pad_id: int, packing: str = "concat"
         ) -> PackedData:
    """Rows of `seq_len` from tokenised documents (see the module docstring for the two packings)."""
    if packing not in PACKING:
        raise ValueError(f"packing must be one of {', '.join(PACKING)}, got {packing!r}")
    if seq_len < 2:
        raise ValueError(f"seq_len must be >= 2, got {seq_len}")
    rows: list[tuple[list[int], list[bool]]] = []
    ids: list[int] = []
    mask: list[bool] = []

    def flush() -> None:
        nonlocal ids, mask
        if ids:
            pad = seq_len - len(ids)
            rows.append((ids + [pad_id] * pad, mask + [False] * pad))
        ids, mask = [], []

    for doc_ids, doc_mask in examples:
        if packing == "pad" and ids and len(ids) + len(doc_ids) > seq_len:
            flush()
        start = 0
        while start < len(doc_ids):
            take = min(seq_len - len(ids), len(doc_ids) - start)
            ids += doc_ids[start : start + take]
            mask += doc_mask[start : start + take]
            start += take
            if len(ids) == seq_len:
                flush()
    flush()
    if not rows:
        return PackedData(torch.zeros(0, seq_len, dtype=torch.long), torch.zeros(0, seq_len, dtype=torch.bool))
    return PackedData(torch.tensor([r[0] for r in rows], dtype=torch.long),
                      torch.tensor([r[1] for r in rows], dtype=torch.bool))


def pack_documents(docs: list[Document], tokenizer: NLDTokenizer, seq_len: int, eos_id: int,
                   packing: str = "concat") -> PackedData:
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

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The next global batch: (input_ids [G, L], loss_mask [G, L])."""
        if self.index + self.batch_size > len(self.data):
            self.epoch, self.index = self.epoch + 1, 0
            self._order = self._permutation(self.epoch)
        rows = self._order[self.index : self.index + self.batch_size]
        self.index += self.batch_size
        return self.data.input_ids[rows], self.data.loss_mask[rows]
