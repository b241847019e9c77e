"""Data-parallel training: `torchrun --nproc-per-node 2 ... trimode train` (gloo on CPU) equals one process with
gradient accumulation over the same global batch, for DDP and for FSDP (fully_shard)."""

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from tests.test_train_support import tiny_recipe
from trimode.train.recipe import Recipe
from trimode.train.trainer import train

STEPS = {"steps": 4, "batch_size": 4, "micro_batch_size": 2}



def log(out):
    return [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    """The reference: 1 process, 2 micro-batches of 2 rows per step (train.parallel is moot with 1 process)."""
    tmp = tmp_path_factory.mktemp("single")
    return train(Recipe.load(tiny_recipe(tmp, train=STEPS, eval={"every": 2})), progress=False)


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_two_processes_equal_one(tmp_path, single, parallel):
    recipe = tiny_recipe(tmp_path, out="multi", train={**STEPS, "parallel": parallel}, eval={"every": 2})
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "trimode.cli", "train", "--recipe", str(recipe), "--no-progress"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "2 process(es) x 1 x 2 rows" in proc.stdout

    a = load_file(str(single / "model.safetensors"))
    b = load_file(str(tmp_path / "multi" / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=1e-5, msg=k)
    la, lb = log(single), log(tmp_path / "multi")
    assert [r["step"] for r in la] == [r["step"] for r in lb]
    for ra, rb in zip(la, lb, strict=True):
        for key in ("loss", "ar_loss", "diff_loss", "grad_norm", "eval_loss", "eval_ar_loss", "eval_diff_loss"):
            if key in ra:
                assert rb[key] == pytest.approx(ra[key], abs=1e-5), (key, ra["step"])
        for key in ("masked_tokens", "ar_tokens", "eval_masked_tokens"):
            if key in ra:
                assert rb[key] == ra[key]
