"""`trimode bench sol`: the speed-of-light (SOL) analysis of block diffusion (spec 2.6) on held-out task items.

Per item the prompt (chat-templated) is prefilled causally; then block after block, from the same causal prefix:
- target: serial denoising of an all-mask block (each pass commits the single most confident masked slot);
  this defines the block's target tokens; the target block is then written to the cache (causal refresh) and
  is the prefix of the next block, until a block holds an EOS or the item's budget is reached;
- greedy oracle: each pass commits every masked slot whose argmax equals the target (no match: the target
  token at the most confident slot, a forced commit, counted);
- compaction: recursive dynamic compaction: each pass ranks the matches by confidence and commits the largest
  prefix from which the greedy oracle (no forced commits) still reaches the target (binary search, each
  candidate checked by simulation); at most `cap` forwards per block (the paper's 5,000), after which the block
  is finished by the greedy oracle and counted as capped;
- each real rule (threshold t, learned sampler t) run on the same all-mask block from the same prefix: its
  passes, and whether it reached the target.
SOL passes of a block = the fewest passes of any path found that reaches the target: the greedy oracle, the
compaction search, and every rule run that reached the target. A rule that reaches the target commits, at each
pass, only slots whose argmax equals the target, so its path is one of the paths the bound ranges over; taking
the minimum makes the bound hold for it by construction (the search is a heuristic, not a proof of optimality;
`rule_beat_search` counts the blocks where a rule's path was shorter than the search's). A rule that does not
reach the target decodes different tokens: its tokens per forward on its own output can exceed the SOL figure
of the target, and is reported as such, beside its figure on the blocks where it reached the target.

Tokens per forward (TPF) here = block tokens / denoising passes (all-mask blocks of B tokens, no seed, refresh
not counted). The end-to-end rows are real decodes (`TriMode.generate`, diffusion with its seed and refresh,
linear_spec): tokens per decode forward = generated / (forwards - prefill), accuracy by the item's checker.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from trimode.bench.quality import load_items
from trimode.decode.diffusion import Context, Schedule, denoise_block, new_block
from trimode.decode.driver import run_forward
from trimode.decode.sampling import SamplingParams, confidence
from trimode.decode.stats import DecodeStats
from trimode.decode.step import Forward
from trimode.decode.stopping import StopRule
from trimode.decode.transfer import commit_by_threshold, masked_confidence
from trimode.decode.unmask import LearnedRule
from trimode.tasks import prompt_text

FORWARD_CAP = 5000
GREEDY = SamplingParams()


class DeadEnd(Exception):
    """The greedy oracle without forced commits found no masked slot whose argmax is the target."""


class CapHit(Exception):
    """The compaction search used its forwards."""


@dataclass
class Counter:
    cap: int | None = None
    n: int = 0

    def tick(self) -> None:
        self.n += 1
        if self.cap is not None and self.n > self.cap:
            raise CapHit


def serial_rule(conf, masked, logits, proposal):
    return commit_by_threshold(conf, masked, 2.0)  # no probability reaches 2: the single most confident slot


def threshold_rule(t: float):
    return lambda conf, masked, logits, proposal: commit_by_threshold(conf, masked, t)


def oracle_rule(target: torch.Tensor, force: bool):
    """Every masked slot whose proposal equals the target; none: force the target at the most confident slot
    (counted in `rule.forced`), or raise DeadEnd when `force` is off."""

    def rule(conf, masked, logits, proposal):
        transfer = masked & (proposal == target)
        if not transfer.any():
            if not force:
                raise DeadEnd
            best = int(conf[0].argmax())
            proposal[0, best] = target[0, best]  # the oracle knows the target: it writes it
            transfer[0, best] = True
            rule.forced += 1
        return transfer

    rule.forced = 0
    return rule


def run_block(net, cache, block, masked, positions, rule, counter: Counter | None = None) -> int:
    """Denoise `block` (in place) from its state with `rule` through diffusion's `denoise_block`; the passes."""
    length = block.shape[1]
    mask_id = net.config.mask_token_id
    ctx = Context(GREEDY, [[]], [[None] * length])
    gen = denoise_block(block, masked, positions, 0, Schedule.of(length, None, None, None, rule), ctx, mask_id,
                        None, False, StopRule(length), [[]], [0], DecodeStats("sol"))
    reply = None
    while True:
        try:
            op = gen.send(reply)
        except StopIteration as done:
            return done.value[1]
        reply = None
        if isinstance(op, Forward):
            if counter is not None:
                counter.tick()
            reply = run_forward(net, cache, op)


