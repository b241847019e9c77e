"""Per-pass cost of the fast path at the released model shapes, against the memory-bandwidth floor.

For each shape (random weights, real sizes) and each pass kind a decode mode runs, the time of one pass
through `StaticModel` (CUDA graphs on a GPU), over a KV cache already holding `context` tokens:

    ar_step       1 token, causal            (AR; the cost floor of every mode)
    block_step    B tokens, bidirectional    (a diffusion denoising step)
    draft_step    B tokens, bidirectional, LoRA on o_proj   (linear self-speculation's draft)
    verify        B tokens, causal, K/V kept (linear self-speculation's verify, diffusion's block refresh)
    quadratic     B(B+1) tokens, quadratic mask             (one quadratic self-speculation pass)

The floor of a pass is the bytes it must read (every weight but the embedding table, whose T rows are
negligible) over the measured device copy bandwidth. Projected tok/s of a mode = its tokens per forward (TPF)
over the mean cost of the passes it alternates (see `project`).
"""

from __future__ import annotations

import gc
from dataclasses import dataclass, field

import torch

from trimode.bench.timing import copy_bandwidth, machine_name, time_per_call
from trimode.model.config import NLDConfig
from trimode.model.masks import quadratic_step_mask
from trimode.model.static import StaticModel
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
# Tokens per forward reported in the paper (Tables 5 and 7, instruct models): diffusion, linear, quadratic.
PAPER_TPF: dict[str, dict[str, float]] = {
    "3b": {"ar": 1.0, "diffusion": 1.91, "linear_spec": 4.36, "quadratic_spec": 5.42},
    "8b": {"ar": 1.0, "diffusion": 2.57, "linear_spec": 5.99, "quadratic_spec": 6.38},
    "14b": {"ar": 1.0, "diffusion": 2.74, "linear_spec": 5.96, "quadratic_spec": 6.92},
}
PAPER_TPF["tiny"] = PAPER_TPF["8b"]
# Which passes each mode alternates (one of each per cycle, in these proportions).
MODE_PASSES = {
    "ar": ("ar_step",),
    "diffusion": ("block_step",),  # plus one verify-sized refresh per block, a small share at TPF > 1
    "linear_spec": ("draft_step", "verify"),
    "quadratic_spec": ("quadratic",),
}


@dataclass
class PassTiming:
    kind: str
    tokens: int
    seconds: float
    weight_bytes: int
    kv_bytes: int
    floor_seconds: float

    @property
    def over_floor(self) -> float:
        return self.seconds / self.floor_seconds


@dataclass
class ShapeResult:
    shape: str
    params: int
    passes: dict[str, PassTiming] = field(default_factory=dict)
    projected: dict[str, tuple[float, float]] = field(default_factory=dict)  # mode -> (TPF, tok/s)


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
                a = torch.empty(lora_rank, o.weight.shape[1], device=device, dtype=dtype).normal_(0, 0.02,
                                                                                                  generator=gen)
                b = torch.empty(o.weight.shape[0], lora_rank, device=device, dtype=dtype).normal_(0, 0.02,
                                                                                                  generator=gen)
                o.set_adapter(a, b, 4.0)
    return net.eval()


def pass_kinds(block: int, lora: bool) -> list[tuple[str, int, str, bool]]:
    """(kind, tokens, mask, lora) of every pass kind measured."""
    kinds = [("ar_step", 1, "causal", False), ("block_step", block, "bidirectional", False)]
    if lora:
        kinds.append(("draft_step", block, "bidirectional", True))
    kinds += [("verify", block, "causal", False), ("quadratic", block * (block + 1), "quadratic", False)]
    return kinds


def weight_bytes(net: NLDTransformer, lora: bool) -> int:
    """Bytes of weights one pass reads: everything but the embedding table (and the adapter unless used)."""
    total = 0
    for name, p in net.named_parameters():
        if name == "encoder.embed_tokens.weight" or (".lora_" in name and not lora):
            continue
        total += p.numel() * p.element_size()
    return total


def project(passes: dict[str, PassTiming], tpf: dict[str, float]) -> dict[str, tuple[float, float]]:
    """mode -> (TPF, projected tok/s = TPF / mean seconds of the passes the mode alternates)."""
    out = {}
    for mode, kinds in MODE_PASSES.items():
        kinds = tuple(k if k in passes else "block_step" for k in kinds)  # no adapter: drafts are block steps
        seconds = sum(passes[k].seconds for k in kinds) / len(kinds)
        out[mode] = (tpf[mode], tpf[mode] / seconds)
    return out


