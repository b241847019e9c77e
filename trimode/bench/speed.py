"""`trimode bench speed`: decode speed per mode at batch 1, the cost of one forward pass against its token count,
and `transformers` greedy generation on the same weights exported as a causal LM, all measured in one run.

Why a mode wins or loses: its speed relative to AR is (its tokens per forward) x (AR's seconds per pass / its
seconds per pass). The pass-cost table shows the second factor on this machine: on a GPU a 32-token pass
costs about as much as a 1-token pass (both read all weights once), on a CPU it costs many times more.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from trimode.api import TriMode, load
from trimode.bench.timing import machine_name, synchronize, time_per_call
from trimode.decode.modes import names
from trimode.export import export_hf_causal_lm
from trimode.model.static import StaticModel

DEFAULT_TEXT_PROMPT = "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n"
DEFAULT_ID_PROMPT = [1, 17, 42, 99, 3, 250, 7, 64, 128, 5]
TOKEN_COUNTS = (1, 8, 32, 64, 72)


@dataclass
class ModeSpeed:
    mode: str
    knobs: dict
    generated: int
    forward_passes: int
    seconds: float  # median over repeats
    acceptance: float

    @property
    def tokens_per_second(self) -> float:
        return self.generated / self.seconds

    @property
    def tpf(self) -> float:
        return self.generated / self.forward_passes

    @property
    def tpf_excl_prefill(self) -> float:
        return self.generated / (self.forward_passes - 1) if self.forward_passes > 1 else 0.0

    @property
    def seconds_per_pass(self) -> float:
        return self.seconds / self.forward_passes


@dataclass
class HFComparison:
    same_tokens: bool
    first_mismatch: int | None
    trimode_tokens: list[int]
    hf_tokens: list[int]
    trimode_seconds: float
    hf_seconds: float

    @property
    def ratio(self) -> float:
        """trimode AR tok/s over transformers tok/s (tokens are equal when same_tokens)."""
        return (len(self.trimode_tokens) / self.trimode_seconds) / (len(self.hf_tokens) / self.hf_seconds)


def prompt_ids(tm: TriMode, prompt: str | None, ids: list[int] | None) -> list[int]:
    if ids:
        return ids
    if tm.tokenizer is None:
        if prompt is not None:
            raise ValueError("this checkpoint has no tokenizer.json: give --prompt-ids instead of --prompt")
        return [t % tm.config.vocab_size for t in DEFAULT_ID_PROMPT]
    return tm.encode(prompt if prompt is not None else DEFAULT_TEXT_PROMPT)


def decode_speed(tm: TriMode, ids: list[int], mode: str, max_new_tokens: int, repeats: int,
                 ignore_eos: bool = True) -> ModeSpeed:
    """Greedy decode of `ids` in `mode`; the first run warms up and is not timed.

    ignore_eos: generate exactly `max_new_tokens` (EOS id -1 matches no token), so every mode does the same work.
    """
    eos = -1 if ignore_eos else None
    tm.generate(ids, mode=mode, max_new_tokens=max_new_tokens, eos_token_id=eos)
    runs = [tm.generate(ids, mode=mode, max_new_tokens=max_new_tokens, eos_token_id=eos) for _ in range(repeats)]
    r = runs[-1]
    return ModeSpeed(mode, r.knobs, r.stats.generated_tokens, r.stats.forward_passes,
                     statistics.median(x.stats.seconds for x in runs), r.stats.mean_acceptance)


def pass_costs(net, counts: list[int], context: int, iters: int) -> dict[int, float]:
    """Seconds of one bidirectional pass of T tokens over a cache holding `context` tokens, per T."""
    cfg = net.config
    cache = net.new_cache(1, context + max(counts))
    device = net.device
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        net(torch.randint(0, cfg.vocab_size, (1, context), generator=gen).to(device), cache=cache)
        cache.commit(context)
        out = {}
        for t in counts:
            ids = torch.randint(0, cfg.vocab_size, (1, t), generator=gen).to(device)
            out[t] = time_per_call(lambda ids=ids: net(ids, mask="bidirectional", cache=cache), device, iters=iters)
    return out


def compare_with_transformers(tm: TriMode, ids: list[int], max_new_tokens: int, repeats: int,
                              workdir: Path, ignore_eos: bool = True) -> HFComparison:
    """Export the checkpoint, load it with `transformers`, and time both greedy decodes side by side."""
    import transformers
    from transformers import AutoModelForCausalLM

    if tm.path is None:
        raise ValueError("the model has no checkpoint directory to export")
    transformers.logging.set_verbosity_error()
    dtype = str(tm.net.dtype).removeprefix("torch.")
    out = export_hf_causal_lm(tm.path, workdir / "hf-export", dtype=dtype, overwrite=True)
    hf = AutoModelForCausalLM.from_pretrained(out, dtype=tm.net.dtype).to(tm.net.device).eval()
    eos = None if ignore_eos else sorted(tm.eos_ids())
    hf.generation_config.eos_token_id = eos
    x = torch.tensor([ids], device=tm.net.device)

    def hf_generate() -> list[int]:
        with torch.no_grad():
            y = hf.generate(x, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=eos,
                            pad_token_id=tm.config.eos_token_id, attention_mask=torch.ones_like(x))
        return y[0, len(ids):].tolist()

    def tm_generate() -> list[int]:
        return tm.generate(ids, mode="ar", max_new_tokens=max_new_tokens, eos_token_id=-1 if ignore_eos else None
                           ).token_ids

    hf_generate()
    tm_generate()  # warm-up both before timing
    hf_times, tm_times = [], []
    for _ in range(repeats):  # interleaved, so both see the same machine state
        synchronize(tm.net.device)
        t0 = time.perf_counter()
        hf_tokens = hf_generate()
        synchronize(tm.net.device)
        hf_times.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        tm_tokens = tm_generate()
        synchronize(tm.net.device)
        tm_times.append(time.perf_counter() - t0)
    mismatch = next((i for i, (a, b) in enumerate(zip(tm_tokens, hf_tokens, strict=False)) if a != b), None)
    if mismatch is None and len(tm_tokens) != len(hf_tokens):
        mismatch = min(len(tm_tokens), len(hf_tokens))
    return HFComparison(mismatch is None, mismatch, tm_tokens, hf_tokens, statistics.median(tm_times),
                        statistics.median(hf_times))


def run(model: str | None = None, prompt: str | None = None, ids: list[int] | None = None,
        modes: list[str] | None = None, max_new_tokens: int = 64, token_counts: list[int] | None = None,
        context: int = 64, repeats: int = 3, iters: int = 5, hf: bool = True, static: bool | None = None,
        device: str | None = None, dtype: str | None = None, workdir: Path | None = None,
        ignore_eos: bool = True) -> str:
    """Run the speed benchmark and return its markdown report."""
    known = names(engine_only=False, editing=False)  # what `TriMode.generate` runs
    modes = modes or list(known)
    unknown = [m for m in modes if m not in known]
    if unknown:
        raise ValueError(f"unknown mode(s) {', '.join(unknown)}; choose from {', '.join(known)}")
    counts = sorted(set(token_counts or TOKEN_COUNTS))
    if counts[0] < 1 or max_new_tokens < 1 or repeats < 1 or context < 1:
        raise ValueError("token counts, max_new_tokens, repeats and context must be >= 1")
    tm = load(model, dtype=dtype, device=device)
    ids = prompt_ids(tm, prompt, ids)
    if static is None:
        static = tm.net.device.type == "cuda"
    eager_net = tm.net
    if static:
        b = tm.config.block_size
        span = len(ids) + max_new_tokens + b * (b + 1) + 2 * b
        tm.net = StaticModel(eager_net, max_seq_len=max(span, context + max(counts)),
                             graph_tokens=(1, b, b * (b + 1), *counts))
    speeds = [decode_speed(tm, ids, m, max_new_tokens, repeats, ignore_eos) for m in modes]
    costs = pass_costs(tm.net, counts, context, iters)
    comparison = None
    if hf:
        with tempfile.TemporaryDirectory(dir=workdir) as tmp:
            comparison = compare_with_transformers(tm, ids, max_new_tokens, repeats, Path(tmp), ignore_eos)
    return render(tm, ids, speeds, costs, context, comparison, static, max_new_tokens, ignore_eos)


def render(tm: TriMode, ids: list[int], speeds: list[ModeSpeed], costs: dict[int, float], context: int,
           comparison: HFComparison | None, static: bool, max_new_tokens: int, ignore_eos: bool) -> str:
    net = tm.net
    path = "static cache + CUDA graphs" if static and net.device.type == "cuda" else (
        "static cache (eager)" if static else "eager")
    params = sum(p.numel() for p in net.encoder.parameters()) + net.diffusion_head.weight.numel()
    dtype = str(net.dtype).removeprefix("torch.")
    lines = [
        f"Machine: {machine_name(net.device)}. Model {tm.path} ({params / 1e6:.2f}M params, {dtype}), {path}. "
        f"Prompt {len(ids)} tokens, "
        f"max_new_tokens {max_new_tokens}{' (EOS ignored)' if ignore_eos else ''}, greedy, batch 1.",
        "",
        "Decode speed per mode (median of the timed runs). TPF = generated tokens / forward passes with the prompt"
        " pass counted; excl. prefill = generated / (forwards - 1).",
        "",
        "| mode | knobs | tokens | forwards | TPF | TPF excl. prefill | ms / pass | tok/s | x AR | mean acceptance |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    ar = next((s for s in speeds if s.mode == "ar"), None)
    for s in speeds:
        knobs = ", ".join(f"{k}={v}" for k, v in s.knobs.items()) or "-"
        rel = f"{s.tokens_per_second / ar.tokens_per_second:.2f}" if ar else "-"
        acc = f"{s.acceptance:.2f}" if s.acceptance else "-"
        lines.append(f"| {s.mode} | {knobs} | {s.generated} | {s.forward_passes} | {s.tpf:.2f} | "
                     f"{s.tpf_excl_prefill:.2f} | {s.seconds_per_pass * 1e3:.2f} | {s.tokens_per_second:.1f} | "
                     f"{rel} | {acc} |")
    one = costs[min(costs)]
    lines += [
        "",
        f"Cost of one forward pass (bidirectional, over a {context}-token KV prefix) against its token count:",
        "",
        "| tokens | ms / pass | ms / token | x the 1-token pass |" if 1 in costs else
        f"| tokens | ms / pass | ms / token | x the {min(costs)}-token pass |",
        "|---:|---:|---:|---:|",
    ]
    for t, sec in costs.items():
        lines.append(f"| {t} | {sec * 1e3:.3f} | {sec * 1e3 / t:.3f} | {sec / one:.2f} |")
    if ar:
        lines += ["", "Why: speed vs AR = TPF x (AR ms per pass / mode ms per pass)."]
        for s in speeds:
            if s.mode != "ar":
                lines.append(f"- {s.mode}: {s.tpf:.2f} x {ar.seconds_per_pass / s.seconds_per_pass:.2f} = "
                             f"{s.tokens_per_second / ar.tokens_per_second:.2f}x AR")
    if comparison is not None:
        c = comparison
        verdict = "identical" if c.same_tokens else f"DIFFERENT from token {c.first_mismatch}"
        lines += [
            "",
            "Side by side with `transformers` (the same weights exported by `trimode export --format hf-causal-lm`,"
            " greedy AR, timed interleaved in this run):",
            "",
            "| engine | tokens | seconds | tok/s |",
            "|---|---:|---:|---:|",
            f"| trimode ar | {len(c.trimode_tokens)} | {c.trimode_seconds:.3f} | "
            f"{len(c.trimode_tokens) / c.trimode_seconds:.1f} |",
            f"| transformers generate | {len(c.hf_tokens)} | {c.hf_seconds:.3f} | "
            f"{len(c.hf_tokens) / c.hf_seconds:.1f} |",
            "",
            f"Greedy tokens: {verdict}. Speed ratio trimode / transformers: {c.ratio:.2f}x.",
        ]
    return "\n".join(lines) + "\n"