def fresh(net, length: int, device):
    return new_block(1, length, net.config.mask_token_id, None, None, 0, [[]], device)


def reaches(net, cache, block, masked, positions, target, counter) -> bool:
    """Whether the greedy oracle without forced commits reaches the target from this state."""
    if not masked.any():
        return bool((block == target).all())
    try:
        run_block(net, cache, block.clone(), masked.clone(), positions, oracle_rule(target, False), counter)
    except DeadEnd:
        return False
    return True


def _commit(state, k: int):
    """The block and its undecided slots after committing the `k` best-ranked matches."""
    block, masked, proposal, order = state
    b, m = block.clone(), masked.clone()
    b[0, order[:k]] = proposal[0, order[:k]]
    m[0, order[:k]] = False
    return b, m


def compaction(net, cache, positions, target, cap: int) -> tuple[int, bool]:
    """Recursive dynamic compaction on an all-mask block: (passes to the target, whether the cap was hit)."""
    block, masked = fresh(net, target.shape[1], target.device)
    counter = Counter(cap)
    passes = 0
    try:
        while masked.any():
            counter.tick()
            logits = run_forward(net, cache, Forward(block.clone(), mask="bidirectional", positions=positions))
            proposal = logits.argmax(-1)
            conf = masked_confidence(confidence(logits, proposal), masked)
            match = masked & (proposal == target)
            order = [int(i) for i in conf[0].argsort(descending=True) if match[0, i]]
            passes += 1
            if not order:  # as the greedy oracle: the target at the most confident slot
                order = [int(conf[0].argmax())]
                proposal[0, order[0]] = target[0, order[0]]

            state = (block, masked, proposal, order)
            k = len(order)
            if k > 1 and not reaches(net, cache, *_commit(state, k), positions, target, counter):
                lo, hi = 1, k - 1  # the largest feasible prefix; 1 when none is (the best match alone)
                while lo < hi:
                    mid = (lo + hi + 1) // 2
                    if reaches(net, cache, *_commit(state, mid), positions, target, counter):
                        lo = mid
                    else:
                        hi = mid - 1
                k = lo
            block, masked = _commit(state, k)
    except CapHit:
        return passes + run_block(net, cache, block, masked, positions, oracle_rule(target, True)), True
    return passes, False


@dataclass
class RuleFigures:
    blocks: int = 0
    passes: int = 0
    reached: int = 0
    passes_reached: int = 0  # passes over the blocks where the rule reached the target
    sol_passes_reached: int = 0  # SOL passes over those same blocks


@dataclass
class SolRun:
    block_length: int
    blocks: int = 0
    serial_passes: int = 0
    greedy_passes: int = 0
    greedy_forced: int = 0
    compaction_passes: int = 0
    sol_passes: int = 0
    capped_blocks: int = 0
    rule_beat_search: int = 0
    rules: dict[str, RuleFigures] = field(default_factory=dict)

    def tpf(self, passes: int, blocks: int | None = None) -> float:
        return (self.blocks if blocks is None else blocks) * self.block_length / passes if passes else 0.0


