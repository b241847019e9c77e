"""The cells of `trimode bench gpu`: one (shape, context, requests, mode) run of the real engine, its decode steps
timed and each priced by the floor (`trimode.bench.roofline`).

The engine is driven through its benchmark hooks: `Engine.fill_kv_random()` (the pool holds random K/V, as
costly to read as computed ones), `Engine.prompts_pending()` (requests whose prompt is not all in the cache yet)
and `Engine.traced_step()` (one step, and the width groups of every fused forward it ran).
"""

from __future__ import annotations

import gc
import math
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from trimode.api import TriMode, load
from trimode.bench.roofline import DeviceInfo, NetCosts, step_floor
from trimode.bench.timing import synchronize
from trimode.decode.modes import forwards_per_cycle, mode_spec, names, resolve_knobs
from trimode.engine import CostModel, Engine, EngineRequest
from trimode.model.config import NLDConfig
from trimode.model.transformer import NLDTransformer


def _shape(hidden: int, layers: int, inter: int, theta: float = 1e6, **extra) -> dict:
    rope = {"rope_theta": theta}
    return dict(hidden_size=hidden, num_hidden_layers=layers, intermediate_size=inter, num_attention_heads=32,
                num_key_value_heads=8, head_dim=128, vocab_size=131072, rope_parameters=rope, **extra)


# Spec table 1.1: the released sizes. `tiny` exercises the same code on a CPU in seconds; like 3B and 14B its
# attention width (heads x head_dim) differs from the hidden size.
SHAPES: dict[str, dict] = {
    "3b": _shape(3072, 26, 9216),
    "8b": _shape(4096, 34, 14336),
    "14b": _shape(5120, 40, 16384, theta=1e9),
    "tiny": dict(hidden_size=128, num_hidden_layers=2, intermediate_size=256, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=48, vocab_size=1024),
}
MODES = names(engine_only=False, editing=False)  # what a request names (auto decides by load; edits rewrite)
# Tokens per forward reported in the paper (Tables 5 and 7, instruct models): diffusion, linear, quadratic.
PAPER_TPF: dict[str, dict[str, float]] = {
    "3b": {"ar": 1.0, "diffusion": 1.91, "linear_spec": 4.36, "quadratic_spec": 5.42},
    "8b": {"ar": 1.0, "diffusion": 2.57, "linear_spec": 5.99, "quadratic_spec": 6.38},
    "14b": {"ar": 1.0, "diffusion": 2.74, "linear_spec": 5.96, "quadratic_spec": 6.92},
}
PAPER_TPF["tiny"] = PAPER_TPF["8b"]
TPF_PROMPTS = ["def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
               "The three primary colours are", "Question: what is 17 + 25?\nAnswer:"]


@dataclass
class Cell:
    shape: str
    context: int
    requests: int
    mode: str
    tpf: float
    step_s: list[float] = field(default_factory=list)
    floor_s: list[float] = field(default_factory=list)
    bound: list[str] = field(default_factory=list)  # "memory" / "compute" per step
    forwards: list[int] = field(default_factory=list)
    block_steps: list[float] = field(default_factory=list)  # seconds of steps that were one B-token block step
    attention: str = "-"
    peak_gib: float | None = None
    error: str | None = None

    @property
    def seconds(self) -> float:
        return statistics.fmean(self.step_s)

    @property
    def floor(self) -> float:
        return statistics.fmean(self.floor_s)

    @property
    def over_floor(self) -> float:
        return self.seconds / self.floor

    @property
    def tokens_per_s(self) -> float:
        return self.requests * self.tpf / self.seconds

    @property
    def floor_tokens_per_s(self) -> float:
        return self.requests * self.tpf / self.floor


@dataclass
class ShapeResult:
    shape: str
    params: int
    weight_bytes: int
    cells: list[Cell] = field(default_factory=list)
    float32_bytes: int = 0  # float32 tensors of the network besides RoPE's inv_freq
    allocated_over_weights: float | None = None  # device memory after building / bytes of its tensors


def random_network(cfg: NLDConfig, device: torch.device, dtype: torch.dtype, lora_rank: int = 0,
                   seed: int = 0) -> NLDTransformer:
    """An NLDTransformer of `cfg`'s shape with random weights, allocated directly in `dtype` on `device`."""
    with torch.device("meta"):
        net = NLDTransformer(cfg)
    net = net.to(dtype).to_empty(device=device)
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            if p.dim() == 1:
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02, generator=gen)
        if lora_rank:
            for layer in net.encoder.layers:
                o = layer.self_attn.o_proj
                a = torch.empty(lora_rank, o.weight.shape[1], device=device, dtype=dtype)
                b = torch.empty(o.weight.shape[0], lora_rank, device=device, dtype=dtype)
                o.set_adapter(a.normal_(0, 0.02, generator=gen), b.normal_(0, 0.02, generator=gen), 4.0)
    return net.eval()


