"""`trimode bench gpu`: the served engine's decode steps at the released model shapes, against a floor.

For each shape (random weights, real sizes), context length, number of concurrent requests and mode, the real
`Engine` runs that many requests whose prompts are `context` tokens long, and the bench times its decode steps
(`Engine.step`: scheduling, the paged pool, the fused forwards, the step machines, sampling, events). Each
step's fused forwards are recorded (`Engine.trace`) and priced by a floor:

    floor of one step = max(bytes / bandwidth, FLOPs / peak FLOP/s)
    bytes = the weights, read once (all but the embedding table; the drafter adapter when a row uses it)
          + K/V read (every row's prefix) + K/V written and read back (the pass's own tokens)
          + the logits written
    FLOPs = 2 x body parameters x tokens + 2 x hidden x vocab x logits rows
          + 4 x layers x heads x head_dim x attended (query, key) pairs (prefix + the mask's in-pass pattern)

with the device's measured copy bandwidth and a peak FLOP/s figure (datasheet for known GPUs, else a measured
matmul; `--peak-tflops` overrides). Activations are not counted: the floor is a lower bound.

What is not measured, on purpose:
- The prompt pass. Its K/V are not computed: the pool is filled with random values and the network stands in
  with random logits until every prompt is "in the cache" (`PromptSkip`); the decode steps that follow are
  the real thing at that context length. (Random weights: the values do not change the cost.)
- Acceptance. Random weights accept almost nothing, but a step's cost does not depend on what it accepts (the
  pass shapes of linear and quadratic speculation are fixed; diffusion runs the fixed-step schedule with
  S = round(B / TPF) - 1 denoising steps per block, so its pass mix is that of a model at that TPF). Tokens
  per forward (TPF) come from a trained model when `--model` is given (measured at batch 1), else from the
  paper (stated as assumed), and tok/s = requests x TPF / mean seconds per step.
"""

from __future__ import annotations

import gc
import logging
import math
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from trimode.bench.load_memory import load_memory
from trimode.bench.serve_bench import FIXED_MODES
from trimode.bench.timing import copy_bandwidth, machine_name, synchronize, time_per_call
from trimode.model.config import NLDConfig
from trimode.model.masks import QuadraticStep, pass_pattern
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
MODES = FIXED_MODES  # the registry's modes a request names (auto decides by load; edits rewrite text)
# Tokens per forward reported in the paper (Tables 5 and 7, instruct models): diffusion, linear, quadratic.
PAPER_TPF: dict[str, dict[str, float]] = {
    "3b": {"ar": 1.0, "diffusion": 1.91, "linear_spec": 4.36, "quadratic_spec": 5.42},
    "8b": {"ar": 1.0, "diffusion": 2.57, "linear_spec": 5.99, "quadratic_spec": 6.38},
    "14b": {"ar": 1.0, "diffusion": 2.74, "linear_spec": 5.96, "quadratic_spec": 6.92},
}
PAPER_TPF["tiny"] = PAPER_TPF["8b"]
# Dense bf16 tensor-core peak (TFLOP/s, datasheets), matched against the device name in this order.
DATASHEET_TFLOPS = [("H200", 989.0), ("H100 PCIe", 756.0), ("H100", 989.0), ("H800", 989.0), ("A100", 312.0),
                    ("L40S", 362.0), ("L4", 121.0), ("A10", 125.0)]
TPF_PROMPTS = ["def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
               "The three primary colours are", "Question: what is 17 + 25?\nAnswer:"]


@dataclass
class DeviceInfo:
    name: str
    device: torch.device
    dtype: torch.dtype
    bandwidth: float  # bytes / s
    peak_flops: float  # FLOP / s
    peak_source: str

    @property
    def is_gpu(self) -> bool:
        return self.device.type == "cuda"


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


def weight_bytes(net: NLDTransformer, lora: bool) -> int:
    """Bytes of weights one pass reads: everything but the embedding table (and the adapter unless used)."""
    total = 0
    for name, p in net.named_parameters():
        if name == "encoder.embed_tokens.weight" or (".lora_" in name and not lora):
            continue
        total += p.numel() * p.element_size()
    return total


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


