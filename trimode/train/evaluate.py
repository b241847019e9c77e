"""Task accuracy and speed of one model in every decoding mode (the model card's table).

    python -m trimode.train.evaluate --model DIR --n 100

For each mode configuration (AR; diffusion at thresholds 0.5 / 0.7 / 0.9; linear self-speculation without and
with the LoRA drafter; quadratic self-speculation) every held-out task item is generated greedily and checked;
a row reports accuracy per task and overall, tokens per forward pass (all generated tokens / all forward passes,
prefill included, from `result.stats`; and excluding the prefill: generated / (forward passes - 1 per item), as
`trimode bench quality` reports it) and tokens per second. A first row gives a baseline a model gets without
reading the question: always answering the most frequent answer of the task's training split.

Chat items are wrapped in the model's chat template (when it has one); raw-completion items are fed as is.

`--editing` evaluates the editing skills instead (`evaluate_editing`), on held-out copy / reverse / sort items:
- infill: a hole of one or two items of the answer, filled with `infill_tokens` (the prefix in the KV cache,
  one bidirectional block `[MASK x N] + suffix`, pads stripped; the suffix of a hole at the end of the answer is
  [EOS]); right = prefix + middle + suffix is the answer. The hole is cut before the space of its first item
  ("1 2" | " 3 4" | " 7 9"), and again after it ("1 2 " | "3 4" | " 7 9", the "cut after the space" column,
  with token healing as `tm.infill` does it: the prefix's trailing space token becomes the hole's first slot);
- revision: one item of the answer replaced by another item (a digit by another digit, a letter by another
  letter); `revise_tokens` remasks the tokens the model would change and refills them (the block is the draft
  and one mask slot after it, its open end); fixed = the answer.
Both are written here with plain forward passes of the network, to the inference contract of issue #12.
"""

from __future__ import annotations

import argparse
import platform
import random
import string
import sys
import time
from collections import Counter

import torch

from trimode.api import TriMode
from trimode.model.transformer import NLDTransformer
from trimode.tasks import TASKS, Task, load_tasks

DEFAULT_TASKS = ("arithmetic", "copy", "reverse", "sort", "python_next_line")
DEFAULT_MODES: list[dict] = [
    {"mode": "ar"},
    {"mode": "diffusion", "threshold": 0.5},
    {"mode": "diffusion", "threshold": 0.7},
    {"mode": "diffusion", "threshold": 0.9},
    {"mode": "linear_spec", "use_drafter": False},
    {"mode": "linear_spec", "use_drafter": True},
    {"mode": "quadratic_spec"},
]


def mode_label(mode: dict) -> str:
    """A short name for a mode configuration: `diffusion@0.9`, `linear_spec+drafter`, ..."""
    name = mode["mode"]
    if name == "diffusion" and mode.get("threshold") is not None:
        name += f"@{mode['threshold']}"
    if name == "linear_spec" and mode.get("use_drafter"):
        name += "+drafter"
    extra = {k: v for k, v in mode.items() if k not in ("mode", "threshold", "use_drafter")}
    if extra:
        name += "(" + ",".join(f"{k}={v}" for k, v in sorted(extra.items())) + ")"
    return name


def resolve_tasks(tasks: list[Task] | dict[str, int] | list[str] | None, n: int = 20, seed: int = 0,
                  split: str = "heldout") -> list[Task]:
    """Task items from items, a {name: count} mapping, or names (n items each) loaded from `split`."""
    if tasks is None:
        tasks = list(DEFAULT_TASKS)
    if isinstance(tasks, dict):
        return [t for name, count in tasks.items() for t in load_tasks(name, count, seed, split)]
    if all(isinstance(t, str) for t in tasks):
        return [t for name in tasks for t in load_tasks(name, n, seed, split)]
    if not all(isinstance(t, Task) for t in tasks):
        raise ValueError("tasks must be Task items, task names, or a {name: count} mapping")
    return list(tasks)


def prompt_text(tm: TriMode, task: Task) -> str:
    if task.chat and tm.tokenizer.chat_template:
        return tm.tokenizer.apply_chat_template([{"role": "user", "content": task.prompt}])
    return task.prompt


