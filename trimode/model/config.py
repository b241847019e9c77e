"""The NLD model configuration, read from and written to a checkpoint's `config.json`.

Field names are exactly those of the released Nemotron-Labs-Diffusion `config.json`, so a directory written
by this project loads in other NLD tooling and vice versa.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

NLD_MODEL_TYPE = "nemotron_labs_diffusion"
NLD_ARCHITECTURE = "NemotronLabsDiffusionModel"


class CheckpointError(ValueError):
    """A checkpoint directory that cannot be loaded; the message names the problem."""


def default_rope_parameters() -> dict:
    return {
        "rope_type": "yarn",
        "rope_theta": 1_000_000.0,
        "factor": 16.0,
        "original_max_position_embeddings": 16384,
        "beta_fast": 32.0,
        "beta_slow": 1.0,
        "mscale": 1.0,
        "mscale_all_dim": 1.0,
        "llama_4_scaling_beta": 0.1,
    }


@dataclass
class NLDConfig:
    vocab_size: int = 131072
    hidden_size: int = 4096
    intermediate_size: int = 14336
    num_hidden_layers: int = 34
    num_attention_heads: int = 32
    num_key_value_heads: int = 8
    head_dim: int = 128
    rms_norm_eps: float = 1e-5
    max_position_embeddings: int = 262144
    rope_parameters: dict = field(default_factory=default_rope_parameters)
    bos_token_id: int = 1
    eos_token_id: int = 11
    mask_token_id: int = 100
    pad_token_id: int | None = None
    block_size: int = 32
    tie_word_embeddings: bool = False
    hidden_act: str = "silu"
    # Training-objective fields kept for round-tripping the released config.
    dlm_paradigm: str = "bidirectional"
    ar_loss_weight: float = 1.0
    dlm_loss_weight: float | None = None
    dtype: str = "bfloat16"

    def __post_init__(self) -> None:
        if self.hidden_act != "silu":
            raise CheckpointError(f"hidden_act {self.hidden_act!r} is not supported (NLD uses silu)")
        if self.num_attention_heads % self.num_key_value_heads:
            raise CheckpointError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )
        rope = {**default_rope_parameters(), **(self.rope_parameters or {})}
        if rope["rope_type"] not in ("yarn", "default"):
            raise CheckpointError(f"rope_type {rope['rope_type']!r} is not supported (yarn or default)")
        self.rope_parameters = rope

    @classmethod
    def from_dict(cls, raw: dict) -> NLDConfig:
        model_type = raw.get("model_type")
        archs = raw.get("architectures") or []
        if model_type != NLD_MODEL_TYPE and NLD_ARCHITECTURE not in archs:
            raise CheckpointError(
                f"config.json describes model_type={model_type!r} architectures={archs}, "
                f"not a Nemotron-Labs-Diffusion checkpoint ({NLD_MODEL_TYPE})"
            )
        raw = dict(raw)
        if "rope_parameters" not in raw and ("rope_theta" in raw or "rope_scaling" in raw):
            # Older layout: rope_theta at top level, scaling dict under rope_scaling.
            rope = dict(raw.get("rope_scaling") or {"rope_type": "default"})
            rope.setdefault("rope_type", rope.pop("type", "default"))
            rope["rope_theta"] = raw.get("rope_theta", 1_000_000.0)
            raw["rope_parameters"] = rope
        known = {f for f in cls.__dataclass_fields__}
        kwargs = {k: v for k, v in raw.items() if k in known}
        if kwargs.get("head_dim") is None:
            kwargs["head_dim"] = raw["hidden_size"] // raw["num_attention_heads"]
        eos = kwargs.get("eos_token_id")
        if isinstance(eos, list):
            kwargs["eos_token_id"] = eos[0]
        try:
            return cls(**kwargs)
        except TypeError as e:
            raise CheckpointError(f"config.json: {e}") from None

    @classmethod
    def from_json(cls, path: str | Path) -> NLDConfig:
        path = Path(path)
        if not path.is_file():
            raise CheckpointError(f"missing {path.name} in {path.parent}")
        try:
            raw = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{path} is not valid JSON: {e}") from None
        return cls.from_dict(raw)

    def to_dict(self) -> dict:
        d = asdict(self)
        d.update(
            architectures=[NLD_ARCHITECTURE],
            model_type=NLD_MODEL_TYPE,
            attn_implementation="sdpa",
            use_cache=False,
            attention_bias=False,
            mlp_bias=False,
            sliding_window=None,
        )
        return d

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")
