"""Reading and writing NLD checkpoint directories: safetensors and JSON only, never code or pickle.

Layout (the released one):
    config.json
    model.safetensors | model.safetensors.index.json + shards
    linear_spec_lora/adapter_config.json + adapter_model.safetensors   (optional drafter adapter, PEFT format)
    sampler/config.json + model.safetensors                            (optional learned unmasking sampler)
    tokenizer.json, tokenizer_config.json                               (optional)
A Hub repo id resolves through `huggingface_hub` to the same layout in the local cache.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from trimode.model.config import CheckpointError, NLDConfig
from trimode.model.sampler import SAMPLER_DIR, load_sampler
from trimode.model.transformer import NLDTransformer, yarn_inv_freq

WEIGHTS = "model.safetensors"
INDEX = "model.safetensors.index.json"
LORA_DIR = "linear_spec_lora"
HUB_PATTERNS = ["*.json", "*.safetensors", "*.jinja", f"{LORA_DIR}/*", f"{SAMPLER_DIR}/*"]


def resolve_checkpoint(path_or_repo: str | Path, revision: str | None = None, local_files_only: bool = False,
                       cache_dir: str | Path | None = None) -> Path:
    """A local directory as is; otherwise a Hub repo id downloaded (or found in the cache) by huggingface_hub."""
    p = Path(path_or_repo).expanduser()
    if p.is_dir():
        return p
    if p.exists():
        raise CheckpointError(f"{p} is a file; expected a checkpoint directory")
    name = str(path_or_repo)
    if name.count("/") != 1 or name.startswith((".", "/")):
        raise CheckpointError(f"no checkpoint directory {name!r} (and it is not a Hub repo id 'org/name')")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

    try:
        return Path(
            snapshot_download(
                name, revision=revision, allow_patterns=HUB_PATTERNS, local_files_only=local_files_only,
                cache_dir=cache_dir,
            )
        )
    except (HFValidationError, LocalEntryNotFoundError) as e:
        raise CheckpointError(f"cannot resolve {name!r} on the Hub or in its cache: {e}") from None


def _weight_files(ckpt: Path) -> list[Path]:
    if (ckpt / INDEX).is_file():
        index = json.loads((ckpt / INDEX).read_text())
        names = sorted(set(index.get("weight_map", {}).values()))
        if not names:
            raise CheckpointError(f"{ckpt / INDEX} has an empty weight_map")
        missing = [n for n in names if not (ckpt / n).is_file()]
        if missing:
            raise CheckpointError(f"shard(s) listed in {INDEX} are missing from {ckpt}: {', '.join(missing)}")
        return [ckpt / n for n in names]
    if (ckpt / WEIGHTS).is_file():
        return [ckpt / WEIGHTS]
    raise CheckpointError(f"no {WEIGHTS} or {INDEX} in {ckpt}")


def read_tensors(files: list[Path]) -> dict[str, torch.Tensor]:
    """Every tensor of `files` on the CPU (memory-mapped until touched). For small files: adapters, tests."""
    tensors: dict[str, torch.Tensor] = {}
    for f in files:
        try:
            with safe_open(str(f), framework="pt") as fh:
                for k in fh.keys():
                    tensors[k] = fh.get_tensor(k)
        except Exception as e:  # safetensors raises its own error types for corrupt headers
            raise CheckpointError(f"{f} is not a readable safetensors file: {e}") from None
    return tensors


def read_shapes(files: list[Path]) -> dict[str, tuple[Path, tuple[int, ...]]]:
    """Each tensor's file and shape, from the safetensors headers alone (no tensor data is read)."""
    found: dict[str, tuple[Path, tuple[int, ...]]] = {}
    for f in files:
        try:
            with safe_open(str(f), framework="pt") as fh:
                for k in fh.keys():
                    found[k] = (f, tuple(fh.get_slice(k).get_shape()))
        except Exception as e:  # safetensors raises its own error types for corrupt headers
            raise CheckpointError(f"{f} is not a readable safetensors file: {e}") from None
    return found


