"""Task accuracy and speed of one model in every decoding mode (the model card's table).

    python -m trimode.train.evaluate --model DIR --n 100

For each mode configuration (AR; diffusion at thresholds 0.5 / 0.7 / 0.9; linear self-speculation without and
with the LoRA drafter; quadratic self-speculation) every held-out task item is generated greedily and checked;
a row reports accuracy per task and overall, tokens per forward pass (all generated tokens / all forward passes,
prefill included, from `result.stats`; and excluding the prefill: generated / (forward passes - 1 per item), as
`trimode bench quality` reports it) and tokens per second. A first row gives a baseline a model gets without
reading the question: always answering the most frequent answer of the task's training split.

Chat items are wrapped in the model's chat template (when it has one); raw-completion items are fed as is.

`--structured` evaluates JSON under a schema and tool calls per mode instead (`trimode.train.evaluate_structured`).

`--editing` evaluates the editing skills instead (`evaluate_editing`), on held-out copy / reverse / sort items
(`trimode.tasks.edits` cuts them), through `tm.infill` and `tm.revise`, greedy:
- infill: a hole of one or two items of the answer (the suffix of a hole at the end of the answer is [EOS]);
  right = prefix + middle + suffix is the answer. The hole is cut before the space of its first item
  ("1 2" | " 3 4" | " 7 9"), and again after it ("1 2 " | "3 4" | " 7 9", the "cut after the space" column,
  where `tm.infill` heals the prefix's trailing space token into the hole's first slot);
- revision: one item of the answer replaced by another item (a digit by another digit, a letter by another
  letter), revised with no spans given (the model finds what to rewrite); fixed = the answer. Right answers are
  revised too: kept = unchanged.
"""

from __future__ import annotations

import argparse
import platform
import random
import sys
import time
from collections import Counter

import torch

from trimode.api import TriMode, load
from trimode.tasks import EDIT_TASKS, TASKS, Task, cut_hole, load_tasks, prompt_text, wrong_draft
from trimode.tasks.edits import Hole
from trimode.train.corpus import load_corpus
from trimode.train.data import split_words
from trimode.train.evaluate_structured import evaluate_structured, markdown_schema_by_task, markdown_structured_table

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
    prompts = [prompt_text(t, tm.tokenizer) for t in items]
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


def evaluate_editing(tm: TriMode, tasks: tuple[str, ...] | list[str] = EDIT_TASKS, n: int = 30, seed: int = 0,
                     budget: int = 32, threshold: float = 0.9, knob: float = 0.9, rounds: int = 4,
                     split: str = "heldout", window: int = 6) -> list[dict]:
    """One row per task: infill accuracy (a hole of 1 or 2 items, `budget` slots), revision fix rate (one item
    replaced by another), the tokens revision remasked, right answers kept by revision, and the forward passes
    (prefill counted). Deterministic: `tm.infill` and `tm.revise`, greedy."""
    if tm.tokenizer is None or tm.config.pad_token_id is None:
        raise ValueError("editing evaluation needs a tokenizer and a pad token")
    rows = []
    for name in tasks:
        counts: Counter[str] = Counter()
        for i, task in enumerate(load_tasks(name, n, seed, split)):
            rng = random.Random(f"editing:{seed}:{name}:{i}")
            prompt = tm.encode(prompt_text(task, tm.tokenizer))
            counts += _infill_counts(tm, prompt, task.answer, cut_hole(task.answer, rng), budget, threshold, window)
            counts += _revise_counts(tm, prompt, task.answer, wrong_draft(task.answer, rng), knob, rounds, threshold)
        rows.append({"task": name, "items": n, "infill_accuracy": counts["infill_ok"] / n,
                     "infill_forwards": counts["infill_fw"] / n,
                     "infill_accuracy_after_space": counts["infill_after_space"] / n,
                     "revision_fix_rate": counts["fixed"] / n, "revision_forwards": counts["revise_fw"] / n,
                     "revision_remasked": counts["remasked"] / n, "revision_kept": counts["kept"] / n,
                     "revision_remasked_right": counts["remasked_right"] / n})
    return rows