@dataclass(frozen=True)
class NetCosts:
    """What the floor needs to know about a network: bytes a pass reads, parameters it multiplies by."""

    weights: int  # bytes read by a pass without the adapter (all but the embedding table)
    weights_lora: int  # with the drafter adapter
    body: int  # parameters of the decoder layers (multiplied by every token)
    kv_token: int  # K + V bytes of one token over all layers

    @classmethod
    def of(cls, net: NLDTransformer) -> NetCosts:
        c = net.config
        body = sum(p.numel() for n, p in net.named_parameters()
                   if n.startswith("encoder.layers.") and ".lora_" not in n)
        kv = 2 * c.num_hidden_layers * c.num_key_value_heads * c.head_dim * net.dtype.itemsize
        return cls(weight_bytes(net, False), weight_bytes(net, True), body, kv)


def step_floor(groups, cfg: NLDConfig, costs: NetCosts, dev: DeviceInfo, block: int) -> tuple[float, str]:
    """Seconds a step cannot beat, and what bounds it ("memory" / "compute"). `groups`: the width groups
    (`ForwardShape`) of all its fused forwards. The weights count once: the engine packs every width into one
    forward, and more forwards per step (over `max_batch_tokens`) are the engine's cost, not the floor's."""
    item, kv_token = dev.dtype.itemsize, costs.kv_token
    attn = 4 * cfg.num_hidden_layers * cfg.num_attention_heads * cfg.head_dim
    lora = any(any(s.lora) for s in groups)
    nbytes, flops = costs.weights_lora if lora else costs.weights, 0
    for s in groups:
        t, mask = s.tokens, s.masks[0]
        if t == 1 or mask in ("tensor", "bidirectional"):
            own = t * t  # one token, or every token sees the whole pass
        elif isinstance(mask, QuadraticStep):
            own = int(pass_pattern(mask, t, "cpu").sum())  # each group sees its leaders and itself
        else:
            own = t * (t + 1) // 2  # causal
        nbytes += s.rows * s.past * kv_token + 2 * s.rows * t * kv_token + s.logits * cfg.vocab_size * item
        flops += (2 * costs.body * s.rows * t + 2 * cfg.hidden_size * cfg.vocab_size * s.logits
                  + attn * s.rows * (t * s.past + own))
    memory, compute = nbytes / dev.bandwidth, flops / dev.peak_flops
    return max(memory, compute), "memory" if memory >= compute else "compute"


def cycle_steps(mode: str, knobs: dict) -> int:
    """Engine steps of one cycle of the mode in lock-step (a window of whole cycles has its real pass mix)."""
    return {"ar": 1, "quadratic_spec": 1, "linear_spec": 2}.get(mode, knobs.get("steps", 1) + 1)


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


def run_cell(tm, stub: PromptSkip, costs: NetCosts, dev: DeviceInfo, shape: str, mode: str, requests: int,
             context: int, block: int, tpf: float, steps: int, max_batch_tokens: int) -> Cell:
    """One (mode, requests, context) measurement on the engine over `tm` (whose network is `stub`)."""
    from trimode.decode.modes import mode_spec, resolve_knobs
    from trimode.engine import CostModel, Engine, EngineRequest

    knobs, used_tpf = mode_knobs(mode, block, tpf)
    cell = Cell(shape, context, requests, mode, used_tpf)
    cycle = cycle_steps(mode, knobs)
    warm = 2
    window = max(1, math.ceil(steps / cycle)) * cycle
    max_new = (warm + window + 2) * block  # a step commits at most B tokens per request: none finishes early
    spec = mode_spec(mode)
    slots = spec.kv_slots(context, max_new, resolve_knobs(mode, tm.defaults, max_new, **knobs))
    widest = max(spec.widest_pass(context, resolve_knobs(mode, tm.defaults, max_new, **knobs)), context)
    engine = None
    if dev.is_gpu:
        torch.cuda.reset_peak_memory_stats(dev.device)
    try:
        engine = Engine(tm, max_queue=requests, max_running=requests, kv_budget_tokens=requests * (slots + 16),
                        max_batch_tokens=max_batch_tokens, prefill_chunk=widest, max_pass_bytes=1 << 62,
                        cost=CostModel([(1, 1e-3), (1 << 16, 1e-3)]))
        with torch.no_grad():
            for buf in (engine.pool.k, engine.pool.v):
                buf.normal_()
                buf[:, 0] = 0  # the null slot stays zero
        engine.trace = []
        g = torch.Generator().manual_seed(requests)
        prompts = torch.randint(4, tm.config.vocab_size, (requests, context), generator=g).tolist()
        handles = [engine.submit(EngineRequest(p, mode=mode, max_new_tokens=max_new,
                                               knobs={"eos_token_id": -1, **knobs})) for p in prompts]
        stub.skip = True
        try:
            while engine.scheduler.waiting or any(s.cache.length < context for s in engine.scheduler.running):
                if not engine.step():
                    raise RuntimeError("the engine stalled while taking in the prompts")
        finally:
            stub.skip = False
        for i in range(warm + window):
            first = len(engine.trace)
            synchronize(dev.device)
            t0 = time.perf_counter()
            engine.step()
            synchronize(dev.device)
            seconds = time.perf_counter() - t0
            forwards = engine.trace[first:]  # one list of width groups per fused forward
            if i < warm:
                continue
            ran = [g for groups in forwards for g in groups]
            floor, bound = step_floor(ran, tm.config, costs, dev, block)
            cell.step_s.append(seconds)
            cell.floor_s.append(floor)
            cell.bound.append(bound)
            cell.forwards.append(len(forwards))
            if len(ran) == 1 and ran[0].tokens == block and set(ran[0].masks) == {"bidirectional"} \
                    and not any(ran[0].lora):
                cell.block_steps.append(seconds)
        probe = AttentionKernels()
        with probe:
            engine.step()
        cell.attention = probe.summary()
        failed = [h for h in handles if h.done]
        if failed:
            try:
                failed[0].result()
                cell.error = f"{len(failed)} request(s) finished inside the measured window"
            except Exception as e:  # a forward that failed (out of memory) fails its requests, not the engine
                cell.error = f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"
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


