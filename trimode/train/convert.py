"""Hugging Face causal LMs -> NLD networks: Llama, Mistral, Ministral3 (also inside the Mistral3 VLM wrapper,
whose vision tower is dropped) and Qwen2 without attention biases.

The NLD network is the same pre-norm GQA / SwiGLU decoder, so conversion is renaming (config.json + safetensors
only, no checkpoint code is run):
- tensors `model.*` -> `encoder.*`, `lm_head` -> `diffusion_head` (tied embeddings are copied into the untied
  `diffusion_head`, as the NLD continued-pretraining recipe does);
- `rope_theta` / `rope_scaling` (or transformers 5 `rope_parameters`) -> `rope_parameters` (default or yarn);
- the mask token id, which an AR checkpoint does not have, is chosen by the caller (an unused / reserved id).
In causal mode the converted network gives the source model's logits; diffusion has to be trained.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from trimode.model.config import NLD_MODEL_TYPE, CheckpointError, NLDConfig
from trimode.model.loading import _weight_files, load_state, read_tensors, save_checkpoint
from trimode.model.tokenizer import NLDTokenizer
from trimode.model.transformer import NLDTransformer

TEXT_MODELS = ("llama", "mistral", "ministral3", "qwen2")
VLM_WRAPPERS = ("mistral3",)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json")

# (source prefix, NLD prefix); None drops the tensor (the Mistral3 vision tower and projector).
RENAMES: list[tuple[str, str | None]] = [
    ("model.language_model.", "encoder."),
    ("language_model.model.", "encoder."),
    ("language_model.lm_head.", "diffusion_head."),
    ("model.vision_tower.", None),
    ("model.multi_modal_projector.", None),
    ("vision_tower.", None),
    ("multi_modal_projector.", None),
    ("model.", "encoder."),
    ("lm_head.", "diffusion_head."),
]


def model_type(ckpt: Path) -> str | None:
    """The `model_type` in `ckpt/config.json` (None when there is no readable config)."""
    try:
        return json.loads((ckpt / "config.json").read_text()).get("model_type")
    except (OSError, json.JSONDecodeError):
        return None


def is_convertible(ckpt: Path) -> bool:
    return model_type(ckpt) in TEXT_MODELS + VLM_WRAPPERS


def resolve_token(value: int | str | None, tokenizer: NLDTokenizer | None, what: str) -> int | None:
    """A token id given as an int or as a token string looked up in `tokenizer`."""
    if value is None or isinstance(value, int):
        return value
    if tokenizer is None:
        raise ValueError(f"{what} is given as the token {value!r} but there is no tokenizer to look it up")
    tid = tokenizer.token_id(value)
    if tid is None:
        raise ValueError(f"{what}: the token {value!r} is not in the tokenizer's vocabulary")
    return tid


def nld_config(raw: dict, mask_token_id: int, block_size: int = 32, source: str = "config.json") -> NLDConfig:
    """The NLD config of a supported HF causal LM's `config.json` (an error naming what is not supported)."""
    kind = raw.get("model_type")
    if kind in VLM_WRAPPERS:
        raw = raw.get("text_config") or {}
        if raw.get("model_type") not in TEXT_MODELS:
            raise CheckpointError(f"{source}: {kind} wraps a {raw.get('model_type')!r} text model; "
                                  f"only {', '.join(TEXT_MODELS)} can be converted")
        kind = raw["model_type"]
    if kind not in TEXT_MODELS:
        raise CheckpointError(f"{source}: model_type {kind!r} cannot be converted; supported: "
                              f"{', '.join(TEXT_MODELS + VLM_WRAPPERS)}")
    if raw.get("quantization_config"):
        raise CheckpointError(f"{source}: quantized checkpoints ({raw['quantization_config'].get('quant_method')}) "
                              "cannot be converted; use the bf16 / fp32 weights")
    if raw.get("attention_bias") or raw.get("mlp_bias"):
        raise CheckpointError(f"{source}: attention_bias / mlp_bias checkpoints cannot be converted "
                              "(NLD has no biases)")
    sliding = raw.get("sliding_window")
    if sliding is not None and raw.get("use_sliding_window", True) and sliding < raw.get("max_position_embeddings", 0):
        raise CheckpointError(f"{source}: sliding-window attention (sliding_window={sliding}) is not supported; "
                              "NLD attends to the whole context")
    if any(t != "full_attention" for t in raw.get("layer_types") or []):
        raise CheckpointError(f"{source}: per-layer sliding-window attention (layer_types) is not supported")
    hidden, heads = raw["hidden_size"], raw["num_attention_heads"]
    max_pos = raw.get("max_position_embeddings", 4096)
    rope = _rope_parameters(raw, max_pos, source)
    eos = raw.get("eos_token_id")
    if isinstance(eos, list):
        eos = eos[0]
    vocab = raw["vocab_size"]
    if not 0 <= mask_token_id < vocab:
        raise CheckpointError(f"mask_token_id {mask_token_id} is outside the vocabulary [0, {vocab})")
    if mask_token_id == eos:
        raise CheckpointError(f"mask_token_id {mask_token_id} is the EOS token; choose an unused token id")
    return NLDConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=raw["intermediate_size"],
        num_hidden_layers=raw["num_hidden_layers"],
        num_attention_heads=heads,
        num_key_value_heads=raw.get("num_key_value_heads") or heads,
        head_dim=raw.get("head_dim") or hidden // heads,
        rms_norm_eps=raw.get("rms_norm_eps", 1e-6),
        max_position_embeddings=max_pos,
        rope_parameters=rope,
        bos_token_id=raw.get("bos_token_id"),
        eos_token_id=eos if eos is not None else -1,
        mask_token_id=mask_token_id,
        pad_token_id=raw.get("pad_token_id"),
        block_size=block_size,
        tie_word_embeddings=False,
        hidden_act=raw.get("hidden_act", "silu"),
        dtype=str(raw.get("dtype") or raw.get("torch_dtype") or "bfloat16"),
    )


