"""The learned unmasking sampler (spec 2.5): a tiny bidirectional transformer over a denoising block that scores,
per slot, the probability that the slot's current top-1 is the token finally committed there.

Files (next to the model, like the drafter adapter; safetensors + JSON only, no code or pickle):
    sampler/config.json        SamplerConfig fields
    sampler/model.safetensors  the weights, and `token_proj` (the model's token embeddings projected on their
                               first `embed_dim` principal components; fixed, not trained)

Per-slot features (`SamplerConfig.features` in this order):
    top-k probabilities (k = top_k, descending), margin p1 - p2, entropy of the slot's distribution, top-k mass,
    masked ratio of the block, relative position in the block (i / L), is-masked flag,
    projected embeddings (embed_dim each) of the top `embed_top` predictions.
SGLang's LearnedSampler layout is top-5 probabilities, margin, entropy, masked ratio, 32-d token embeddings,
position; the paper's 144-d input is PCA embeddings of the top-3 predictions plus top-1 probability, margin,
top-3 mass and entropy. Here: the same scalars (top-k mass added, an is-masked flag since committed slots are
seen too) with smaller embeddings (embed_dim x embed_top) to fit a 2k-vocabulary 192-wide model. SGLang-format
checkpoints are not loaded: no published checkpoint or format exists to check a loader against.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from trimode.model.config import CheckpointError

SAMPLER_DIR = "sampler"


@dataclass(frozen=True)
class SamplerConfig:
    vocab_size: int
    top_k: int = 5
    embed_dim: int = 8
    embed_top: int = 3
    hidden: int = 64
    layers: int = 2
    heads: int = 4
    ffn: int = 128

    @property
    def features(self) -> int:
        return self.top_k + 6 + self.embed_dim * self.embed_top

    @classmethod
    def from_json(cls, path: Path) -> SamplerConfig:
        try:
            raw = json.loads(path.read_text())
            cfg = cls(**{k: int(raw[k]) for k in raw if k in cls.__dataclass_fields__})
        except (ValueError, TypeError, KeyError) as e:
            raise CheckpointError(f"{path}: not a sampler config: {e}") from None
        if cfg.embed_top > cfg.top_k or min(cfg.top_k, cfg.hidden, cfg.layers, cfg.heads) < 1:
            raise CheckpointError(f"{path}: inconsistent sampler config {asdict(cfg)}")
        return cfg


class BlockSampler(nn.Module):
    def __init__(self, cfg: SamplerConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.register_buffer("token_proj", torch.zeros(cfg.vocab_size, cfg.embed_dim))
        self.inp = nn.Linear(cfg.features, cfg.hidden)
        self.layers = nn.ModuleList(
            nn.TransformerEncoderLayer(cfg.hidden, cfg.heads, cfg.ffn, dropout=0.0, batch_first=True,
                                       norm_first=True) for _ in range(cfg.layers))
        self.out = nn.Linear(cfg.hidden, 1)

    def features(self, logits: torch.Tensor, masked: torch.Tensor) -> torch.Tensor:
        """[B, L, F] per-slot features of a block's logits [B, L, V] and undecided slots [B, L]."""
        logits = logits.float()
        probs = logits.softmax(-1)
        top = probs.topk(self.cfg.top_k, dim=-1)
        entropy = -(probs * logits.log_softmax(-1)).sum(-1, keepdim=True)
        batch, length = masked.shape
        ratio = masked.float().mean(-1, keepdim=True)[:, :, None].expand(batch, length, 1)
        position = (torch.arange(length, device=logits.device).float() / length)[None, :, None].expand(batch, -1, 1)
        emb = self.token_proj[top.indices[..., : self.cfg.embed_top]].flatten(-2)
        margin = top.values[..., :1] - top.values[..., 1:2]
        return torch.cat([top.values, margin, entropy, top.values.sum(-1, keepdim=True), ratio, position,
                          masked.float()[..., None], emb], -1)

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        """Per-slot logits [B, L] of 'the current top-1 is final'."""
        h = self.inp(feats)
        for layer in self.layers:
            h = layer(h)
        return self.out(h).squeeze(-1)

    @torch.no_grad()
    def score(self, logits: torch.Tensor, masked: torch.Tensor) -> torch.Tensor:
        """Probabilities [B, L] for a block's logits (run on the sampler's own device, in float32)."""
        dev = self.token_proj.device
        return torch.sigmoid(self(self.features(logits.to(dev), masked.to(dev)))).to(logits.device)


def save_sampler(sampler: BlockSampler, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().float().contiguous().cpu() for k, v in sampler.state_dict().items()}
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(asdict(sampler.cfg), indent=2) + "\n")


def load_sampler(path: Path, device: str | torch.device = "cpu") -> BlockSampler:
    """A sampler directory (config.json + model.safetensors); CheckpointError naming what is wrong."""
    cfg_path, weights = path / "config.json", path / "model.safetensors"
    for p in (cfg_path, weights):
        if not p.is_file():
            raise CheckpointError(f"missing {p.name} in {path}")
    sampler = BlockSampler(SamplerConfig.from_json(cfg_path))
    expected = sampler.state_dict()
    tensors = {}
    try:
        with safe_open(str(weights), framework="pt") as fh:
            for k in fh.keys():
                tensors[k] = fh.get_tensor(k)
    except Exception as e:  # safetensors raises its own error types for corrupt headers
        raise CheckpointError(f"{weights} is not a readable safetensors file: {e}") from None
    if set(tensors) != set(expected):
        diff = sorted(set(tensors) ^ set(expected))
        raise CheckpointError(f"{weights}: tensors do not match the config: {', '.join(diff[:8])}")
    for k, v in expected.items():
        if tuple(tensors[k].shape) != tuple(v.shape):
            raise CheckpointError(f"{weights}: tensor {k} has shape {list(tensors[k].shape)}, expected {list(v.shape)}")
    sampler.load_state_dict(tensors)
    return sampler.to(device).eval()