class PromptSkip:
    """The network, except that while `skip` is set a forward computes nothing and returns random logits.

    Stands in for `tm.net` while the engine runs the prompt passes, whose K/V the benchmark does not need: the
    pool already holds random values, and random weights make those as good as computed ones for timing."""

    def __init__(self, net: NLDTransformer) -> None:
        self.net = net
        self.skip = False

    def __getattr__(self, name):
        return getattr(self.net, name)

    def __call__(self, ids: torch.Tensor, *, logits_at: torch.Tensor | None = None, **kwargs) -> torch.Tensor:
        if not self.skip:
            return self.net(ids, logits_at=logits_at, **kwargs)
        n = ids.numel() if logits_at is None else len(logits_at)
        return torch.randn(n, self.net.config.vocab_size, device=ids.device, dtype=self.net.dtype)


class AttentionKernels(TorchDispatchMode):
    """Records which attention implementation the ops under it used: a fused SDPA kernel (its op name) or the
    math fallback (SDPA decomposed into matmuls and a softmax)."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: set[str] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.add(func.__name__.split(".")[0])
        return func(*args, **(kwargs or {}))

    def summary(self) -> str:
        names = {"_scaled_dot_product_flash_attention": "flash", "_scaled_dot_product_efficient_attention":
                 "mem-efficient", "_scaled_dot_product_cudnn_attention": "cudnn",
                 "_scaled_dot_product_flash_attention_for_cpu": "flash (cpu)", "_flash_attention_forward": "flash"}
        fused = sorted({v for k, v in names.items() if k in self.ops})
        if "_safe_softmax" in self.ops or ("bmm" in self.ops and "_softmax" in self.ops):
            fused.append("MATH")
        return " + ".join(fused) or "?"


def cycle_steps(mode: str, knobs: dict) -> int:
    """Engine steps of one cycle of the mode in lock-step (a window of whole cycles has its real pass mix)."""
    return forwards_per_cycle(mode, knobs.get("steps", 1))


def mode_knobs(mode: str, block: int, tpf: float) -> tuple[dict, float]:
    """The knobs a mode runs with here, and the TPF its tok/s uses (diffusion: that of its fixed schedule)."""
    if mode == "ar":
        return {}, 1.0
    if mode == "diffusion":
        steps = max(1, round(block / tpf) - 1)
        return {"block_length": block, "steps": steps}, block / (steps + 1)
    if mode == "linear_spec":
        return {"block_length": block, "threshold": 0.0}, tpf
    return {"block_length": block}, tpf


def run_cell(tm: TriMode, stub: PromptSkip, costs: NetCosts, dev: DeviceInfo, shape: str, mode: str, requests: int,
             context: int, block: int, tpf: float, steps: int, max_batch_tokens: int) -> Cell:
    """One (mode, requests, context) measurement on the engine over `tm` (whose network is `stub`)."""
    knobs, used_tpf = mode_knobs(mode, block, tpf)
    cell = Cell(shape, context, requests, mode, used_tpf)
    cycle = cycle_steps(mode, knobs)
    warm = 2
    window = max(1, math.ceil(steps / cycle)) * cycle
    max_new = (warm + window + 2) * block  # a step commits at most B tokens per request: none finishes early
    engine = None
    if dev.is_gpu:
        torch.cuda.reset_peak_memory_stats(dev.device)
    try:
        engine = engine_for(tm, mode, knobs, requests, context, max_new, max_batch_tokens)
        handles = take_prompts(engine, stub, tm, mode, knobs, requests, context, max_new)
        for i in range(warm + window):
            synchronize(dev.device)
            t0 = time.perf_counter()
            forwards = engine.traced_step()  # one list of width groups per fused forward
            synchronize(dev.device)
            if i >= warm:
                record_step(cell, forwards, time.perf_counter() - t0, tm.config, costs, dev, block)
        probe = AttentionKernels()
        with probe:
            engine.step()
        cell.attention = probe.summary()
        cell.error = finished_early(handles)
    except Exception as e:  # out of memory building the pool, or a bug: one cell fails, the report goes on
        cell.error = f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:120]}"
    finally:
        if dev.is_gpu:
            cell.peak_gib = torch.cuda.max_memory_allocated(dev.device) / 2**30
        if engine is not None:
            engine.stop()
        del engine
        if dev.is_gpu:  # hand the pool back before the next cell allocates its own
            gc.collect()
            torch.cuda.empty_cache()
    return cell


def engine_for(tm: TriMode, mode: str, knobs: dict, requests: int, context: int, max_new: int,
               max_batch_tokens: int) -> Engine:
    """An engine with room for exactly `requests` such requests, each prompt taken in one chunk."""
    spec = mode_spec(mode)
    resolved = resolve_knobs(mode, tm.defaults, max_new, **knobs)
    slots = spec.kv_slots(context, max_new, resolved)
    widest = max(spec.widest_pass(context, resolved), context)
    return Engine(tm, max_queue=requests, max_running=requests, kv_budget_tokens=requests * (slots + 16),
                  max_batch_tokens=max_batch_tokens, prefill_chunk=widest, max_pass_bytes=1 << 62,
                  cost=CostModel([(1, 1e-3), (1 << 16, 1e-3)]))


def take_prompts(engine: Engine, stub: PromptSkip, tm: TriMode, mode: str, knobs: dict, requests: int,
                 context: int, max_new: int) -> list:
    """Submit the requests (random prompts of `context` tokens, no EOS) and step until every prompt is in the
    cache, the network skipped (`PromptSkip`) and the pool's K/V random. Returns the request handles."""
    engine.fill_kv_random()
    g = torch.Generator().manual_seed(requests)
    prompts = torch.randint(4, tm.config.vocab_size, (requests, context), generator=g).tolist()
    handles = [engine.submit(EngineRequest(p, mode=mode, max_new_tokens=max_new,
                                           knobs={"eos_token_id": -1, **knobs})) for p in prompts]
    stub.skip = True
    try:
        while engine.prompts_pending():
            if not engine.step():
                raise RuntimeError("the engine stalled while taking in the prompts")
    finally:
        stub.skip = False
    return handles


