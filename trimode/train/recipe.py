"""A training recipe: the whole run as data, read from YAML. Unknown keys are errors naming the key and the file.

    output_dir: runs/my-run
    model:      {init_from: DIR | config: {...NLDConfig fields}, mask_token_id, dtype, init_std}
    tokenizer:  {path: DIR | train_vocab_size: N}
    data:       {sources: [...], train_jsonl: [...], eval_jsonl: [...], seq_len, packing, infill: {...}, ...}
    objective:  {alpha, eps, block_size, substitute_rate, substitute_from, substitute_weight, keep_weight}
    optim:      {lr, min_lr, betas, weight_decay, adam_eps, grad_clip, warmup_steps, decay_steps, decay}
    train:      {steps, batch_size, micro_batch_size, seed, device, autocast, parallel, save_every, ...}
    eval:       {every, max_rows, tasks}

See docs/training.md for every field.
"""

from __future__ import annotations

import os
import types
import typing
from dataclasses import MISSING, asdict, dataclass, field, fields, is_dataclass
from pathlib import Path

import yaml


class RecipeError(ValueError):
    """A recipe that cannot be used; the message names the file and the key."""


@dataclass
class ModelSection:
    init_from: str | None = None  # NLD checkpoint dir, or HF Llama / Mistral / Ministral3 / Qwen2 causal-LM dir
    config: dict | None = None  # NLDConfig fields for a random init (vocab_size defaults to the tokenizer's)
    mask_token_id: int | str | None = None  # id or token string; required when converting an AR checkpoint
    dtype: str = "float32"  # parameter (and optimizer state) dtype
    init_std: float = 0.02  # random init: normal(0, init_std) for every matrix


@dataclass
class TokenizerSection:
    path: str | None = None  # dir with tokenizer.json (+ tokenizer_config.json); default: init_from's tokenizer
    train_vocab_size: int | None = None  # train a tokenizer on the training documents (trimode.train.tokenizer_train)


@dataclass
class InfillSection:
    """Infill examples mixed into the data (trimode.train.data.infill_examples); share 0: none."""

    share: float = 0.0  # infill examples per document
    max_hole: int = 4  # middle: 1..max_hole words (whitespace-separated, each with the whitespace before it)
    max_pad: int = 8  # pad tokens after the middle: 0..max_pad
    max_suffix: int = 32  # visible suffix: the rest of the text if at most this long, else 0..max_suffix tokens
    tail: float = 0.25  # share of tails: end of the text + EOS x (1 + 0..max_pad), nothing after (see data.py)
    prefix_space: float = 0.0  # share of holes whose leading whitespace stays in the prefix ("a b " | "c" | " d")
    holes: int = 1  # holes per infill example: uniform in 1..holes (templates fill several at once)


@dataclass
class DataSection:
    sources: list = field(default_factory=list)  # handed to trimode.train.corpus.load_corpus(sources, split, seed)
    train_split: str = "train"
    eval_split: str = "heldout"
    train_jsonl: list = field(default_factory=list)  # local JSONL files: {"text": ..., "prompt": ...} per line
    eval_jsonl: list = field(default_factory=list)
    seq_len: int = 512
    packing: str = "concat"  # "concat" or "pad" (see trimode/train/data.py)
    infill: InfillSection = field(default_factory=InfillSection)


@dataclass
class ObjectiveSection:
    alpha: float = 0.3  # weight of the diffusion loss
    eps: float = 1e-3  # minimum mask probability
    block_size: int | None = None  # dual-stream block size (default: the model config's block_size)
    substitute_rate: float = 0.0  # share of visible noisy loss tokens replaced by another token (0: off)
    substitute_from: str = "row"  # replacements: "row" (the row's own loss tokens) or "vocab" (uniform)
    substitute_weight: float = 1.0  # weight of the substituted-token CE (times alpha)
    keep_weight: float = 1.0  # weight of the CE of the other visible loss tokens (times alpha; with substitution)


@dataclass
class OptimSection:
    lr: float = 3e-4
    min_lr: float = 3e-5
    betas: list = field(default_factory=lambda: [0.9, 0.95])
    weight_decay: float = 0.1  # on matrices only (not norms)
    adam_eps: float = 1e-8
    grad_clip: float = 1.0  # max global grad norm; 0 = no clipping
    warmup_steps: int = 0
    decay_steps: int | None = None  # default: 20% of train.steps
    decay: str = "linear"  # "linear" or "cosine"