def match_names(model: NLDTransformer, shapes: dict[str, tuple[int, ...]], source: str) -> dict[str, str]:
    """Map each of `model`'s tensors to the checkpoint name it is read from, or raise a clear CheckpointError
    for missing, unexpected or misshapen tensors. A tied checkpoint without `diffusion_head.weight` fills the
    head from `encoder.embed_tokens.weight` (a copy: the loaded network keeps two parameters)."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items() if ".lora_" not in k}
    names = {k: k for k in shapes}
    head, embed = "diffusion_head.weight", "encoder.embed_tokens.weight"
    if model.config.tie_word_embeddings and head not in shapes and embed in shapes:
        names[head] = embed
    missing = sorted(set(expected) - set(names))
    unexpected = sorted(set(names) - set(expected))
    if missing:
        more = " ..." if len(missing) > 8 else ""
        raise CheckpointError(f"{source}: missing tensors: {', '.join(missing[:8])}{more}")
    if unexpected:
        raise CheckpointError(
            f"{source}: unexpected tensors: {', '.join(unexpected[:8])}" + (" ..." if len(unexpected) > 8 else "")
        )
    for k, shape in expected.items():
        if tuple(shapes[names[k]]) != shape:
            raise CheckpointError(
                f"{source}: tensor {k} has shape {list(shapes[names[k]])}, the config implies {list(shape)}"
            )
    return {k: names[k] for k in expected}


def load_state(model: NLDTransformer, tensors: dict[str, torch.Tensor], source: str) -> None:
    """Copy `tensors` into `model` (already materialised), with the checks of `match_names`."""
    names = match_names(model, {k: tuple(v.shape) for k, v in tensors.items()}, source)
    with torch.no_grad():
        for k, v in model.state_dict().items():
            if k in names:
                v.copy_(tensors[names[k]].to(v.dtype))


def load_model(ckpt: Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> NLDTransformer:
    """The network of `ckpt`, its weights read straight into `dtype` on `device`.

    The network is built on the meta device; each parameter is then allocated once, in its final dtype on its
    final device, and filled from the memory-mapped checkpoint file, one tensor at a time. The file is reopened
    per tensor so the pages one tensor touched are unmapped before the next: peak memory is the loaded network
    plus its largest tensor, not the network plus a float32 (or on-device) copy plus the whole file.
    """
    cfg = NLDConfig.from_json(ckpt / "config.json")
    files = _weight_files(ckpt)
    found = read_shapes(files)
    with torch.device("meta"):
        model = NLDTransformer(cfg)
    names = match_names(model, {k: shape for k, (_, shape) in found.items()}, str(ckpt))
    device = torch.device(device)
    state: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for k, name in names.items():
            f, shape = found[name]
            out = torch.empty(shape, dtype=dtype, device=device)
            try:
                with safe_open(str(f), framework="pt") as fh:
                    out.copy_(fh.get_tensor(name))  # cast (and host-to-device copy) of this one tensor
            except Exception as e:
                raise CheckpointError(f"{f}: cannot read tensor {name}: {e}") from None
            state[k] = out
    model.load_state_dict(state, strict=True, assign=True)
    # RoPE frequencies are not in the checkpoint (still on meta): derived from the config, always float32,
    # exactly as NLDTransformer._apply recomputes them after a .to().
    model.inv_freq = yarn_inv_freq(cfg)[0].to(device)
    attach_sampler(model, ckpt / SAMPLER_DIR if (ckpt / SAMPLER_DIR / "config.json").is_file() else None)
    return model.eval()


def attach_sampler(model: NLDTransformer, sampler_dir: Path | None) -> None:
    """`model.sampler`: the learned unmasking sampler of `sampler_dir` (None: none). Kept outside the module
    tree, so the network's state dict (and a saved checkpoint) never includes it."""
    sampler = None if sampler_dir is None else load_sampler(sampler_dir, model.device)
    object.__setattr__(model, "sampler", sampler)


