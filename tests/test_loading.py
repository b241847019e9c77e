"""Checkpoint loading: single file vs shards, the drafter adapter, Hub ids through the local cache, clear errors."""

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import trimode
from tests.conftest import TINY_A
from trimode.model.config import CheckpointError, NLDConfig
from trimode.model.loading import load_lora, load_model, resolve_checkpoint, save_checkpoint


def copy_ckpt(tmp_path, name="ckpt"):
    dst = tmp_path / name
    shutil.copytree(TINY_A, dst)
    return dst


def test_sharded_checkpoint_loads_like_single_file(tmp_path):
    single = load_model(TINY_A)
    sharded_dir = tmp_path / "sharded"
    save_checkpoint(single, sharded_dir, max_shard_bytes=20_000)
    index = json.loads((sharded_dir / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2
    sharded = load_model(sharded_dir)
    for (k, a), (_, b) in zip(single.state_dict().items(), sharded.state_dict().items()):
        assert torch.equal(a, b), k
    ids = torch.tensor([[1, 2, 3, 4]])
    assert torch.equal(single(ids), sharded(ids))


def test_save_roundtrip_keeps_nld_names_and_config(tmp_path):
    net = load_model(TINY_A)
    save_checkpoint(net, tmp_path / "out")
    names = set(load_file(str(tmp_path / "out" / "model.safetensors")))
    assert names == set(load_file(str(TINY_A / "model.safetensors")))
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert cfg["model_type"] == "nemotron_labs_diffusion" and cfg["mask_token_id"] == 100


def test_hub_repo_id_resolves_through_local_cache(tmp_path):
    # The layout huggingface_hub keeps on disk: models--org--name/{refs/main, snapshots/<rev>/...}.
    rev = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--acme--tiny-nld"
    shutil.copytree(TINY_A, repo / "snapshots" / rev)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(rev)
    path = resolve_checkpoint("acme/tiny-nld", local_files_only=True, cache_dir=tmp_path / "hub")
    assert (path / "config.json").is_file()
    tm = trimode.TriMode(load_model(path))
    assert tm.generate([1, 2, 3], max_new_tokens=4).token_ids == \
        trimode.TriMode(load_model(TINY_A)).generate([1, 2, 3], max_new_tokens=4).token_ids


def test_load_api_defaults_and_lora(tmp_path):
    tm = trimode.load(TINY_A, device="cpu")
    assert tm.has_drafter and tm.net.dtype == torch.float32
    assert not trimode.load(TINY_A, lora=False).has_drafter
    r = tm.generate([5, 6, 7], mode="linear_spec", max_new_tokens=10, eos_token_id=-1)
    assert r.text is None and len(r.token_ids) == 10
    assert r.stats.forward_passes > 0 and r.stats.tokens_per_forward > 0


def test_missing_config(tmp_path):
    d = copy_ckpt(tmp_path)
    (d / "config.json").unlink()
    with pytest.raises(CheckpointError, match="missing config.json"):
        load_model(d)


def test_missing_weights(tmp_path):
    d = copy_ckpt(tmp_path)
    (d / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        load_model(d)


def test_missing_shard(tmp_path):
    save_checkpoint(load_model(TINY_A), tmp_path / "s", max_shard_bytes=20_000)
    next((tmp_path / "s").glob("model-00002-*.safetensors")).unlink()
    with pytest.raises(CheckpointError, match="missing"):
        load_model(tmp_path / "s")


def test_other_architecture(tmp_path):
    d = copy_ckpt(tmp_path)
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(model_type="llama", architectures=["LlamaForCausalLM"])
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="not a Nemotron-Labs-Diffusion checkpoint"):
        load_model(d)


def test_missing_and_unexpected_tensors(tmp_path):
    d = copy_ckpt(tmp_path)
    tensors = load_file(str(d / "model.safetensors"))
    del tensors["encoder.norm.weight"]
    save_file(tensors, str(d / "model.safetensors"))
    with pytest.raises(CheckpointError, match="missing tensors: encoder.norm.weight"):
        load_model(d)
    tensors["encoder.norm.weight"] = torch.ones(64)
    tensors["encoder.extra.weight"] = torch.ones(3)
    save_file(tensors, str(d / "model.safetensors"))
    with pytest.raises(CheckpointError, match="unexpected tensors: encoder.extra.weight"):
        load_model(d)


def test_shape_mismatch(tmp_path):
    d = copy_ckpt(tmp_path)
    tensors = load_file(str(d / "model.safetensors"))
    tensors["encoder.layers.0.mlp.up_proj.weight"] = torch.zeros(130, 64)
    save_file(tensors, str(d / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"up_proj.weight has shape \[130, 64\]"):
        load_model(d)


def test_corrupt_and_bad_lora(tmp_path):
    d = copy_ckpt(tmp_path)
    (d / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        load_model(d)
    lora = tmp_path / "lora"
    shutil.copytree(TINY_A / "linear_spec_lora", lora)
    cfg = json.loads((lora / "adapter_config.json").read_text())
    cfg["target_modules"] = ["q_proj", "v_proj"]
    (lora / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="target_modules"):
        load_lora(load_model(TINY_A), lora)


def test_bad_config_values():
    with pytest.raises(CheckpointError, match="multiple of"):
        NLDConfig(num_attention_heads=6, num_key_value_heads=4)
    with pytest.raises(CheckpointError, match="rope_type"):
        NLDConfig(rope_parameters={"rope_type": "longrope"})


def test_not_a_directory_or_repo():
    with pytest.raises(CheckpointError, match="no checkpoint directory"):
        resolve_checkpoint("/definitely/not/here")


LOAD_AND_REPORT_RSS = """
import json, sys, threading, time, torch
from pathlib import Path
torch.set_num_threads(1)
from trimode.model.loading import load_model
load_model(Path(sys.argv[2]), dtype=torch.bfloat16)  # first use pays torch's lazy set-up, not counted below
def anon_kib():  # anonymous memory only: pages of the file mapped for reading are page cache, not copies
    return next(int(x.split()[1]) for x in open("/proc/self/status") if x.startswith("RssAnon"))
before = anon_kib()
peak = [before]
done = threading.Event()
def sample():
    while not done.is_set():
        peak[0] = max(peak[0], anon_kib())
        time.sleep(0.001)
t = threading.Thread(target=sample)
t.start()
net = load_model(Path(sys.argv[1]), dtype=torch.bfloat16)
done.set()
t.join()
peak[0] = max(peak[0], anon_kib())
print(json.dumps({"before": before, "peak": peak[0], "dtype": str(net.dtype),
                  "inv_freq": str(net.inv_freq.dtype)}))
"""


@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="reads VmRSS from /proc (Linux)")
def test_bf16_load_peak_memory_is_close_to_checkpoint_size(tmp_path):
    """Weights go straight into bf16: no float32 network, no whole-file copy next to the loaded one."""
    import subprocess
    import sys

    from trimode.model.loading import write_weights
    from trimode.model.transformer import NLDTransformer

    cfg = NLDConfig(vocab_size=8192, hidden_size=1024, intermediate_size=2816, num_hidden_layers=11,
                    num_attention_heads=8, num_key_value_heads=2, head_dim=128)
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in NLDTransformer(cfg).state_dict().items()}
    gen = torch.Generator().manual_seed(0)
    state = {k: torch.empty(s, dtype=torch.bfloat16).normal_(0, 0.02, generator=gen) for k, s in shapes.items()}
    ckpt = tmp_path / "big"
    ckpt.mkdir()
    cfg.save(ckpt / "config.json")
    write_weights(state, ckpt)
    del state
    size = (ckpt / "model.safetensors").stat().st_size
    assert size > 250 * 2**20
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-c", LOAD_AND_REPORT_RSS, str(ckpt), str(TINY_A)], cwd=root,
                         env={**os.environ, "PYTHONPATH": str(root)}, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    r = json.loads(out.stdout.strip().splitlines()[-1])
    assert r["dtype"] == "torch.bfloat16" and r["inv_freq"] == "torch.float32"
    grew = (r["peak"] - r["before"]) * 1024
    # Before direct loading this was ~2x (a float32 network, then its bf16 cast).
    print(f"peak anonymous RSS grew {grew / 2**20:.0f} MiB for a {size / 2**20:.0f} MiB checkpoint "
          f"({grew / size:.2f}x)")
    assert grew < 1.3 * size, f"loading grew peak RSS by {grew / size:.2f}x the checkpoint size"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="loading onto a GPU needs CUDA")
def test_bf16_load_onto_cuda_allocates_the_network_once(tmp_path):
    """On the device: no float32 network first, no second copy; only RoPE's inv_freq stays float32."""
    cfg = NLDConfig(vocab_size=8192, hidden_size=1024, intermediate_size=2816, num_hidden_layers=4,
                    num_attention_heads=8, num_key_value_heads=2, head_dim=128)
    ckpt = tmp_path / "c"
    ckpt.mkdir()
    cfg.save(ckpt / "config.json")
    from trimode.model.loading import write_weights
    from trimode.model.transformer import NLDTransformer

    with torch.device("meta"):
        shapes = {k: v.shape for k, v in NLDTransformer(cfg).state_dict().items()}
    write_weights({k: torch.randn(s).to(torch.bfloat16) for k, s in shapes.items()}, ckpt)
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    loaded = load_model(ckpt, dtype=torch.bfloat16, device="cuda")
    tensors = [*loaded.named_parameters(), *loaded.named_buffers()]
    size = sum(t.numel() * t.element_size() for _, t in tensors)
    assert [n for n, t in tensors if t.dtype == torch.float32] == ["inv_freq"]
    assert all(t.device.type == "cuda" for _, t in tensors)
    assert torch.cuda.max_memory_allocated() - base < 1.15 * size