@dataclass
class TrainSection:
    steps: int = 1000
    batch_size: int = 32  # global batch, rows of seq_len (= micro_batch_size x grad accumulation x world size)
    micro_batch_size: int | None = None  # rows per forward on one rank (default: batch_size / world size)
    seed: int = 0
    device: str | None = None  # default: cuda:<local rank> when available, else cpu
    autocast: str | None = None  # "bfloat16" / "float16": autocast the forward; null: run in model.dtype
    parallel: str = "ddp"  # with several processes (torchrun): "ddp" or "fsdp"
    save_every: int = 0  # steps between checkpoints (0: only where --stop-at stops)
    keep_checkpoints: int = 2
    max_shard_bytes: int | None = None  # shard model.safetensors above this size
    log_every: int = 1


@dataclass
class EvalSection:
    every: int = 0  # steps between held-out evaluations (0: never; the final step always evaluates when > 0)
    max_rows: int = 64  # held-out rows evaluated
    tasks: dict | None = None  # keyword arguments for trimode.train.evaluate.evaluate_modes(tm, **tasks)


@dataclass
class Recipe:
    output_dir: str
    model: ModelSection = field(default_factory=ModelSection)
    tokenizer: TokenizerSection = field(default_factory=TokenizerSection)
    data: DataSection = field(default_factory=DataSection)
    objective: ObjectiveSection = field(default_factory=ObjectiveSection)
    optim: OptimSection = field(default_factory=OptimSection)
    train: TrainSection = field(default_factory=TrainSection)
    eval: EvalSection = field(default_factory=EvalSection)

    def to_dict(self) -> dict:
        return asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    @classmethod
    def from_dict(cls, raw: dict, source: str = "<recipe>", base_dir: Path | None = None) -> Recipe:
        recipe = _build(cls, raw, source, "")
        if base_dir is not None:
            recipe.resolve_paths(base_dir)
        recipe.validate(source)
        return recipe

    @classmethod
    def load(cls, path: str | Path) -> Recipe:
        """Read a YAML recipe; relative paths in it are relative to the recipe file."""
        path = Path(path)
        if not path.is_file():
            raise RecipeError(f"recipe file {path} does not exist")
        try:
            raw = yaml.safe_load(path.read_text())
        except yaml.YAMLError as e:
            raise RecipeError(f"{path}: not valid YAML: {e}") from None
        if not isinstance(raw, dict):
            raise RecipeError(f"{path}: a recipe is a mapping of sections (output_dir, model, data, ...)")
        return cls.from_dict(raw, str(path), path.parent)

    def resolve_paths(self, base: Path) -> None:
        def fix(p: str | None) -> str | None:
            if p is None or Path(p).expanduser().is_absolute():
                return p
            return os.path.normpath(base / p)

        self.output_dir = fix(self.output_dir)
        self.model.init_from = _local_or_repo(self.model.init_from, base)
        self.tokenizer.path = fix(self.tokenizer.path)
        self.data.train_jsonl = [fix(p) for p in self.data.train_jsonl]
        self.data.eval_jsonl = [fix(p) for p in self.data.eval_jsonl]

    def validate(self, source: str) -> None:
        def bad(key: str, why: str) -> RecipeError:
            return RecipeError(f"{source}: {key}: {why}")

        m, d, o, op, t, e = self.model, self.data, self.objective, self.optim, self.train, self.eval
        if (m.init_from is None) == (m.config is None):
            raise bad("model", "give exactly one of init_from (a checkpoint dir) or config (a random init)")
        if m.dtype not in DTYPES:
            raise bad("model.dtype", f"{m.dtype!r} is not one of {', '.join(DTYPES)}")
        if t.autocast is not None and t.autocast not in ("bfloat16", "float16"):
            raise bad("train.autocast", f"{t.autocast!r} is not bfloat16, float16 or null")
        if not d.sources and not d.train_jsonl:
            raise bad("data", "no training data: give sources (corpus) and/or train_jsonl (files)")
        if d.packing not in ("concat", "pad"):
            raise bad("data.packing", f"{d.packing!r} is not concat or pad")
        if d.seq_len < 2:
            raise bad("data.seq_len", "must be >= 2")
        if o.block_size is not None and o.block_size < 1:
            raise bad("objective.block_size", "must be >= 1")
        if o.alpha < 0 or not 0 < o.eps < 1:
            raise bad("objective", "alpha must be >= 0 and eps in (0, 1)")
        if not 0 <= o.substitute_rate < 1:
            raise bad("objective.substitute_rate", f"must be in [0, 1), got {o.substitute_rate}")
        if o.substitute_from not in ("row", "vocab"):
            raise bad("objective.substitute_from", f"{o.substitute_from!r} is not row or vocab")
        if o.substitute_weight < 0 or o.keep_weight < 0:
            raise bad("objective", "substitute_weight and keep_weight must be >= 0")
        f = d.infill
        if f.share < 0 or f.max_hole < 1 or f.max_pad < 0 or f.max_suffix < 0 or f.holes < 1:
            raise bad("data.infill", "share, max_pad and max_suffix must be >= 0, max_hole and holes >= 1")
        if not (0 <= f.tail <= 1 and 0 <= f.prefix_space <= 1):
            raise bad("data.infill", "tail and prefix_space must be in [0, 1]")
        if len(op.betas) != 2 or not all(0 <= b < 1 for b in op.betas):
            raise bad("optim.betas", f"need two numbers in [0, 1), got {op.betas}")
        if op.decay not in ("linear", "cosine"):
            raise bad("optim.decay", f"{op.decay!r} is not linear or cosine")
        if op.lr <= 0 or op.min_lr < 0 or op.grad_clip < 0:
            raise bad("optim", "lr must be > 0, min_lr and grad_clip >= 0")
        if op.decay_steps is None:
            op.decay_steps = int(0.2 * t.steps)
        if op.warmup_steps + op.decay_steps > t.steps:
            raise bad("optim", f"warmup_steps + decay_steps ({op.warmup_steps} + {op.decay_steps}) > train.steps "
                               f"({t.steps})")
        if t.steps < 1 or t.batch_size < 1:
            raise bad("train", "steps and batch_size must be >= 1")
        if t.micro_batch_size is not None and t.micro_batch_size < 1:
            raise bad("train.micro_batch_size", "must be >= 1")
        if t.parallel not in ("ddp", "fsdp"):
            raise bad("train.parallel", f"{t.parallel!r} is not ddp or fsdp")
        if t.save_every < 0 or t.keep_checkpoints < 1 or t.log_every < 1:
            raise bad("train", "save_every must be >= 0, keep_checkpoints and log_every >= 1")
        if e.every < 0 or e.max_rows < 1:
            raise bad("eval", "every must be >= 0 and max_rows >= 1")
        if e.every and not (d.sources or d.eval_jsonl):
            raise bad("eval.every", "evaluation needs held-out data: data.eval_jsonl or data.sources (eval_split)")

    def grad_accumulation(self, world_size: int) -> tuple[int, int]:
        """(micro_batch_size, accumulation steps) for `world_size` ranks; an error when they do not divide."""
        t = self.train
        if t.batch_size % world_size:
            raise RecipeError(f"train.batch_size {t.batch_size} is not divisible by the {world_size} processes")
        per_rank = t.batch_size // world_size
        micro = t.micro_batch_size or per_rank
        if per_rank % micro:
            raise RecipeError(
                f"train.batch_size / processes = {per_rank} rows per process is not a multiple of "
                f"train.micro_batch_size {micro}"
            )
        return micro, per_rank // micro