@torch.no_grad()
def analyse_item(net, ids: list[int], budget: int, rules: dict, run: SolRun, cap: int) -> None:
    """Add one item's blocks to `run` (see the module docstring)."""
    dev, length = net.device, run.block_length
    blocks = -(-budget // length)
    cache = net.new_cache(1, len(ids) + (blocks + 1) * length)
    prompt = torch.tensor([ids], device=dev)
    run_forward(net, cache, Forward(prompt, mask="causal", cache="append", logits="last"))
    eos = {net.config.eos_token_id}
    for b in range(blocks):
        start = len(ids) + b * length
        positions = torch.arange(start, start + length, device=dev)
        target, masked = fresh(net, length, dev)
        run.serial_passes += run_block(net, cache, target, masked, positions, serial_rule)
        greedy = oracle_rule(target, True)
        block, masked = fresh(net, length, dev)
        greedy_passes = run_block(net, cache, block, masked, positions, greedy)
        compact_passes, capped = compaction(net, cache, positions, target, cap)
        best_search = min(greedy_passes, compact_passes)
        sol = best_search
        outcomes = {}
        for name, rule in rules.items():
            block, masked = fresh(net, length, dev)
            passes = run_block(net, cache, block, masked, positions, rule)
            outcomes[name] = (passes, bool((block == target).all()))
            if outcomes[name][1]:
                sol = min(sol, passes)
        run.rule_beat_search += sol < best_search
        for name, (passes, reached) in outcomes.items():
            f = run.rules.setdefault(name, RuleFigures())
            f.blocks += 1
            f.passes += passes
            if reached:
                f.reached += 1
                f.passes_reached += passes
                f.sol_passes_reached += sol
        run.blocks += 1
        run.greedy_passes += greedy_passes
        run.greedy_forced += greedy.forced
        run.compaction_passes += compact_passes
        run.sol_passes += sol
        run.capped_blocks += capped
        run_forward(net, cache, Forward(target.clone(), mask="causal", positions=positions, cache="append"))
        if eos & set(target[0].tolist()):
            break


def end_to_end(tm, items, configs: dict[str, dict]) -> dict[str, dict]:
    """Real decodes of every item per config: tokens per decode forward, accuracy, acceptance."""
    out = {}
    for name, knobs in configs.items():
        gen = fwd = correct = 0
        acceptance: list[int] = []
        for item in items:
            r = tm.generate(prompt_text(item, tm.tokenizer), max_new_tokens=getattr(item, "max_new_tokens", 32),
                            **knobs)
            gen += r.stats.generated_tokens
            fwd += r.stats.forward_passes - r.stats.prefill_passes
            correct += bool(item.check(r.text))
            acceptance += r.stats.acceptance
        out[name] = {"tokens_per_decode_forward": gen / fwd if fwd else 0.0, "accuracy": correct / len(items),
                     "n": len(items)}
        if acceptance:
            out[name]["tokens_per_cycle"] = sum(acceptance) / len(acceptance)
    return out


def run(model: str | None = None, tasks: list[str] | None = None, n: int = 8, thresholds: list[float] | None = None,
        learned: list[float] | None = None, block_length: int | None = None, cap: int = FORWARD_CAP, seed: int = 0,
        json_path: Path | None = None, plot: Path | None = None, progress=None) -> tuple[str, dict]:
    """The SOL table of a model (default the bundled one) on `n` held-out items per task."""
    import trimode
    from trimode.tasks import plain_tasks

    if n < 1 or cap < 1:
        raise ValueError("--items and --cap must be >= 1")
    thresholds = [0.5, 0.7, 0.9] if thresholds is None else thresholds
    if any(not 0 <= t <= 1 for t in thresholds + (learned or [])):
        raise ValueError("thresholds must be in [0, 1]")
    tm = trimode.load(model)
    if tm.tokenizer is None:
        raise ValueError(f"the model at {tm.path} has no tokenizer.json; the task items are text")
    sampler = tm.net.sampler
    learned = ([0.3, 0.5, 0.7] if sampler is not None else []) if learned is None else learned
    if learned and sampler is None:
        raise ValueError(f"the model at {tm.path} has no sampler/: no learned rule to measure")
    length = block_length or tm.config.block_size
    rules = {f"threshold {t:g}": threshold_rule(t) for t in thresholds}
    rules |= {f"learned {t:g}": LearnedRule(sampler, t) for t in learned}
    items = [it for name in (tasks or sorted(plain_tasks())) for it in load_items(name, n, seed)]
    sol = SolRun(length)
    for i, item in enumerate(items):
        ids = tm.encode(prompt_text(item, tm.tokenizer))
        analyse_item(tm.net, ids, getattr(item, "max_new_tokens", 32), rules, sol, cap)
        if progress is not None:
            progress(i + 1, len(items))
    configs = {f"diffusion threshold {t:g}": {"mode": "diffusion", "threshold": t, "block_length": length}
               for t in thresholds}
    configs |= {f"diffusion learned {t:g}": {"mode": "diffusion", "unmask": "learned", "threshold": t,
                                             "block_length": length} for t in learned}
    configs["linear_spec"] = {"mode": "linear_spec", "block_length": length}
    real = end_to_end(tm, items, configs)
    result = figures(sol, real, cap)
    result |= {"model": str(tm.path), "items": len(items), "tasks": tasks or sorted(plain_tasks())}
    if json_path is not None:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(result, indent=2) + "\n")
    if plot is not None:
        plot_sol(result, plot)
    return render(result), result