def _infill_counts(tm: TriMode, prompt: list[int], answer: str, hole: Hole, budget: int, threshold: float,
                   window: int) -> Counter[str]:
    """The hole cut before the space of its first item ("1 2" | " 3 4" | " 7 9"), then after it ("1 2 " | "3 4" |
    " 7 9": `tm.infill` heals the prefix's trailing space token into the hole's first slot)."""
    knobs = {"max_new_tokens": budget, "threshold": threshold, "hole_window": window}
    before, after = hole.head, hole.tail
    # A hole that ends the answer has the suffix [EOS] (the text ends there): an empty suffix would make the
    # block plain diffusion decoding, which writes the answer's end and EOS, not pads.
    suffix = tm.encode(after) if after else [tm.config.eos_token_id]
    r = tm.infill(prompt + tm.encode(before), suffix, **knobs)
    ok = before + r.text + after == answer
    after_space = ok
    if before:
        cut = tm.infill(prompt + tm.encode(before + " "), suffix, heal=True, **knobs)
        after_space = before + " " + cut.text + after == answer
    return Counter(infill_ok=ok, infill_fw=r.stats.forward_passes, infill_after_space=after_space)


def _revise_counts(tm: TriMode, prompt: list[int], answer: str, draft: str, knob: float, rounds: int,
                   threshold: float) -> Counter[str]:
    """A wrong draft revised (fixed?), and the right answer revised (kept?). Every token revision remasks is
    refilled once, so the tokens the fill passes commit are the tokens remasked."""
    knobs = {"threshold": threshold, "rounds": rounds, "revise_threshold": knob}
    wrong = tm.revise(prompt, tm.encode(draft), **knobs)
    right = tm.revise(prompt, tm.encode(answer), **knobs)
    return Counter(fixed=wrong.text == answer, revise_fw=wrong.stats.forward_passes,
                   remasked=sum(wrong.stats.step_commits), kept=right.text == answer,
                   remasked_right=sum(right.stats.step_commits))


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
            prompt = prompt_text(task, tm.tokenizer)
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
        cache = net.new_cache(1, capacity=len(prefix) + window + len(suffix) + 8)
        net(torch.tensor([prefix], device=net.device), mask="causal", cache=cache)
        cache.commit(len(prefix))
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
    ap.add_argument("--structured", action="store_true",
                    help="JSON under a schema and tool calls per mode instead (trimode.train.evaluate_structured)")
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
    args = ap.parse_args(argv)

    try:
        if args.n < 1:
            raise ValueError("--n must be >= 1")
        if args.threads is not None:
            torch.set_num_threads(args.threads)
        tm = load(args.model, device=args.device)
        if args.editing:
            return _main_editing(tm, args)
        if args.structured:
            return _main_structured(tm, args)
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


def _main_structured(tm: TriMode, args) -> int:
    start = time.perf_counter()
    rows = evaluate_structured(tm, args.n, args.seed, progress=args.progress)
    where = tm.path if tm.path is not None else "(in memory)"
    print(f"model {where}: {args.n} held-out items per task (arithmetic, copy, reverse, sort) and kind (seed "
          f"{args.seed}), greedy; {torch.get_num_threads()} torch thread(s), {time.perf_counter() - start:.0f}s")
    print()
    print(markdown_structured_table(rows))
    print()
    print("Accuracy under the schema by task:")
    print()
    print(markdown_schema_by_task(rows))
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
                            args.revise_rounds, window=args.hole_window)
    where = tm.path if tm.path is not None else "(in memory)"
    print(f"model {where}: {args.n} held-out items per task (seed {args.seed}); infill: a 1- or 2-item hole, "
          f"{args.hole_budget} slots (window {args.hole_window}), threshold {args.threshold}; revision: one wrong "
          f"item, knob {args.revise_knob}, {args.revise_rounds} rounds; {torch.get_num_threads()} torch "
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
