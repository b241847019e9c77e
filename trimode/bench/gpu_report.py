"""The markdown report of `trimode bench gpu`: the table of cells, the targets per shape and context, loading."""

from __future__ import annotations

import statistics

import torch

from trimode.bench.gpu_cells import ShapeResult
from trimode.bench.roofline import DeviceInfo


def _fmt_rate(x: float) -> str:
    return f"{x:,.0f}" if x >= 100 else f"{x:.1f}"


def render(results: list[ShapeResult], dev: DeviceInfo, block: int, lora_rank: int, max_batch_tokens: int,
           tpf_source: str, load: dict | None, load_shape: str) -> str:
    """The report: what ran, one table row per cell, the targets per shape and context, then loading."""
    lines = cell_table(results, dev, block, lora_rank, max_batch_tokens, tpf_source) + target_lines(results, dev)
    if load is not None:
        lines += loading_lines(load, load_shape, dev)
    return "\n".join(lines) + "\n"


def cell_table(results: list[ShapeResult], dev: DeviceInfo, block: int, lora_rank: int, max_batch_tokens: int,
               tpf_source: str) -> list[str]:
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
    return lines


def target_lines(results: list[ShapeResult], dev: DeviceInfo) -> list[str]:
    """The targets, then per shape and context whether its cells meet them."""
    lines = ["", "Targets (GPU): the AR step at 1 request within 1.25x of its floor; a block step (B tokens, "
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
    return lines


def loading_lines(load: dict, load_shape: str, dev: DeviceInfo) -> list[str]:
    """What `load_model` took for a random checkpoint (trimode.bench.load_memory)."""
    mib = 2**20
    lines = ["", f"Loading: `load_model` on a random {load_shape} checkpoint ({load['size'] / mib:,.1f} MiB, bf16 on "
             f"disk) as {str(dev.dtype).removeprefix('torch.')} on {dev.device.type}, in a fresh process:"]
    if "error" in load:
        return [*lines, f"- failed: {load['error']}"]
    net = load["net_bytes"]
    small = " (start-up allocations dominate at this size)" if load["size"] < 64 * mib else ""
    lines.append(f"- host peak RSS grew {load['host_peak_growth'] / mib:,.1f} MiB{small}; the loaded network "
                 f"holds {net / mib:,.1f} MiB")
    if dev.dtype != torch.float32:
        extra = [n for n in load["float32"] if n != "inv_freq"]
        lines.append(f"- float32 tensors: {', '.join(load['float32']) or 'none'} [{'MISSED' if extra else 'ok'}]")
    if "device_peak" in load:
        peak = load["device_peak"] / net
        lines.append(f"- device peak {load['device_peak'] / mib:,.1f} MiB = {peak:.2f}x the loaded network, "
                     f"{load['device_after'] / net:.2f}x once loaded [{'ok' if peak <= 1.15 else 'MISSED'}]")
    return lines