def record_step(cell: Cell, forwards: list, seconds: float, cfg: NLDConfig, costs: NetCosts, dev: DeviceInfo,
                block: int) -> None:
    """A timed step into `cell`: its seconds, its floor and what bounds it, its forwards, and whether it was one
    block step (a single B-token bidirectional pass without the adapter)."""
    ran = [g for groups in forwards for g in groups]
    floor, bound = step_floor(ran, cfg, costs, dev, block)
    cell.step_s.append(seconds)
    cell.floor_s.append(floor)
    cell.bound.append(bound)
    cell.forwards.append(len(forwards))
    if len(ran) == 1 and ran[0].tokens == block and set(ran[0].masks) == {"bidirectional"} and not any(ran[0].lora):
        cell.block_steps.append(seconds)


def finished_early(handles: list) -> str | None:
    """Why a cell's measurement is void: a request that finished inside the window (or whose forward failed)."""
    failed = [h for h in handles if h.done]
    if not failed:
        return None
    try:
        failed[0].result()
        return f"{len(failed)} request(s) finished inside the measured window"
    except Exception as e:  # a forward that failed (out of memory) fails its requests, not the engine
        return f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"

def measure_tpf(model: str, modes: list[str], block: int, device: torch.device, dtype: torch.dtype,
                max_new_tokens: int = 64) -> tuple[dict[str, float], str]:
    """TPF per mode of a trained model at batch 1 (greedy; prompt pass counted), and how it was measured."""
    tm = load(model, device=str(device), dtype=dtype if device.type == "cuda" else None)
    ids = [[1, 17, 42, 99, 250, 7, 64, 128], [1, 5, 9, 200, 31]]
    prompts = TPF_PROMPTS if tm.tokenizer is not None else [[t % tm.config.vocab_size for t in p] for p in ids]
    out = {}
    for mode in modes:
        tokens = passes = 0
        for prompt in prompts:
            knobs = {} if mode == "ar" else {"block_length": block}
            r = tm.generate(prompt, mode=mode, max_new_tokens=max_new_tokens, **knobs)
            tokens += r.stats.generated_tokens
            passes += r.stats.forward_passes
        out[mode] = tokens / passes if passes else 1.0
    name = Path(model).name if Path(model).exists() else model
    return out, (f"measured on `{name}` at batch 1: greedy, block {block}, {len(prompts)} prompts, at most "
                 f"{max_new_tokens} new tokens each, prompt pass counted")


