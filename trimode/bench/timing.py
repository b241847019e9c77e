"""Wall-clock timing that is honest on a GPU (synchronise around the timed region) and robust to noise."""

from __future__ import annotations

import platform
import statistics
import time
from collections.abc import Callable

import torch


def synchronize(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def time_per_call(fn: Callable[[], object], device: torch.device | str, iters: int = 10, warmup: int = 2,
                  repeats: int = 3) -> float:
    """Seconds per call of `fn`: the median over `repeats` of (time of `iters` back-to-back calls) / iters."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    samples = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(iters):
            fn()
        synchronize(device)
        samples.append((time.perf_counter() - t0) / iters)
    return statistics.median(samples)


def copy_bandwidth(device: torch.device | str, nbytes: int) -> float:
    """Measured device memory bandwidth in bytes/s: a tensor copy reads and writes `nbytes` each."""
    n = nbytes // 2
    src = torch.ones(n, dtype=torch.bfloat16, device=device)
    dst = torch.empty_like(src)
    seconds = time_per_call(lambda: dst.copy_(src), device, iters=10, warmup=3, repeats=5)
    return 2 * n * 2 / seconds


def machine_name(device: torch.device | str) -> str:
    """A one-line description of where a benchmark ran."""
    device = torch.device(device)
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        return f"{p.name} ({p.total_memory / 2**30:.0f} GiB), torch {torch.__version__}, CUDA {torch.version.cuda}"
    cpu = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"CPU {cpu}, {torch.get_num_threads()} torch threads, torch {torch.__version__}"