DTYPES = ("float32", "bfloat16", "float16", "float64")


def _local_or_repo(p: str | None, base: Path) -> str | None:
    """init_from: a Hub repo id ('org/name') stays one unless that path exists next to the recipe; any other
    relative path is relative to the recipe."""
    if p is None or Path(p).expanduser().is_absolute() or p.startswith("~"):
        return p
    hub_id = p.count("/") == 1 and not p.startswith(".")
    if hub_id and not (base / p).exists():
        return p
    return os.path.normpath(base / p)


def _build(cls, raw, source: str, where: str):
    if not isinstance(raw, dict):
        raise RecipeError(f"{source}: {where.rstrip('.') or 'recipe'} must be a mapping, got {type(raw).__name__}")
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in fields(cls)}
    for key in raw:
        if key not in known:
            raise RecipeError(
                f"{source}: unknown key '{where}{key}' (known: {', '.join(known)})"
            )
    kwargs = {}
    for name, f in known.items():
        key = f"{where}{name}"
        if name not in raw:
            if f.default is MISSING and f.default_factory is MISSING:
                raise RecipeError(f"{source}: missing required key '{key}'")
            continue
        value, hint = raw[name], hints[name]
        if is_dataclass(hint):
            kwargs[name] = _build(hint, value if value is not None else {}, source, f"{key}.")
        else:
            kwargs[name] = _check(value, hint, source, key)
    return cls(**kwargs)


def _check(value, hint, source: str, key: str):
    """`value` if it has the type `hint` (ints accepted for floats), else an error naming the key."""
    options = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
    for t in options:
        if t is type(None) and value is None:
            return None
        base = typing.get_origin(t) or t
        if base is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if base is float and isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        if base is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if base in (str, bool, list, dict) and isinstance(value, base):
            return value
    names = " or ".join("null" if t is type(None) else getattr(t, "__name__", str(t)) for t in options)
    raise RecipeError(f"{source}: '{key}' must be {names}, got {value!r}")