def evaluate_modes(tm: TriMode, tasks: list[Task] | dict[str, int] | list[str] | None = None,
                   modes: list[dict] | None = None, n: int = 20, seed: int = 0, split: str = "heldout",
                   progress: bool = False) -> list[dict]:
    """One row per mode configuration: accuracy per task and overall, tokens per forward, tokens per second.

    `tasks`: Task items, or names / a {name: count} mapping loaded with `load_tasks(name, count, seed, split)`.
    `modes`: dicts of `TriMode.generate` keywords with a `mode` key (default: `DEFAULT_MODES`; the drafter row
    is left out when the model has no adapter). Generation is greedy, so rows are reproducible.
    """
    if tm.tokenizer is None:
        raise ValueError("task evaluation needs a model with a tokenizer (tokenizer.json)")
    items = resolve_tasks(tasks, n, seed, split)
    if not items:
        raise ValueError("no task items to evaluate")
    if modes is None:
        modes = [m for m in DEFAULT_MODES if not m.get("use_drafter") or tm.has_drafter]
    prompts = [prompt_text(tm, t) for t in items]
    names = list(dict.fromkeys(t.name for t in items))
    rows = []
    for mode in modes:
        if "mode" not in mode:
            raise ValueError(f"a mode configuration needs a 'mode' key: {mode}")
        knobs = {k: v for k, v in mode.items() if k != "mode"}
        correct: Counter[str] = Counter()
        task_tokens: Counter[str] = Counter()
        task_forwards: Counter[str] = Counter()
        generated = forwards = 0
        seconds = 0.0
        acceptance: list[int] = []
        start = time.perf_counter()
        for i, (task, prompt) in enumerate(zip(items, prompts, strict=True)):
            r = tm.generate(prompt, mode=mode["mode"], max_new_tokens=task.max_new_tokens, temperature=0.0, **knobs)
            correct[task.name] += task.check(r.text or "")
            generated += r.stats.generated_tokens
            task_tokens[task.name] += r.stats.generated_tokens
            task_forwards[task.name] += r.stats.forward_passes
            forwards += r.stats.forward_passes
            seconds += r.stats.seconds
            acceptance += r.stats.acceptance
            if progress:
                print(f"\r{mode_label(mode)}: {i + 1}/{len(items)}", end="", file=sys.stderr, flush=True)
        if progress:
            print(f" ({time.perf_counter() - start:.0f}s)", file=sys.stderr)
        counts = Counter(t.name for t in items)
        rows.append({
            "mode": mode_label(mode),
            "config": dict(mode),
            "items": len(items),
            "accuracy": sum(correct.values()) / len(items),
            "accuracy_by_task": {name: correct[name] / counts[name] for name in names},
            "generated_tokens": generated,
            "forward_passes": forwards,
            "tokens_per_forward": generated / forwards if forwards else 0.0,
            # without the prompt pass of each item, as `trimode bench quality` counts it
            "tokens_per_decode_forward": generated / (forwards - len(items)) if forwards > len(items) else 0.0,
            "tokens_per_forward_by_task": {name: task_tokens[name] / max(1, task_forwards[name]) for name in names},
            "tokens_per_second": generated / seconds if seconds > 0 else 0.0,
            "mean_acceptance": sum(acceptance) / len(acceptance) if acceptance else None,
        })
    return rows


def majority_baseline(items: list[Task], seed: int = 0, n_train: int = 500) -> dict:
    """Accuracy of always giving the most frequent answer among `n_train` items of each task's training split."""
    names = list(dict.fromkeys(t.name for t in items))
    by_task = {}
    for name in names:
        train = load_tasks(name, n_train, seed, "train")
        answer = Counter(t.answer for t in train).most_common(1)[0][0]
        mine = [t for t in items if t.name == name]
        by_task[name] = sum(t.check(answer) for t in mine) / len(mine)
    total = sum(by_task[t.name] for t in items) / len(items)  # weights tasks by their item counts
    return {"mode": "baseline: most frequent answer", "accuracy": total, "accuracy_by_task": by_task}