def load_lora(model: NLDTransformer, lora_dir: Path) -> None:
    """Attach a PEFT LoRA adapter on `o_proj` (scale lora_alpha / r), used only by passes that ask for it."""
    cfg_path, weights = lora_dir / "adapter_config.json", lora_dir / "adapter_model.safetensors"
    for p in (cfg_path, weights):
        if not p.is_file():
            raise CheckpointError(f"missing {p.name} in {lora_dir}")
    cfg = json.loads(cfg_path.read_text())
    if cfg.get("peft_type", "LORA") != "LORA":
        raise CheckpointError(f"{cfg_path}: peft_type {cfg.get('peft_type')!r} is not LORA")
    targets = cfg.get("target_modules") or []
    if isinstance(targets, str):
        targets = [targets]
    if set(targets) != {"o_proj"}:
        raise CheckpointError(f"{cfg_path}: target_modules {targets} not supported (the drafter adapts o_proj only)")
    if cfg.get("use_dora") or cfg.get("use_rslora"):
        raise CheckpointError(f"{cfg_path}: DoRA / rsLoRA adapters are not supported")
    r, alpha = int(cfg["r"]), float(cfg["lora_alpha"])
    tensors = read_tensors([weights])
    layers = model.encoder.layers
    prefix = "base_model.model.encoder.layers.{}.self_attn.o_proj.lora_{}.weight"
    used = set()
    for i, layer in enumerate(layers):
        o = layer.self_attn.o_proj
        ka, kb = prefix.format(i, "A"), prefix.format(i, "B")
        if ka not in tensors or kb not in tensors:
            raise CheckpointError(f"{weights}: missing {ka if ka not in tensors else kb}")
        a, b = tensors[ka], tensors[kb]
        if a.shape != (r, o.weight.shape[1]) or b.shape != (o.weight.shape[0], r):
            raise CheckpointError(
                f"{weights}: layer {i} LoRA shapes A{list(a.shape)} B{list(b.shape)} do not fit o_proj "
                f"{list(o.weight.shape)} with r={r}"
            )
        o.set_adapter(a, b, alpha / r)
        used |= {ka, kb}
    extra = sorted(set(tensors) - used)
    if extra:
        raise CheckpointError(f"{weights}: unexpected tensors: {', '.join(extra[:8])}")


def save_checkpoint(model: NLDTransformer, out: Path, max_shard_bytes: int | None = None,
                    dtype: torch.dtype = torch.bfloat16) -> None:
    """Write config.json and the weights (one file, or shards plus an index when over `max_shard_bytes`)."""
    out.mkdir(parents=True, exist_ok=True)
    model.config.save(out / "config.json")
    state = {k: v.detach().to(dtype).contiguous().cpu() for k, v in model.state_dict().items() if ".lora_" not in k}
    write_weights(state, out, max_shard_bytes)


def write_weights(state: dict[str, torch.Tensor], out: Path, max_shard_bytes: int | None = None) -> None:
    """`model.safetensors`, or shards plus `model.safetensors.index.json` when over `max_shard_bytes`."""
    total = sum(v.numel() * v.element_size() for v in state.values())
    if max_shard_bytes is None or total <= max_shard_bytes:
        save_file(state, str(out / WEIGHTS), metadata={"format": "pt"})
        return
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for k, v in state.items():
        n = v.numel() * v.element_size()
        if shards[-1] and size + n > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][k] = v
        size += n
    weight_map = {}
    for i, shard in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(out / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in shard})
    (out / INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))


def save_lora(model: NLDTransformer, out: Path, r: int, alpha: float) -> None:
    """Write the drafter adapter in the PEFT layout `load_lora` reads."""
    out.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for i, layer in enumerate(model.encoder.layers):
        o = layer.self_attn.o_proj
        base = f"base_model.model.encoder.layers.{i}.self_attn.o_proj"
        tensors[f"{base}.lora_A.weight"] = o.lora_A.detach().float().contiguous().cpu()
        tensors[f"{base}.lora_B.weight"] = o.lora_B.detach().float().contiguous().cpu()
    save_file(tensors, str(out / "adapter_model.safetensors"))
    cfg = {
        "peft_type": "LORA", "r": r, "lora_alpha": alpha, "target_modules": ["o_proj"], "lora_dropout": 0.0,
        "bias": "none", "use_dora": False, "use_rslora": False, "fan_in_fan_out": False, "inference_mode": True,
        "task_type": None, "base_model_name_or_path": None,
    }
    (out / "adapter_config.json").write_text(json.dumps(cfg, indent=2) + "\n")
