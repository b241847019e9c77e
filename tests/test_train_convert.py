"""HF causal LMs -> NLD: a converted network's causal logits equal the source model's (transformers, fp32)."""

import json

import pytest
import torch

from tests.test_train_support import make_tokenizer, tiny_recipe
from trimode.model.config import CheckpointError
from trimode.model.loading import load_model
from trimode.train.convert import load_hf_causal_lm
from trimode.train.recipe import Recipe
from trimode.train.trainer import train

transformers = pytest.importorskip("transformers")

SMALL = dict(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=128, bos_token_id=1, eos_token_id=2, pad_token_id=None)



def save_hf(tmp_path, model_cls, config, name="hf"):
    torch.manual_seed(0)
    model = model_cls(config).eval()
    out = tmp_path / name
    model.save_pretrained(out)
    return model, out


def hf_logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def assert_same_causal_logits(model, ckpt, length=24):
    net = load_hf_causal_lm(ckpt, mask_token_id=3)
    ids = torch.randint(4, 300, (2, length))
    with torch.no_grad():
        ours = net(ids, mask="causal")
    torch.testing.assert_close(ours, hf_logits(model, ids), rtol=1e-4, atol=1e-4)
    return net


@pytest.mark.parametrize("tied", [False, True])
def test_llama(tmp_path, tied):
    cfg = transformers.LlamaConfig(**SMALL, rope_theta=500.0, tie_word_embeddings=tied)
    model, ckpt = save_hf(tmp_path, transformers.LlamaForCausalLM, cfg)
    net = assert_same_causal_logits(model, ckpt)
    assert not net.config.tie_word_embeddings
    assert torch.equal(net.diffusion_head.weight, model.lm_head.weight.detach())
    assert net.config.rope_parameters["rope_theta"] == 500.0
    assert net.config.mask_token_id == 3 and net.config.eos_token_id == 2


def test_mistral(tmp_path):
    cfg = transformers.MistralConfig(**SMALL, head_dim=16, sliding_window=None)
    assert_same_causal_logits(*save_hf(tmp_path, transformers.MistralForCausalLM, cfg))


MINISTRAL_ROPE = {"rope_type": "yarn", "rope_theta": 1e6, "factor": 2.0, "original_max_position_embeddings": 8,
                  "beta_fast": 32.0, "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 1.0,
                  "llama_4_scaling_beta": 0.1}


def test_ministral3_yarn_and_query_scaling(tmp_path):
    """Positions past original_max_position_embeddings exercise YaRN and the Llama-4 query scaling."""
    cfg = transformers.Ministral3Config(**SMALL, head_dim=8, rope_parameters=dict(MINISTRAL_ROPE))
    model, ckpt = save_hf(tmp_path, transformers.Ministral3ForCausalLM, cfg)
    net = assert_same_causal_logits(model, ckpt, length=30)
    assert net.config.rope_parameters["llama_4_scaling_beta"] == 0.1


def test_mistral3_wrapper_keeps_the_language_model(tmp_path):
    text = transformers.Ministral3Config(**SMALL, head_dim=8, rope_parameters=dict(MINISTRAL_ROPE))
    vision = transformers.PixtralVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                              num_attention_heads=2, image_size=32, patch_size=16, head_dim=8)
    cfg = transformers.Mistral3Config(text_config=text, vision_config=vision, tie_word_embeddings=False)
    model, ckpt = save_hf(tmp_path, transformers.Mistral3ForConditionalGeneration, cfg)
    assert_same_causal_logits(model, ckpt)


def test_qwen2_with_biases_is_refused(tmp_path):
    _, ckpt = save_hf(tmp_path, transformers.Qwen2ForCausalLM, transformers.Qwen2Config(**SMALL))
    with pytest.raises(CheckpointError, match=r"bias tensors \(model.layers.0.self_attn.[qkv]_proj.bias\)"):
        load_hf_causal_lm(ckpt, mask_token_id=3)


def test_unsupported_configs_are_refused(tmp_path):
    cfg = transformers.LlamaConfig(**SMALL, rope_parameters={"rope_type": "llama3", "rope_theta": 1e4, "factor": 8.0,
                                                             "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                                             "original_max_position_embeddings": 64})
    _, ckpt = save_hf(tmp_path, transformers.LlamaForCausalLM, cfg, "llama3")
    with pytest.raises(CheckpointError, match="rope type 'llama3' is not supported"):
        load_hf_causal_lm(ckpt, mask_token_id=3)
    raw = json.loads((ckpt / "config.json").read_text())
    (ckpt / "config.json").write_text(json.dumps({**raw, "model_type": "gpt2"}))
    with pytest.raises(CheckpointError, match="model_type 'gpt2' cannot be converted"):
        load_hf_causal_lm(ckpt, mask_token_id=3)
    cfg = transformers.LlamaConfig(**SMALL)
    _, ckpt = save_hf(tmp_path, transformers.LlamaForCausalLM, cfg, "ok")
    with pytest.raises(CheckpointError, match="outside the vocabulary"):
        load_hf_causal_lm(ckpt, mask_token_id=300)


def test_convert_checkpoint_writes_a_loadable_nld_dir(tmp_path):
    from typer.testing import CliRunner

    from trimode.cli import app

    model, ckpt = save_hf(tmp_path, transformers.LlamaForCausalLM, transformers.LlamaConfig(**SMALL))
    make_tokenizer(ckpt)
    result = CliRunner().invoke(app, ["convert", str(ckpt), str(tmp_path / "nld"), "--mask-token-id", "<mask>",
                                      "--dtype", "float32"])
    assert result.exit_code == 0, result.output
    net = load_model(tmp_path / "nld")
    assert net.config.mask_token_id == 3 and (tmp_path / "nld" / "tokenizer.json").is_file()
    ids = torch.randint(4, 300, (1, 12))
    with torch.no_grad():
        torch.testing.assert_close(net(ids), hf_logits(model, ids), rtol=1e-4, atol=1e-4)
    again = CliRunner().invoke(app, ["convert", str(ckpt), str(tmp_path / "nld"), "--mask-token-id", "3"])
    assert again.exit_code == 2 and "not empty" in again.output


def test_train_from_an_hf_checkpoint(tmp_path):
    _, ckpt = save_hf(tmp_path, transformers.LlamaForCausalLM, transformers.LlamaConfig(**SMALL))
    make_tokenizer(ckpt)
    recipe = tiny_recipe(tmp_path, model={"init_from": "hf", "config": None}, tokenizer={"path": None},
                         train={"steps": 2}, optim={"warmup_steps": 0, "decay_steps": 0}, eval={"every": 0})
    with pytest.raises(ValueError, match="set model.mask_token_id"):
        train(Recipe.load(recipe), progress=False)
    recipe = tiny_recipe(tmp_path, model={"init_from": "hf", "config": None, "mask_token_id": "<mask>"},
                         tokenizer={"path": None}, train={"steps": 2}, optim={"warmup_steps": 0, "decay_steps": 0},
                         eval={"every": 0})
    out = train(Recipe.load(recipe), progress=False)
    net = load_model(out)
    assert net.config.mask_token_id == 3 and net.config.num_hidden_layers == 2
