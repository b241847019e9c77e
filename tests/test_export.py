"""`trimode export --format hf-causal-lm`: transformers loads the export without remote code and computes the
same logits and the same greedy tokens as this engine's AR mode."""

import json

import pytest
import torch
from typer.testing import CliRunner

from tests.conftest import TINY_A, random_model
from trimode.cli import app
from trimode.export import export_hf_causal_lm
from trimode.model.loading import load_model, save_checkpoint

transformers = pytest.importorskip("transformers")
PROMPT = [1, 17, 42, 99, 3, 250, 7]


def hf_load(path, dtype=torch.float32):
    transformers.logging.set_verbosity_error()
    return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    out = tmp_path_factory.mktemp("hf") / "tiny-a"
    result = CliRunner().invoke(app, ["export", "--model", str(TINY_A), "--format", "hf-causal-lm", "--output",
                                      str(out), "--dtype", "float32"])
    assert result.exit_code == 0, result.output
    return out


def test_export_layout(exported):
    cfg = json.loads((exported / "config.json").read_text())
    assert cfg["architectures"] == ["Ministral3ForCausalLM"] and "auto_map" not in cfg
    assert cfg["rope_parameters"]["rope_type"] == "yarn" and cfg["rope_parameters"]["llama_4_scaling_beta"] == 0.1
    from safetensors import safe_open

    with safe_open(str(exported / "model.safetensors"), "pt") as f:
        names = set(f.keys())
    assert "lm_head.weight" in names and "model.embed_tokens.weight" in names
    assert not any(n.startswith(("encoder.", "diffusion_head")) for n in names)
    assert len(names) == 9 * 2 + 3  # 9 tensors per layer + embed, norm, head (no LoRA tensors)


@pytest.mark.parametrize("start", [0, 20_000])  # 20k: past original_max_position_embeddings, query scaling on
def test_logits_match(exported, start):
    hf = hf_load(exported)
    net = load_model(TINY_A)
    ids = torch.tensor([PROMPT])
    pos = torch.arange(start, start + len(PROMPT))[None]
    with torch.no_grad():
        ours = net(ids, positions=pos)
        theirs = hf(ids, position_ids=pos).logits
    assert torch.allclose(ours, theirs, atol=1e-4, rtol=0)


def test_greedy_generate_matches(exported):
    import trimode

    hf = hf_load(exported)
    tm = trimode.load(TINY_A, lora=False)
    ours = tm.generate(PROMPT, mode="ar", max_new_tokens=48, eos_token_id=-1).token_ids
    with torch.no_grad():
        theirs = hf.generate(torch.tensor([PROMPT]), max_new_tokens=48, do_sample=False, eos_token_id=None,
                             pad_token_id=0)[0, len(PROMPT):].tolist()
    assert len(ours) == 48 and ours == theirs


def test_bfloat16_export_matches_bfloat16_engine(tmp_path):
    # In bf16 both engines run the same kernels; RoPE frequencies must stay float32 on both sides.
    out = export_hf_causal_lm(TINY_A, tmp_path / "bf16")
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    hf = hf_load(out, torch.bfloat16)
    net = load_model(TINY_A, dtype=torch.bfloat16)
    ids = torch.tensor([PROMPT])
    pos = torch.arange(5000, 5000 + len(PROMPT))[None]
    with torch.no_grad():
        assert torch.equal(net(ids, positions=pos), hf(ids, position_ids=pos).logits)


def test_plain_rope_exports_as_mistral(tmp_path):
    net = random_model(seed=3, dtype=torch.float32)
    net.config.rope_parameters.update(rope_type="default", llama_4_scaling_beta=0.0)
    src = tmp_path / "src"
    save_checkpoint(net, src, dtype=torch.float32)
    out = export_hf_causal_lm(src, tmp_path / "out", dtype="float32")
    assert json.loads((out / "config.json").read_text())["architectures"] == ["MistralForCausalLM"]
    hf = hf_load(out)
    ours = load_model(src)
    ids = torch.tensor([[1, 9, 22, 40, 7]])
    with torch.no_grad():
        assert torch.allclose(ours(ids), hf(ids).logits, atol=1e-4, rtol=0)


def test_sharded_export_loads(tmp_path):
    out = export_hf_causal_lm(TINY_A, tmp_path / "sharded", dtype="float32", max_shard_bytes=100_000)
    assert (out / "model.safetensors.index.json").is_file() and len(list(out.glob("model-*.safetensors"))) > 1
    hf = hf_load(out)
    with torch.no_grad():
        assert torch.allclose(load_model(TINY_A)(torch.tensor([PROMPT])), hf(torch.tensor([PROMPT])).logits,
                              atol=1e-4, rtol=0)


def test_export_errors_are_one_line(tmp_path):
    runner = CliRunner()
    r = runner.invoke(app, ["export", "--model", str(tmp_path / "missing"), "--output", str(tmp_path / "o")])
    assert r.exit_code == 2 and "no checkpoint directory" in r.output and "Traceback" not in r.output
    r = runner.invoke(app, ["export", "--model", str(TINY_A), "--output", str(tmp_path / "o"), "--format", "gguf"])
    assert r.exit_code == 2 and "unknown format 'gguf'" in r.output
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    r = runner.invoke(app, ["export", "--model", str(TINY_A), "--output", str(tmp_path / "full")])
    assert r.exit_code == 2 and "not empty" in r.output
    r = runner.invoke(app, ["export", "--model", str(TINY_A), "--output", str(tmp_path / "o"), "--dtype", "int8"])
    assert r.exit_code == 2 and "unknown dtype" in r.output