def figures(sol: SolRun, real: dict, cap: int) -> dict:
    rules = {}
    for name, f in sol.rules.items():
        rules[name] = {
            "tokens_per_forward_own_output": sol.tpf(f.passes, f.blocks), "reached_target": f.reached / f.blocks,
            "tokens_per_forward_on_target": sol.tpf(f.passes_reached, f.reached),
            "sol_on_same_blocks": sol.tpf(f.sol_passes_reached, f.reached)}
    return {"block_length": sol.block_length, "blocks": sol.blocks, "forward_cap": cap,
            "sol_tokens_per_forward": sol.tpf(sol.sol_passes),
            "compaction_tokens_per_forward": sol.tpf(sol.compaction_passes),
            "greedy_oracle_tokens_per_forward": sol.tpf(sol.greedy_passes),
            "serial_tokens_per_forward": sol.tpf(sol.serial_passes), "greedy_forced_commits": sol.greedy_forced,
            "capped_blocks": sol.capped_blocks, "rule_beat_search_blocks": sol.rule_beat_search,
            "rules_on_sol_blocks": rules, "end_to_end": real}


def render(r: dict) -> str:
    lines = [f"Model {r['model']}, {r['items']} held-out items ({', '.join(r['tasks'])}), {r['blocks']} all-mask "
             f"blocks of {r['block_length']}; greedy; compaction cap {r['forward_cap']} forwards per block "
             f"({r['capped_blocks']} blocks hit it).", "",
             "| bound (on the serial target) | tokens per forward |", "|---|---:|",
             f"| serial (target) | {r['serial_tokens_per_forward']:.2f} |",
             f"| greedy oracle ({r['greedy_forced_commits']} forced commits) | "
             f"{r['greedy_oracle_tokens_per_forward']:.2f} |",
             f"| recursive dynamic compaction | {r['compaction_tokens_per_forward']:.2f} |",
             f"| **SOL** (best path found; {r['rule_beat_search_blocks']} blocks from a rule's path) | "
             f"**{r['sol_tokens_per_forward']:.2f}** |", "",
             "| rule on the same blocks | TPF own output | reached target | TPF on target blocks | SOL on those |",
             "|---|---:|---:|---:|---:|"]
    for name, f in r["rules_on_sol_blocks"].items():
        lines.append(f"| {name} | {f['tokens_per_forward_own_output']:.2f} | {f['reached_target']:.0%} | "
                     f"{f['tokens_per_forward_on_target']:.2f} | {f['sol_on_same_blocks']:.2f} |")
    lines += ["", "| end to end (real decode) | tokens per decode forward | accuracy | tokens per cycle |",
              "|---|---:|---:|---:|"]
    for name, f in r["end_to_end"].items():
        cycle = f"{f['tokens_per_cycle']:.2f}" if "tokens_per_cycle" in f else "-"
        lines.append(f"| {name} | {f['tokens_per_decode_forward']:.2f} | {f['accuracy']:.3f} | {cycle} |")
    return "\n".join(lines) + "\n"


def plot_sol(r: dict, path: Path) -> None:
    """Tokens per forward of the bounds and of each rule (own output, on target blocks)."""
    from matplotlib.figure import Figure

    names = ["serial", "greedy oracle", "compaction", "SOL"] + list(r["rules_on_sol_blocks"])
    own = [r["serial_tokens_per_forward"], r["greedy_oracle_tokens_per_forward"],
           r["compaction_tokens_per_forward"], r["sol_tokens_per_forward"]]
    own += [f["tokens_per_forward_own_output"] for f in r["rules_on_sol_blocks"].values()]
    on_target = own[:4] + [f["tokens_per_forward_on_target"] for f in r["rules_on_sol_blocks"].values()]
    fig = Figure(figsize=(8, 4))
    ax = fig.subplots()
    x = range(len(names))
    ax.bar([i - 0.2 for i in x], own, 0.4, label="own output")
    ax.bar([i + 0.2 for i in x], on_target, 0.4, label="blocks reaching the target")
    ax.axhline(r["sol_tokens_per_forward"], color="k", linestyle="--", linewidth=0.8, label="SOL")
    ax.set_xticks(list(x), names, rotation=30, ha="right", fontsize=7)
    ax.set_ylabel("tokens per denoising forward")
    ax.set_title(f"speed of light, block {r['block_length']}: {r['model']}", fontsize=8)
    ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
