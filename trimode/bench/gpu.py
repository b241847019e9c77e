"""`trimode bench gpu`: the served engine's decode steps at the released model shapes, against a floor.

For each shape (random weights, real sizes), context length, number of concurrent requests and mode, the real
`Engine` runs that many requests whose prompts are `context` tokens long, and the bench times its decode steps
(`Engine.step`: scheduling, the paged pool, the fused forwards, the step machines, sampling, events). Each
step's fused forwards are recorded (`Engine.traced_step`) and priced by a floor, max(bytes / bandwidth, FLOPs /
peak FLOP/s) over the weights, the K/V read and written, the logits and the attended pairs (`roofline.py` has
the formula; `--peak-tflops` overrides the device's peak). Activations are not counted: the floor is a lower
bound.

Modules: `roofline.py` (device facts, the floor), `gpu_cells.py` (shapes, one engine run per cell),
`gpu_report.py` (the markdown), this file (`run`: every cell of every shape, then loading).

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

import torch

from trimode.api import TriMode
from trimode.bench.gpu_cells import (
    MODES,
    PAPER_TPF,
    SHAPES,
    PromptSkip,
    ShapeResult,
    measure_tpf,
    random_network,
    run_cell,
)
from trimode.bench.gpu_report import render
from trimode.bench.load_memory import load_memory
from trimode.bench.roofline import NetCosts, device_info, weight_bytes
from trimode.bench.timing import synchronize
from trimode.model.config import NLDConfig


def run(shapes: list[str], contexts: list[int] = (2048, 8192), requests: list[int] = (1, 16, 64),
        modes: list[str] = MODES, block: int = 32, lora_rank: int = 128, steps: int = 8,
        tpf: dict[str, float] | None = None, model: str | None = None, device: str | None = None,
        peak_tflops: float | None = None, max_batch_tokens: int = 8192, loading: bool = True,
        progress=None, partial=None, bandwidth_bytes: int | None = None) -> str:
    """Benchmark the engine at `shapes` and return the markdown report. `progress(cell)` after each cell;
    `partial(report)` with the report so far (a long GPU run that is cut short keeps what it measured)."""
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