def bench_shape(shape: str, device: torch.device, dtype: torch.dtype, context: int, block: int,
                lora_rank: int, bandwidth: float, tpf: dict[str, float], iters: int) -> ShapeResult:
    cfg = NLDConfig(**SHAPES[shape], block_size=block)
    net = random_network(cfg, device, dtype, lora_rank)
    quad = block * (block + 1)
    model = StaticModel(net, max_seq_len=context + quad, graph_tokens=(1, block, quad))
    result = ShapeResult(shape, sum(p.numel() for n, p in net.named_parameters() if ".lora_" not in n))
    cache = model.new_cache(1, context + quad)
    gen = torch.Generator(device=device).manual_seed(1)
    for kind, tokens, mask_kind, lora in pass_kinds(block, lora_rank > 0):
        ids = torch.randint(0, cfg.vocab_size, (1, tokens), device=device, generator=gen)
        positions = None
        mask = mask_kind
        if kind == "quadratic":
            mask = quadratic_step_mask(block, context, device)
            positions = (context + torch.arange(block, device=device)[:, None]
                         + torch.arange(block + 1, device=device)[None, :]).flatten()
        cache.length = context  # the prefix; its K/V values do not change the cost

        def one_pass(model=model, ids=ids, mask=mask, cache=cache, positions=positions, lora=lora):
            return model(ids, mask=mask, cache=cache, positions=positions, lora=lora)

        seconds = time_per_call(one_pass, device, iters=iters, warmup=3)
        wb = weight_bytes(net, lora)
        window = model.window(context + tokens)
        kv = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * window * cfg.head_dim * dtype.itemsize
        result.passes[kind] = PassTiming(kind, tokens, seconds, wb, kv, wb / bandwidth)
    result.projected = project(result.passes, tpf)
    del model, net, cache
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result


def run(shapes: list[str], device: str | None = None, context: int = 512, block: int = 32, lora_rank: int = 128,
        iters: int = 20, tpf: dict[str, float] | None = None, bandwidth_bytes: int | None = None) -> str:
    """Benchmark `shapes` and return the markdown report."""
    unknown = [s for s in shapes if s not in SHAPES]
    if unknown:
        raise ValueError(f"unknown shape(s) {', '.join(unknown)}; choose from {', '.join(SHAPES)}")
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda but no CUDA device is available")
    big = [s for s in shapes if s != "tiny"]
    if dev.type != "cuda" and big:
        raise ValueError(f"shape(s) {', '.join(big)} need a CUDA GPU (tens of GB in bf16); on CPU use --shapes tiny")
    if context < 1 or block < 2:
        raise ValueError("context must be >= 1 and block >= 2")
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    torch.manual_seed(0)
    bandwidth = copy_bandwidth(dev, bandwidth_bytes or (2 << 30 if dev.type == "cuda" else 64 << 20))
    results = [
        bench_shape(s, dev, dtype, context, block, lora_rank, bandwidth, {**PAPER_TPF[s], **(tpf or {})}, iters)
        for s in shapes
    ]
    return render(results, machine_name(dev), bandwidth, context, block, lora_rank, dtype, dev.type == "cuda")


def render(results: list[ShapeResult], machine: str, bandwidth: float, context: int, block: int, lora_rank: int,
           dtype: torch.dtype, graphs: bool) -> str:
    lines = [
        f"Machine: {machine}. dtype {str(dtype).removeprefix('torch.')}, "
        f"{'CUDA graphs' if graphs else 'eager (no CUDA)'}, KV prefix {context} tokens, block {block}, "
        f"drafter LoRA rank {lora_rank}. Measured copy bandwidth {bandwidth / 1e9:.1f} GB/s.",
        "",
        "| shape | pass | tokens | ms / pass | floor ms (weights / bandwidth) | x floor | weight MB | KV MB read |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        for p in r.passes.values():
            size = f"{r.params / 1e9:.2f}B" if r.params >= 1e8 else f"{r.params / 1e6:.2f}M"
            lines.append(
                f"| {r.shape} ({size}) | {p.kind} | {p.tokens} | {p.seconds * 1e3:.3f} | "
                f"{p.floor_seconds * 1e3:.3f} | {p.over_floor:.2f} | {p.weight_bytes / 1e6:.1f} | "
                f"{p.kv_bytes / 1e6:.1f} |"
            )
    lines += ["", "Projected decode speed at batch 1 (TPF from the paper unless given; tok/s = TPF / s per pass):", "",
              "| shape | mode | passes | TPF | projected tok/s | x AR |", "|---|---|---|---:|---:|---:|"]
    for r in results:
        ar = r.projected["ar"][1]
        for mode, (tpf, tps) in r.projected.items():
            kinds = " + ".join(k for k in MODE_PASSES[mode] if k in r.passes) or "block_step"
            lines.append(f"| {r.shape} | {mode} | {kinds} | {tpf:.2f} | {tps:.1f} | {tps / ar:.2f} |")
    lines += ["", "Targets (GPU): AR step within 1.25x of its floor; a block step within 1.3x of the AR step.", ""]
    for r in results:
        ar, blk = r.passes["ar_step"], r.passes["block_step"]
        ok1 = "ok" if ar.over_floor <= 1.25 else "MISSED"
        ok2 = "ok" if blk.seconds <= 1.3 * ar.seconds else "MISSED"
        note = "" if graphs else " (CPU run: not a GPU measurement, targets do not apply)"
        lines.append(f"- {r.shape}: AR step {ar.over_floor:.2f}x floor [{ok1}]; block step "
                     f"{blk.seconds / ar.seconds:.2f}x AR step [{ok2}]{note}")
    return "\n".join(lines) + "\n"