def measure_tpf(model: str, modes: list[str], block: int, device: torch.device, dtype: torch.dtype,
                max_new_tokens: int = 64) -> tuple[dict[str, float], str]:
    """TPF per mode of a trained model at batch 1 (greedy; prompt pass counted), and how it was measured."""
    import trimode

    tm = trimode.load(model, device=str(device), dtype=dtype if device.type == "cuda" else None)
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


def device_info(device: str | None, peak_tflops: float | None, bandwidth_bytes: int | None) -> DeviceInfo:
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda but no CUDA device is available")
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    bandwidth = copy_bandwidth(dev, bandwidth_bytes or (2 << 30 if dev.type == "cuda" else 64 << 20))
    name = machine_name(dev)
    if peak_tflops:
        return DeviceInfo(name, dev, dtype, bandwidth, peak_tflops * 1e12, "given (--peak-tflops)")
    if dev.type == "cuda":
        gpu = torch.cuda.get_device_name(dev)
        for key, tflops in DATASHEET_TFLOPS:
            if key in gpu:
                return DeviceInfo(name, dev, dtype, bandwidth, tflops * 1e12, f"{key} datasheet, dense bf16")
    n = 8192 if dev.type == "cuda" else 512
    a = torch.randn(n, n, device=dev, dtype=dtype)
    seconds = time_per_call(lambda: a @ a, dev, iters=5, warmup=2)
    return DeviceInfo(name, dev, dtype, bandwidth, 2 * n**3 / seconds, f"measured {n}x{n} matmul")


