"""How much memory `load_model` takes: a random checkpoint written to disk, loaded in a fresh process.

Used by `trimode bench gpu` (a 3B-shaped checkpoint with the real shapes, a tiny one with `--shapes tiny`). A
fresh process so that its peak RSS (`ru_maxrss`) belongs to the load alone; one small load first so torch's lazy
set-up is not counted.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

from trimode.model.config import NLDConfig
from trimode.model.transformer import NLDTransformer

LOAD_SCRIPT = """
import json, resource, sys, torch
from pathlib import Path
from trimode.model.loading import load_model
dev, dtype = torch.device(sys.argv[2]), getattr(torch, sys.argv[3])
def rss():
    return next(int(x.split()[1]) for x in open("/proc/self/status") if x.startswith("VmRSS")) * 1024
if dev.type == "cuda":
    torch.cuda.init()
from trimode.api import default_model_path
load_model(default_model_path(), dtype=dtype, device=dev)  # torch's lazy set-up is not counted below
if dev.type == "cuda":
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(dev)
before = rss()
net = load_model(Path(sys.argv[1]), dtype=dtype, device=dev)
tensors = [*net.named_parameters(), *net.named_buffers()]
out = {"host_peak_growth": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before,
       "net_bytes": sum(t.numel() * t.element_size() for _, t in tensors),
       "float32": sorted(n for n, t in tensors if t.dtype == torch.float32),
       "dtype": str(net.dtype).removeprefix("torch.")}
if dev.type == "cuda":
    out["device_peak"] = torch.cuda.max_memory_allocated(dev)
    out["device_after"] = torch.cuda.memory_allocated(dev)
print(json.dumps(out))
"""


def load_memory(cfg: NLDConfig, device: torch.device, dtype: torch.dtype) -> dict:
    """Write a random checkpoint of `cfg`'s shape (bf16 on disk, as released) and load it with `load_model` in a
    fresh process onto `device` in `dtype`. Returns the checkpoint `size`, the loaded network's `net_bytes`, the
    `host_peak_growth` of RSS while loading, the `float32` tensors, and on CUDA `device_peak` / `device_after`
    (bytes allocated at the peak and once loaded); or `error` when the load failed."""
    with tempfile.TemporaryDirectory(prefix="trimode-load-") as tmp:
        ckpt = Path(tmp)
        cfg.save(ckpt / "config.json")
        with torch.device("meta"):
            shapes = {k: v.shape for k, v in NLDTransformer(cfg).state_dict().items()}
        gen = torch.Generator().manual_seed(0)
        state = {k: torch.empty(s, dtype=torch.bfloat16).uniform_(-0.03, 0.03, generator=gen)
                 for k, s in shapes.items()}
        save_file(state, str(ckpt / "model.safetensors"), metadata={"format": "pt"})
        del state
        size = (ckpt / "model.safetensors").stat().st_size
        root = Path(__file__).resolve().parents[2]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])}
        r = subprocess.run([sys.executable, "-c", LOAD_SCRIPT, str(ckpt), str(device),
                            str(dtype).removeprefix("torch.")], env=env, capture_output=True, text=True,
                           timeout=1800)
    if r.returncode != 0:
        return {"error": (r.stderr.strip().splitlines() or ["?"])[-1], "size": size}
    return {**json.loads(r.stdout.strip().splitlines()[-1]), "size": size}