def _rope_parameters(raw: dict, max_pos: int, source: str) -> dict:
    rope = dict(raw.get("rope_parameters") or raw.get("rope_scaling") or {})
    kind = rope.pop("type", None)
    rope.setdefault("rope_type", kind or "default")
    rope.setdefault("rope_theta", raw.get("rope_theta", 10000.0))
    if rope.get("partial_rotary_factor", raw.get("partial_rotary_factor", 1.0)) not in (None, 1, 1.0):
        raise CheckpointError(f"{source}: partial rotary embeddings are not supported")
    # Every key NLDConfig would otherwise fill with NLD's own defaults is set explicitly: a Llama must not
    # inherit NLD's Llama-4 query scaling or YaRN mscale.
    if rope["rope_type"] == "default":
        return {"rope_type": "default", "rope_theta": float(rope["rope_theta"]),
                "llama_4_scaling_beta": rope.get("llama_4_scaling_beta"),
                "original_max_position_embeddings": rope.get("original_max_position_embeddings")}
    if rope["rope_type"] == "yarn":
        rope.setdefault("original_max_position_embeddings", raw.get("original_max_position_embeddings", max_pos))
        for key in ("factor", "mscale", "mscale_all_dim", "attention_factor", "llama_4_scaling_beta"):
            rope.setdefault(key, None)
        return rope
    raise CheckpointError(f"{source}: rope type {rope['rope_type']!r} is not supported (default or yarn)")


def nld_tensors(tensors: dict[str, torch.Tensor], source: str) -> dict[str, torch.Tensor]:
    """Rename HF tensors to NLD names; copy the embedding into the head when the checkpoint ties them."""
    out: dict[str, torch.Tensor] = {}
    unknown = []
    for name, t in tensors.items():
        if name.endswith(".bias"):
            raise CheckpointError(f"{source}: has bias tensors ({name}); only bias-free models can be converted "
                                  "(Qwen2 checkpoints with q/k/v biases are not)")
        if name.endswith("rotary_emb.inv_freq"):
            continue  # a buffer some old checkpoints saved; recomputed from the config
        for src, dst in RENAMES:
            if name.startswith(src):
                if dst is not None:
                    out[dst + name[len(src):]] = t
                break
        else:
            unknown.append(name)
    if unknown:
        raise CheckpointError(f"{source}: tensors with unknown names: {', '.join(unknown[:8])}")
    if "diffusion_head.weight" not in out and "encoder.embed_tokens.weight" in out:
        out["diffusion_head.weight"] = out["encoder.embed_tokens.weight"].clone()
    return out


def load_hf_causal_lm(ckpt: Path, mask_token_id: int, block_size: int = 32, dtype: torch.dtype = torch.float32,
                      device: str | torch.device = "cpu") -> NLDTransformer:
    """An NLD network with the weights of the HF causal LM in `ckpt` (config.json + safetensors)."""
    ckpt = Path(ckpt)
    cfg_path = ckpt / "config.json"
    if not cfg_path.is_file():
        raise CheckpointError(f"missing config.json in {ckpt}")
    try:
        raw = json.loads(cfg_path.read_text())
        cfg = nld_config(raw, mask_token_id, block_size, str(cfg_path))
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{cfg_path} is not valid JSON: {e}") from None
    except KeyError as e:
        raise CheckpointError(f"{cfg_path} lacks the field {e}") from None
    tensors = nld_tensors(read_tensors(_weight_files(ckpt)), str(ckpt))
    with torch.device("meta"):
        net = NLDTransformer(cfg)
    net = net.to_empty(device=device).to(dtype)
    load_state(net, tensors, str(ckpt))
    return net.eval()


def convert_checkpoint(src: Path, out: Path, mask_token_id: int | str, block_size: int = 32,
                       dtype: torch.dtype = torch.bfloat16, max_shard_bytes: int | None = None) -> Path:
    """Write the NLD checkpoint of the HF causal LM in `src` to `out` (weights, config, tokenizer files)."""
    src, out = Path(src), Path(out)
    if model_type(src) == NLD_MODEL_TYPE:
        raise CheckpointError(f"{src} is already an NLD checkpoint")
    if out.exists() and any(out.iterdir()):
        raise CheckpointError(f"output directory {out} is not empty")
    mask_id = resolve_token(mask_token_id, NLDTokenizer.from_dir(src), "mask_token_id")
    net = load_hf_causal_lm(src, mask_id, block_size, dtype=torch.float32)
    net.config.dtype = str(dtype).removeprefix("torch.")
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    save_checkpoint(net, tmp, max_shard_bytes, dtype=dtype)
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copy2(src / name, tmp / name)
    if out.exists():
        out.rmdir()
    tmp.rename(out)
    return out