def run(shapes: list[str], contexts: list[int] = (2048, 8192), requests: list[int] = (1, 16, 64),
        modes: list[str] = MODES, block: int = 32, lora_rank: int = 128, steps: int = 8,
        tpf: dict[str, float] | None = None, model: str | None = None, device: str | None = None,
        peak_tflops: float | None = None, max_batch_tokens: int = 8192, loading: bool = True,
        progress=None, partial=None, bandwidth_bytes: int | None = None) -> str:
    """Benchmark the engine at `shapes` and return the markdown report. `progress(cell)` after each cell;
    `partial(report)` with the report so far (a long GPU run that is cut short keeps what it measured)."""
    from trimode.api import TriMode

    unknown = [s for s in shapes if s not in SHAPES]
    if unknown or not shapes:
        raise ValueError(f"unknown shape(s) {', '.join(unknown) or '(none)'}; choose from {', '.join(SHAPES)}")
    bad = [m for m in modes if m not in MODES]
    if bad or not modes:
        raise ValueError(f"unknown mode(s) {', '.join(bad) or '(none)'}; choose from {', '.join(MODES)}")
    want_gpu = (device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda")
    big = [s for s in shapes if s != "tiny"]
    if not want_gpu and big:
        raise ValueError(f"shape(s) {', '.join(big)} need a CUDA GPU (tens of GB in bf16); on CPU use --shapes tiny")
    if not contexts or min(contexts) < 1 or not requests or min(requests) < 1 or steps < 1:
        raise ValueError("--contexts, --requests and --steps must be positive")
    if block < 2:
        raise ValueError("block must be >= 2")
    dev = device_info(device, peak_tflops, bandwidth_bytes)
    torch.manual_seed(0)
    source = "assumed: the paper's TPF for the size (Tables 5 and 7)"
    measured: dict[str, float] = {}
    if model is not None:
        measured, source = measure_tpf(model, list(modes), block, dev.device, dev.dtype)
    if tpf:
        source += f"; given on the command line for {', '.join(tpf)}"
    load_shape = "3b" if big else "tiny"  # the loading check's checkpoint: 7.7 GB with the real shapes

    def report(results, load=None) -> str:
        return render(results, dev, block, lora_rank, max_batch_tokens, source, load, load_shape)

    results = []
    engine_log = logging.getLogger("trimode.engine")
    level = engine_log.level
    engine_log.setLevel(logging.CRITICAL)  # a failed forward (out of memory) is reported in the table instead
    try:
        for shape in shapes:
            given = {**PAPER_TPF[shape], **measured, **(tpf or {})}
            cfg = NLDConfig(**SHAPES[shape], block_size=block)
            net = random_network(cfg, dev.device, dev.dtype, lora_rank)
            result = ShapeResult(shape, sum(p.numel() for n, p in net.named_parameters() if ".lora_" not in n),
                                 weight_bytes(net, False))
            tensors = [*net.named_parameters(), *net.named_buffers()]
            result.float32_bytes = sum(t.numel() * t.element_size() for n, t in tensors
                                       if t.dtype == torch.float32 and n != "inv_freq")
            if dev.is_gpu:
                synchronize(dev.device)
                result.allocated_over_weights = torch.cuda.memory_allocated(dev.device) / sum(
                    t.numel() * t.element_size() for _, t in tensors)
            stub = PromptSkip(net)
            tm, costs = TriMode(stub), NetCosts.of(net)
            results.append(result)
            for context in contexts:
                for n in requests:
                    for mode in modes:
                        cell = run_cell(tm, stub, costs, dev, shape, mode, n, context, block, given[mode], steps,
                                        max_batch_tokens)
                        result.cells.append(cell)
                        if progress:
                            progress(cell)
                        if partial:
                            partial(report(results))
            del net, stub, tm
            if dev.is_gpu:
                gc.collect()
                torch.cuda.empty_cache()
        load = load_memory(NLDConfig(**SHAPES[load_shape]), dev.device, dev.dtype) if loading else None
    finally:
        engine_log.setLevel(level)
    return report(results, load)


def _fmt_rate(x: float) -> str:
    return f"{x:,.0f}" if x >= 100 else f"{x:.1f}"


def render(results: list[ShapeResult], dev: DeviceInfo, block: int, lora_rank: int, max_batch_tokens: int,
           tpf_source: str, load: dict | None, load_shape: str) -> str:
    if dev.is_gpu:
        where = f"**Device: GPU, {dev.name}.**"
    else:
        where = (f"**Device: {dev.name}. Not a GPU: these figures exercise the benchmark; the floors and the "
                 f"targets below are meant for a GPU and do not apply to this run.**")
    lines = [
        where,
        "",
        f"dtype {str(dev.dtype).removeprefix('torch.')}; measured copy bandwidth {dev.bandwidth / 1e9:.1f} GB/s; "
        f"peak {dev.peak_flops / 1e9:,.0f} GFLOP/s ({dev.peak_source}). Random weights; block {block}; drafter "
        f"LoRA rank {lora_rank}; engine max_batch_tokens {max_batch_tokens}. Prompt passes not run (their K/V "
        f"random); decode steps timed after 2 warm-up steps over whole cycles of each mode.",
        f"TPF: {tpf_source}. tok/s = requests x TPF / mean s per step; floor = (weights once + K/V read and "
        f"written + logits) / bandwidth or FLOPs / peak, whichever is larger.",
        "",
        "| shape | context | requests | mode | forwards / step | ms / step | floor ms | bound | x floor | TPF | "
        "tok/s | floor tok/s | attention | peak GiB |",
        "|---|---:|---:|---|---:|---:|---:|---|---:|---:|---:|---:|---|---:|",
    ]
    for r in results:
        size = f"{r.params / 1e9:.2f}B" if r.params >= 1e8 else f"{r.params / 1e6:.2f}M"
        for c in r.cells:
            head = f"| {r.shape} ({size}) | {c.context} | {c.requests} | {c.mode} |"
            peak = f"{c.peak_gib:.1f}" if c.peak_gib is not None else "-"
            if c.error or not c.step_s:
                lines.append(f"{head} - | - | - | - | - | - | - | - | - | {peak} |  ({c.error or 'no step'})")
                continue
            bound = max(set(c.bound), key=c.bound.count)
            lines.append(
                f"{head} {statistics.fmean(c.forwards):.1f} | {c.seconds * 1e3:.2f} | {c.floor * 1e3:.2f} | {bound} | "
                f"{c.over_floor:.2f} | {c.tpf:.2f} | {_fmt_rate(c.tokens_per_s)} | "
                f"{_fmt_rate(c.floor_tokens_per_s)} | {c.attention} | {peak} |"
            )
    lines += ["", "Targets (GPU): the AR step at 1 request within 1.25x of its floor; a block step (B tokens, "
              "bidirectional) within 1.3x of the AR step; AR at 64 requests within 1.5x of its floor tok/s; no "
              "math-kernel attention; no float32 copy of the weights.", ""]
    note = "" if dev.is_gpu else " (CPU run: targets do not apply)"
    for r in results:
        for context in sorted({c.context for c in r.cells}):
            cells = {(c.mode, c.requests): c for c in r.cells if c.context == context and not c.error and c.step_s}
            parts = []
            ar1 = cells.get(("ar", 1))
            if ar1:
                ar_step = statistics.median(ar1.step_s)
                parts.append(f"AR step {ar1.over_floor:.2f}x floor [{'ok' if ar1.over_floor <= 1.25 else 'MISSED'}]")
                diff1 = cells.get(("diffusion", 1))
                if diff1 and diff1.block_steps:
                    ratio = statistics.median(diff1.block_steps) / ar_step
                    parts.append(f"block step {ratio:.2f}x AR step [{'ok' if ratio <= 1.3 else 'MISSED'}]")
            ar64 = cells.get(("ar", 64))
            if ar64:
                ok = "ok" if ar64.over_floor <= 1.5 else "MISSED"
                parts.append(f"AR at 64 requests {ar64.over_floor:.2f}x its floor [{ok}]")
            kernels = sorted({c.attention for c in cells.values()})
            math_used = any("MATH" in k for k in kernels)
            parts.append(f"attention {', '.join(kernels) or '-'} [{'MISSED' if math_used else 'ok'}]")
            if context == min(c.context for c in r.cells) and dev.dtype != torch.float32:
                f32, alloc = r.float32_bytes, r.allocated_over_weights
                alloc = f", device memory {alloc:.2f}x its tensors" if alloc else ""
                ok = "ok" if f32 == 0 else "MISSED"
                parts.append(f"float32 tensors besides RoPE {f32 / 2**20:.1f} MiB{alloc} [{ok}]")
            lines.append(f"- {r.shape}, context {context}: " + "; ".join(parts) + note)
    if load is not None:
        size = load["size"] / 2**20
        lines += ["", f"Loading: `load_model` on a random {load_shape} checkpoint ({size:,.1f} MiB, bf16 on disk)"
                  f" as {str(dev.dtype).removeprefix('torch.')} on {dev.device.type}, in a fresh process:"]
        if "error" in load:
            lines.append(f"- failed: {load['error']}")
        else:
            mib = 2**20
            net = load["net_bytes"]
            small = " (start-up allocations dominate at this size)" if load["size"] < 64 * mib else ""
            lines.append(f"- host peak RSS grew {load['host_peak_growth'] / mib:,.1f} MiB{small}; the loaded network "
                         f"holds {net / mib:,.1f} MiB")
            if dev.dtype != torch.float32:
                extra = [n for n in load["float32"] if n != "inv_freq"]
                lines.append(f"- float32 tensors: {', '.join(load['float32']) or 'none'} "
                             f"[{'MISSED' if extra else 'ok'}]")
            if "device_peak" in load:
                peak = load["device_peak"] / net
                lines.append(f"- device peak {load['device_peak'] / mib:,.1f} MiB = {peak:.2f}x the loaded network, "
                             f"{load['device_after'] / net:.2f}x once loaded [{'ok' if peak <= 1.15 else 'MISSED'}]")
    return "\n".join(lines) + "\n"
