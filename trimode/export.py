"""Export an NLD checkpoint as a standard `transformers` causal LM (no remote code needed to load it).

An NLD network *is* a Ministral-3 decoder whose head is the untied `diffusion_head`; used causally it is an
ordinary causal LM. The export renames the tensors (`encoder.*` -> `model.*`, `diffusion_head` -> `lm_head`)
and writes a `Ministral3ForCausalLM` config (YaRN and the Llama-4 query scaling are native there), or a
`MistralForCausalLM` config when RoPE is plain and there is no query scaling. Tokenizer files are copied
when the checkpoint has them. The drafter adapter (`linear_spec_lora/`) has no place in a causal LM and
is not exported. Only the causal (AR) mode is reproducible from the export; diffusion needs this engine.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from trimode.model.config import CheckpointError, NLDConfig
from trimode.model.loading import load_model, resolve_checkpoint, write_weights

FORMATS = ("hf-causal-lm",)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "tekken.json")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def hf_architecture(cfg: NLDConfig) -> tuple[str, str]:
    """(architecture, model_type) of the transformers class that computes exactly what this config does."""
    rp = cfg.rope_parameters
    if rp["rope_type"] == "default" and not rp.get("llama_4_scaling_beta"):
        return "MistralForCausalLM", "mistral"
    return "Ministral3ForCausalLM", "ministral3"


def hf_config(cfg: NLDConfig, dtype: torch.dtype) -> dict:
    arch, model_type = hf_architecture(cfg)
    rope = dict(cfg.rope_parameters)
    out = {
        "architectures": [arch],
        "model_type": model_type,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_hidden_layers,
        "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_key_value_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": cfg.hidden_act,
        "max_position_embeddings": cfg.max_position_embeddings,
        "rms_norm_eps": cfg.rms_norm_eps,
        "bos_token_id": cfg.bos_token_id,
        "eos_token_id": cfg.eos_token_id,
        "pad_token_id": cfg.pad_token_id,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "sliding_window": None,
        "attention_dropout": 0.0,
        "use_cache": True,
        "dtype": str(dtype).removeprefix("torch."),
    }
    if model_type == "mistral":
        out["rope_theta"] = rope["rope_theta"]
        out["rope_parameters"] = {"rope_type": "default", "rope_theta": rope["rope_theta"]}
    elif rope["rope_type"] == "default":
        # Only what plain RoPE and the Llama-4 query scaling read; transformers warns about the YaRN-only keys and
        # still notes original_max_position_embeddings, which Ministral3's query scaling does read.
        keep = ("rope_type", "rope_theta", "llama_4_scaling_beta", "original_max_position_embeddings")
        out["rope_parameters"] = {k: rope[k] for k in keep}
    else:
        out["rope_parameters"] = rope
    return out


def hf_state_dict(net) -> dict[str, torch.Tensor]:
    """The network's tensors under transformers' names (drafter adapter tensors left out)."""
    out = {}
    for name, tensor in net.state_dict().items():
        if ".lora_" in name:
            continue
        if name.startswith("encoder."):
            name = "model." + name.removeprefix("encoder.")
        elif name == "diffusion_head.weight":
            if net.config.tie_word_embeddings:
                continue  # transformers ties lm_head to the embedding itself
            name = "lm_head.weight"
        else:
            raise CheckpointError(f"no transformers name for tensor {name}")
        out[name] = tensor
    return out


def export_hf_causal_lm(source: str | Path, output: str | Path, dtype: str | None = None,
                        max_shard_bytes: int | None = None, overwrite: bool = False) -> Path:
    """Write `output/{config.json, generation_config.json, model.safetensors, tokenizer files}`.

    dtype: "float32" / "bfloat16" / "float16"; default the checkpoint's `dtype` field (bfloat16 when released).
    """
    ckpt = resolve_checkpoint(source)
    cfg = NLDConfig.from_json(ckpt / "config.json")
    dtype = dtype or cfg.dtype
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    torch_dtype = DTYPES[dtype]
    out = Path(output)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"{out} exists and is not empty (use --overwrite to replace its files)")
    if out.resolve() == ckpt.resolve():
        raise ValueError("the output directory is the checkpoint itself")
    net = load_model(ckpt, dtype=torch_dtype)
    state = {k: v.detach().contiguous() for k, v in hf_state_dict(net).items()}

    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(hf_config(cfg, torch_dtype), indent=2) + "\n")
    generation = {"bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_id, "do_sample": False}
    if cfg.pad_token_id is not None:
        generation["pad_token_id"] = cfg.pad_token_id
    (out / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    write_weights(state, out, max_shard_bytes)
    for name in TOKENIZER_FILES:
        if (ckpt / name).is_file():
            shutil.copyfile(ckpt / name, out / name)
    return out