def markdown_table(rows: list[dict], baseline: dict | None = None) -> str:
    names = list(rows[0]["accuracy_by_task"])
    head = ["mode", *names, "all", "tokens/forward", "excl. prefill", "tokens/s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    if baseline is not None:
        cells = [baseline["mode"], *(f"{100 * baseline['accuracy_by_task'][n]:.0f}%" for n in names),
                 f"{100 * baseline['accuracy']:.1f}%", "", "", ""]
        lines.append("| " + " | ".join(cells) + " |")
    for r in rows:
        cells = [r["mode"], *(f"{100 * r['accuracy_by_task'][n]:.0f}%" for n in names), f"{100 * r['accuracy']:.1f}%",
                 f"{r['tokens_per_forward']:.2f}", f"{r['tokens_per_decode_forward']:.2f}",
                 f"{r['tokens_per_second']:.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def markdown_tpf_table(rows: list[dict]) -> str:
    """Tokens per forward (prefill counted) per task: long answers leave room for parallel decoding, answers of
    two or three tokens do not (the prompt pass and one draft + verify cycle already produce them)."""
    names = list(rows[0]["tokens_per_forward_by_task"])
    lines = ["| mode | " + " | ".join(names) + " |", "|" + "---|" * (len(names) + 1)]
    for r in rows:
        lines.append(f"| {r['mode']} | " + " | ".join(f"{r['tokens_per_forward_by_task'][n]:.2f}" for n in names)
                     + " |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- editing


def _fill(net: NLDTransformer, cache, block: torch.Tensor, fill: torch.Tensor, threshold: float,
          first: list[int] | None = None) -> int:
    """Denoise the masked slots of `block` [T] (`fill` [T] bool: the slots that may be written) in place: each
    pass commits every masked slot whose top-1 confidence is >= threshold, and at least the best one. Passes read
    the cache and never write it. Returns the number of passes."""
    mask_id = net.config.mask_token_id
    passes = 0
    while bool((fill & (block == mask_id)).any()):
        logits = net(block[None], mask="bidirectional", cache=cache)[0].float()
        logits[:, mask_id] = float("-inf")
        if first is not None:
            allowed = torch.zeros(logits.shape[-1], dtype=torch.bool, device=logits.device)
            allowed[first] = True
            logits[0, ~allowed] = float("-inf")
        conf, pred = logits.softmax(-1).max(-1)
        open_ = fill & (block == mask_id)
        conf = torch.where(open_, conf, torch.full_like(conf, -1.0))
        take = open_ & (conf >= threshold)
        take[int(conf.argmax())] = True
        block[take] = pred[take]
        passes += 1
    return passes


def _prefilled(net: NLDTransformer, prefix: list[int], extra: int):
    cache = net.new_cache(1, capacity=len(prefix) + extra + 8)
    net(torch.tensor([prefix], device=net.device), mask="causal", cache=cache)
    cache.commit(len(prefix))
    return cache


@torch.no_grad()
def infill_tokens(net: NLDTransformer, prefix: list[int], suffix: list[int], budget: int, threshold: float = 0.9,
                  first: list[int] | None = None, window: int = 6) -> tuple[list[int], int]:
    """(middle tokens, forward passes) of a hole of at most `budget` tokens between `prefix` and `suffix`.

    The contract: the cache holds the causal prefix; one block `[MASK x N] + suffix` at the positions after it,
    bidirectional over itself and the cache; the suffix never changes; masks are filled over passes (commit
    confidence >= threshold, at least one per pass); pad tokens in the filled slots are dropped. N starts at
    `window` (0: the budget) and doubles, up to the budget, while the model writes no pad in the hole. `first`:
    the only tokens the first slot may take (token healing: the caller took a trailing space token off the prefix
    and gave the hole one more slot, see `NLDTokenizer.heal_trailing_space`).
    """
    pad = net.config.pad_token_id
    cache = _prefilled(net, prefix, budget + len(suffix))
    size, passes = (min(window, budget) if window else budget), 1
    while True:
        block = torch.tensor([net.config.mask_token_id] * size + list(suffix), device=net.device)
        fill = torch.arange(block.numel(), device=net.device) < size
        passes += _fill(net, cache, block, fill, threshold, first)
        middle = block[:size].tolist()
        if size == budget or pad in middle:
            return [t for t in middle if t != pad], passes
        size = min(2 * size, budget)


@torch.no_grad()
def revise_tokens(net: NLDTransformer, prompt: list[int], draft: list[int], knob: float = 0.9, rounds: int = 4,
                  threshold: float = 0.9, open_end: bool = True) -> tuple[list[int], int, int]:
    """(revised draft, forward passes, tokens remasked over all rounds).

    The contract: the cache holds the prompt; the block is the draft and one mask slot after it (its open end,
    never written), bidirectional; each round, the draft tokens where the model's top prediction differs from
    the present token with confidence >= `knob` are remasked and refilled by denoising; at most `rounds` rounds
    (a round that changes nothing ends it).

    `open_end=False` drops the mask slot (the block is the draft alone: the ablation of docs/editing.md). With
    every token visible, the last tokens of the block see exactly what the causal stream sees at the same
    positions, where a model trained with the AR loss predicts the *next* token; the open end tells them apart.
    """
    mask_id = net.config.mask_token_id
    cache = _prefilled(net, prompt, len(draft) + 1)
    block = torch.tensor(list(draft) + [mask_id] * open_end, device=net.device)
    editable = torch.arange(block.numel(), device=net.device) < len(draft)
    forwards, remasked = 1, 0
    for _ in range(rounds):
        logits = net(block[None], mask="bidirectional", cache=cache)[0].float()
        forwards += 1
        logits[:, mask_id] = float("-inf")
        conf, pred = logits.softmax(-1).max(-1)
        wrong = (pred != block) & (conf >= knob) & editable
        if not bool(wrong.any()):
            break
        block[wrong] = mask_id
        remasked += int(wrong.sum())
        forwards += _fill(net, cache, block, wrong, threshold)
    return block[: len(draft)].tolist(), forwards, remasked


EDIT_TASKS = ("copy", "reverse", "sort")


def _pieces(answer: str) -> list[str]:
    """The answer's items, each with the space before it: '1 2 3' -> ['1', ' 2', ' 3']."""
    items = answer.split(" ")
    return [items[0]] + [" " + it for it in items[1:]]


def _other_item(item: str, rng: random.Random) -> str:
    pool = string.digits if item.isdigit() else string.ascii_lowercase
    return rng.choice([c for c in pool if c != item])


def evaluate_editing(tm: TriMode, tasks: tuple[str, ...] | list[str] = EDIT_TASKS, n: int = 30, seed: int = 0,
                     budget: int = 32, threshold: float = 0.9, knob: float = 0.9, rounds: int = 4,
                     split: str = "heldout", open_end: bool = True, window: int = 6) -> list[dict]:
    """One row per task: infill accuracy (a hole of 1 or 2 items, `budget` slots), revision fix rate (one item
    replaced by another), the tokens revision remasked, right answers kept by revision, and the forward passes
    (prefill counted). Deterministic."""
    if tm.tokenizer is None or tm.config.pad_token_id is None:
        raise ValueError("editing evaluation needs a tokenizer and a pad token")
    net, tok = tm.net, tm.tokenizer

    def enc(text: str) -> list[int]:
        return tok.tok.encode(text, add_special_tokens=False).ids if text else []

    rows = []
    for name in tasks:
        items = load_tasks(name, n, seed, split)
        infill_ok = infill_after_space = fixed = kept = 0
        infill_fw = revise_fw = remasked = remasked_right = 0
        for i, task in enumerate(items):
            rng = random.Random(f"editing:{seed}:{name}:{i}")
            prompt = enc(prompt_text(tm, task))
            pieces = _pieces(task.answer)
            size = min(rng.choice((1, 2)), len(pieces))
            at = rng.randrange(len(pieces) - size + 1)
            before, after = "".join(pieces[:at]), "".join(pieces[at + size :])
            # A hole that ends the answer has the suffix [EOS] (the text ends there): an empty suffix would make the
            # block plain diffusion decoding, which writes the answer's end and EOS, not pads.
            suffix = enc(after) if after else [tm.config.eos_token_id]
            got, fw = infill_tokens(net, prompt + enc(before), suffix, budget, threshold, window=window)
            infill_ok += before + tok.decode(got) + after == task.answer
            infill_fw += fw
            if before:  # the same hole cut after the space: "1 2 " | "3 4" | " 7 9", with token healing as tm.infill
                cut = prompt + enc(before + " ")
                heal = tok.heal_trailing_space(cut)
                if heal is None:
                    got, _ = infill_tokens(net, cut, suffix, budget, threshold, window=window)
                    middle = tok.decode(got)
                else:
                    got, _ = infill_tokens(net, heal[0], suffix, budget + 1, threshold, heal[2], window)
                    middle = tok.decode(got)[len(heal[1]) :]
                infill_after_space += before + " " + middle + after == task.answer
            else:
                infill_after_space += before + tok.decode(got) + after == task.answer

            k = rng.randrange(len(pieces))
            item = pieces[k].strip()
            wrong = pieces[:k] + [pieces[k].replace(item, _other_item(item, rng))] + pieces[k + 1 :]
            out, fw, changed = revise_tokens(net, prompt, enc("".join(wrong)), knob, rounds, threshold, open_end)
            fixed += tok.decode(out) == task.answer
            revise_fw += fw
            remasked += changed
            out, _, changed = revise_tokens(net, prompt, enc(task.answer), knob, rounds, threshold, open_end)
            kept += tok.decode(out) == task.answer
            remasked_right += changed
        rows.append({"task": name, "items": n, "infill_accuracy": infill_ok / n, "infill_forwards": infill_fw / n,
                     "infill_accuracy_after_space": infill_after_space / n,
                     "revision_fix_rate": fixed / n, "revision_forwards": revise_fw / n,
                     "revision_remasked": remasked / n, "revision_kept": kept / n,
                     "revision_remasked_right": remasked_right / n})
    return rows


def evaluate_templates(tm: TriMode, tasks: tuple[str, ...] | list[str] = EDIT_TASKS, n: int = 30, seed: int = 0,
                       window: int = 6) -> list[dict]:
    """Templates through `tm.fill`: the answer with two of its items (not next to each other) as holes, after the
    chat prompt; right = the filled answer. Two ways to size a hole: `[[hole]]` (8 tokens, the model decides the
    length) and `[[hole:N]]` with N the item's own token count."""
    rows = []
    for name in tasks:
        free = exact = 0
        items = load_tasks(name, n, seed, "heldout")
        for i, task in enumerate(items):
            rng = random.Random(f"template:{seed}:{name}:{i}")
            words = task.answer.split(" ")
            first = rng.randrange(len(words) - 2)
            second = rng.randrange(first + 2, len(words))
            prompt = prompt_text(tm, task)
            for sized in (False, True):
                parts = [(f"[[hole:{len(tm.encode(w))}]]" if sized else "[[hole]]") if k in (first, second) else w
                         for k, w in enumerate(words)]
                r = tm.fill(prompt + " ".join(parts), hole_window=window)
                ok = r.text == prompt + task.answer
                exact += ok and sized
                free += ok and not sized
        rows.append({"task": name, "items": n, "free": free / n, "sized": exact / n})
    return rows


SUFFIX_LENGTHS = (8, 12, 16, 24, 32, 40)


@torch.no_grad()
def evaluate_suffix_span(tm: TriMode, n: int = 200, seed: int = 0, window: int = 6) -> list[dict]:
    """How the middle uses a suffix that spans more than one training block. Held-out standard-library source
    (text the editing stage trained on): a one- or two-word hole, the 96 tokens before it as prefix, the next S
    tokens (S in SUFFIX_LENGTHS) as suffix, either whole in the block (the contract) or cut so that the window
    and the suffix fit one training block (`block_size` tokens). Measured in one pass with every slot of the
    window masked, against the target the model is trained to write there (the hole's tokens, then pads): the
    cross-entropy (nats per slot) and the share of slots whose top prediction is the target. (The bundled model
    fills almost no code hole exactly, so exact match would not tell the two apart.)"""
    from trimode.train.corpus import load_corpus
    from trimode.train.data import split_words

    net, tok = tm.net, tm.tokenizer
    mask_id, pad = tm.config.mask_token_id, tm.config.pad_token_id
    block = tm.config.block_size
    docs = [d.text for d in load_corpus([{"kind": "stdlib", "max_chars": 400_000}], "heldout", seed)]
    rng = random.Random(f"suffix-span:{seed}")
    items = []
    while len(items) < n:
        words = split_words(rng.choice(docs))
        if len(words) < 80:
            continue
        w = rng.choice((1, 2))
        a = rng.randrange(20, len(words) - w - 50)
        middle = tok.encode("".join(words[a : a + w]))
        rest = tok.encode("".join(words[a + w :]))
        if len(rest) >= max(SUFFIX_LENGTHS) and len(middle) <= window:
            items.append((tok.encode("".join(words[:a]))[-96:], middle + [pad] * (window - len(middle)), rest))

    def score(prefix: list[int], target: list[int], suffix: list[int]) -> tuple[float, float]:
        cache = _prefilled(net, prefix, window + len(suffix))
        ids = torch.tensor([[mask_id] * window + suffix], device=net.device)
        logits = net(ids, mask="bidirectional", cache=cache)[0, :window].float()
        want = torch.tensor(target, device=net.device)
        return float(torch.nn.functional.cross_entropy(logits, want)), float((logits.argmax(-1) == want).float().mean())

    rows = []
    for length in SUFFIX_LENGTHS:
        cut_to = min(length, block - window)
        whole = [score(p, t, r[:length]) for p, t, r in items]
        cut = [score(p, t, r[:cut_to]) for p, t, r in items]
        rows.append({"suffix_tokens": length, "block_tokens": window + length, "cut_to": cut_to,
                     "whole_ce": sum(c for c, _ in whole) / n, "whole_top1": sum(a for _, a in whole) / n,
                     "cut_ce": sum(c for c, _ in cut) / n, "cut_top1": sum(a for _, a in cut) / n})
    return rows


def markdown_editing_table(rows: list[dict]) -> str:
    lines = ["| task | infill accuracy | cut after the space | forwards / infill | revision fix rate | "
             "forwards / revision | tokens remasked / revision | right answers kept | tokens remasked / right answer |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['task']} | {100 * r['infill_accuracy']:.0f}% | "
                     f"{100 * r['infill_accuracy_after_space']:.0f}% | {r['infill_forwards']:.1f} | "
                     f"{100 * r['revision_fix_rate']:.0f}% | {r['revision_forwards']:.1f} | "
                     f"{r['revision_remasked']:.1f} | {100 * r['revision_kept']:.0f}% | "
                     f"{r['revision_remasked_right']:.1f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m trimode.train.evaluate", description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="checkpoint directory (default: the bundled model)")
    ap.add_argument("--n", type=int, default=100, help="held-out items per task (default 100)")
    ap.add_argument("--tasks", default=",".join(DEFAULT_TASKS), help=f"comma-separated, from {', '.join(TASKS)}")
    ap.add_argument("--modes", default=None,
                    help="comma-separated labels to keep, e.g. ar,diffusion@0.9,linear_spec+drafter (default: all)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the held-out items (default 0)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    ap.add_argument("--device", default=None, help="cpu / cuda (default: cuda when available)")
    ap.add_argument("--no-baseline", action="store_true", help="leave out the most-frequent-answer row")
    ap.add_argument("--progress", action="store_true", help="print progress to stderr")
    ap.add_argument("--editing", action="store_true",
                    help="evaluate infill and revision on copy / reverse / sort instead of the modes")
    ap.add_argument("--suffix-span", action="store_true",
                    help="--editing: infill in held-out library source with suffixes longer than a training block")
    ap.add_argument("--hole-budget", type=int, default=32,
                    help="--editing: infill budget, max_new_tokens (default 32, as tm.infill)")
    ap.add_argument("--hole-window", type=int, default=6,
                    help="--editing: infill holes start this long and double while filled (default 6, as tm.infill)")
    ap.add_argument("--threshold", type=float, default=0.9, help="--editing: denoising threshold (default 0.9)")
    ap.add_argument("--revise-knob", type=float, default=0.9,
                    help="--editing: confidence needed to remask a token in revision (default 0.9, as tm.revise)")
    ap.add_argument("--revise-rounds", type=int, default=4, help="--editing: revision rounds (default 4, as tm.revise)")
    ap.add_argument("--revise-closed", action="store_true",
                    help="--editing: revise the draft alone, without the mask slot after it (an ablation)")
    args = ap.parse_args(argv)

    import trimode

    try:
        if args.n < 1:
            raise ValueError("--n must be >= 1")
        if args.threads is not None:
            torch.set_num_threads(args.threads)
        tm = trimode.load(args.model, device=args.device)
        if args.editing:
            return _main_editing(tm, args)
        names = [t for t in args.tasks.split(",") if t]
        unknown = [t for t in names if t not in TASKS]
        if unknown:
            raise ValueError(f"unknown task(s) {', '.join(unknown)}; known: {', '.join(TASKS)}")
        modes = [m for m in DEFAULT_MODES if not m.get("use_drafter") or tm.has_drafter]
        if args.modes:
            wanted = args.modes.split(",")
            labels = {mode_label(m): m for m in DEFAULT_MODES}
            bad = [w for w in wanted if w not in labels]
            if bad:
                raise ValueError(f"unknown mode label(s) {', '.join(bad)}; known: {', '.join(labels)}")
            modes = [labels[w] for w in wanted]
        items = resolve_tasks(names, args.n, args.seed)
        rows = evaluate_modes(tm, items, modes, progress=args.progress)
    except (ValueError, OSError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    where = tm.path if tm.path is not None else "(in memory)"
    print(f"model {where}: {sum(p.numel() for p in tm.net.parameters()) / 1e6:.2f}M parameters, "
          f"block_size {tm.config.block_size}, drafter {'yes' if tm.has_drafter else 'no'}; "
          f"{args.n} held-out items per task (seed {args.seed}), greedy; "
          f"{tm.net.device.type}, {torch.get_num_threads()} torch thread(s), "
          f"{platform.processor() or platform.machine()}")
    print()
    print(markdown_table(rows, None if args.no_baseline else majority_baseline(items, args.seed)))
    print()
    print("Tokens per forward by task (prefill counted):")
    print()
    print(markdown_tpf_table(rows))
    return 0


def _main_editing(tm: TriMode, args) -> int:
    names = [t for t in args.tasks.split(",") if t] if args.tasks != ",".join(DEFAULT_TASKS) else list(EDIT_TASKS)
    bad = [t for t in names if t not in EDIT_TASKS]
    if bad:
        raise ValueError(f"--editing evaluates {', '.join(EDIT_TASKS)}, not {', '.join(bad)}")
    start = time.perf_counter()
    if args.suffix_span:
        rows = evaluate_suffix_span(tm, args.n, args.seed, args.hole_window)
        print(f"model {tm.path}: {args.n} one- or two-word holes in held-out standard-library source (seed "
              f"{args.seed}), the 96 tokens before as prefix; window {args.hole_window} (all masked, one pass), "
              f"training block {tm.config.block_size}; {time.perf_counter() - start:.0f}s")
        print()
        print("| suffix tokens | block (window + suffix) | whole suffix: CE / top-1 | suffix cut to one block: CE / "
              "top-1 |")
        print("|---|---|---|---|")
        for r in rows:
            print(f"| {r['suffix_tokens']} | {r['block_tokens']} | {r['whole_ce']:.2f} / {100 * r['whole_top1']:.0f}% "
                  f"| {r['cut_ce']:.2f} / {100 * r['cut_top1']:.0f}% (first {r['cut_to']} tokens) |")
        return 0
    rows = evaluate_editing(tm, names, args.n, args.seed, args.hole_budget, args.threshold, args.revise_knob,
                            args.revise_rounds, open_end=not args.revise_closed, window=args.hole_window)
    where = tm.path if tm.path is not None else "(in memory)"
    block = " (revision block: the draft alone, no open end)" if args.revise_closed else ""
    print(f"model {where}: {args.n} held-out items per task (seed {args.seed}); infill: a 1- or 2-item hole, "
          f"{args.hole_budget} slots (window {args.hole_window}), threshold {args.threshold}; revision: one wrong "
          f"item, knob {args.revise_knob}, {args.revise_rounds} rounds{block}; {torch.get_num_threads()} torch "
          f"thread(s), "
          f"{time.perf_counter() - start:.0f}s")
    print()
    print(markdown_editing_table(rows))
    print()
    print("Templates (`tm.fill`): two items of the answer as holes")
    print()
    print("| task | holes `[[hole]]` (8 tokens) | holes `[[hole:N]]` (the item's length) |")
    print("|---|---|---|")
    for r in evaluate_templates(tm, names, args.n, args.seed, args.hole_window):
        print(f"| {r['task']} | {100 * r['free']:.0f}% | {100 * r['sized']:.0f}% |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
