"""The floor a step of the engine cannot beat on a device: the device's facts and a roofline over the step's passes.

    floor of one step = max(bytes / bandwidth, FLOPs / peak FLOP/s)
    bytes = the weights, read once (all but the embedding table; the drafter adapter when a row uses it)
          + K/V read (every row's prefix) + K/V written and read back (the pass's own tokens)
          + the logits written
    FLOPs = 2 x body parameters x tokens + 2 x hidden x vocab x logits rows
          + 4 x layers x heads x head_dim x attended (query, key) pairs (prefix + the mask's in-pass pattern)

with the device's measured copy bandwidth and a peak FLOP/s figure (datasheet for known GPUs, else a measured
matmul). Activations are not counted: the floor is a lower bound.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from trimode.bench.timing import copy_bandwidth, machine_name, time_per_call
from trimode.model.config import NLDConfig
from trimode.model.masks import QuadraticStep, pass_pattern
from trimode.model.transformer import NLDTransformer

# Dense bf16 tensor-core peak (TFLOP/s, datasheets), matched against the device name in this order.
DATASHEET_TFLOPS = [("H200", 989.0), ("H100 PCIe", 756.0), ("H100", 989.0), ("H800", 989.0), ("A100", 312.0),
                    ("L40S", 362.0), ("L4", 121.0), ("A10", 125.0)]


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



def weight_bytes(net: NLDTransformer, lora: bool) -> int:
    """Bytes of weights one pass reads: everything but the embedding table (and the adapter unless used)."""
    total = 0
    for name, p in net.named_parameters():
        if name == "encoder.embed_tokens.weight" or (".lora_" in name and not lora):
            continue
        total += p.numel() * p.element_size()
    return total


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
