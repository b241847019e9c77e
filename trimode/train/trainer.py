"""The training loop: a recipe in, an NLD checkpoint directory out (`trimode train --recipe FILE.yaml`).

One step = one global batch of `train.batch_size` rows, split over data-parallel ranks and micro-batches. The
noise of each row is keyed by (seed, step, row index in the global batch), the token counts of the whole global
batch are all-reduced *before* the backward passes, and each micro-batch contributes
`alpha * diff_sum / N_masked + ar_sum / N_supervised` (global loss averaging), so one process with gradient
accumulation and N processes with DDP / FSDP compute the same gradient.

Output directory:
    recipe.yaml, train_log.jsonl                 the recipe as run; one JSON line per logged step / evaluation
    checkpoints/step-00000100/                   NLD checkpoint + tokenizer + trainer_state.{safetensors,json}
    config.json, model.safetensors, tokenizer*   the final model, loadable with `trimode.load(output_dir)`
Checkpoints are written to a temporary directory and renamed into place; `resume=True` continues from the latest
one exactly (weights, AdamW state, step, data position, RNG state). Trainer state is safetensors + JSON, no pickle.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm import tqdm

from trimode.api import TriMode
from trimode.model.config import NLD_MODEL_TYPE, NLDConfig
from trimode.model.loading import INDEX, WEIGHTS, load_model, resolve_checkpoint, save_checkpoint
from trimode.model.tokenizer import NLDTokenizer
from trimode.model.transformer import NLDTransformer
from trimode.train import convert
from trimode.train.corpus import load_corpus
from trimode.train.data import BatchStream, Document, InfillOptions, PackedData, pack_documents, read_jsonl
from trimode.train.evaluate import evaluate_modes
from trimode.train.objective import (
    EditWeights,
    JointObjective,
    LossSums,
    Noise,
    corrupt,
    global_loss,
    losses,
    noise_key,
)
from trimode.train.recipe import Recipe, RecipeError
from trimode.train.schedule import WSD
from trimode.train.tokenizer_train import train_tokenizer

CHECKPOINTS = "checkpoints"
STATE_JSON = "trainer_state.json"
STATE_TENSORS = "trainer_state.safetensors"
LOG = "train_log.jsonl"
EVAL_STEP = -1  # the "step" of the noise keys of held-out rows: the same noise at every evaluation

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}


# ---------------------------------------------------------------------------------------------- processes


@dataclass
class Processes:
    """This process's place in the (possibly single-process) data-parallel group."""

    rank: int
    world: int
    device: torch.device
    owns_group: bool = False

    @property
    def main(self) -> bool:
        return self.rank == 0

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        if self.world > 1:
            t = t.to(self.device)
            dist.all_reduce(t)
        return t.cpu()

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def close(self) -> None:
        if self.owns_group:
            dist.destroy_process_group()


def start_processes(device: str | None) -> Processes:
    """Join the process group torchrun describes (WORLD_SIZE, RANK, LOCAL_RANK), or run alone."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    if device is not None:
        dev = torch.device(device)
    elif torch.cuda.is_available():
        dev = torch.device("cuda", local % torch.cuda.device_count())
    else:
        dev = torch.device("cpu")
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", local % torch.cuda.device_count())
    owns = False
    if world > 1 and not dist.is_initialized():
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
        owns = True
    return Processes(rank, world, dev, owns)


# ---------------------------------------------------------------------------------------------- building


def load_documents(recipe: Recipe, split: str, files: list[str]) -> list[Document]:
    """JSONL files plus, when the recipe names sources, `trimode.train.corpus.load_corpus(sources, split, seed)`."""
    docs = [d for f in files for d in read_jsonl(f)]
    if recipe.data.sources:
        docs += load_corpus(recipe.data.sources, split, recipe.train.seed)
    return docs


def build_tokenizer(recipe: Recipe, procs: Processes, train_docs: list[Document], resume_dir: Path | None
                    ) -> NLDTokenizer:
    if resume_dir is not None:
        tok = NLDTokenizer.from_dir(resume_dir)
        where = f"the checkpoint {resume_dir}"
    elif recipe.tokenizer.path is not None:
        tok = NLDTokenizer.from_dir(Path(recipe.tokenizer.path))
        where = f"tokenizer.path {recipe.tokenizer.path}"
    elif recipe.tokenizer.train_vocab_size is not None:
        out = Path(recipe.output_dir) / "tokenizer"
        if procs.main:  # trained once, read by every rank
            train_tokenizer(train_docs, recipe.tokenizer.train_vocab_size, out)
        procs.barrier()
        tok = NLDTokenizer.from_dir(out)
        where = f"the trained tokenizer in {out}"
    elif recipe.model.init_from is not None:
        path = resolve_checkpoint(recipe.model.init_from)
        tok = NLDTokenizer.from_dir(path)
        where = f"model.init_from {path}"
    else:
        raise RecipeError("no tokenizer: set tokenizer.path or tokenizer.train_vocab_size")
    if tok is None:
        raise RecipeError(f"no tokenizer.json in {where}")
    return tok


SPECIAL_IDS = {"bos_token_id": "bos_token", "eos_token_id": "eos_token", "mask_token_id": "mask_token",
               "pad_token_id": "pad_token"}


def random_init(config: dict, tokenizer: NLDTokenizer, std: float, seed: int) -> NLDTransformer:
    """A new network from NLDConfig fields; special token ids not given come from the tokenizer's
    tokenizer_config.json (bos_token, eos_token, mask_token, pad_token), vocab_size from its vocabulary."""
    cfg = dict(config)
    for key, name in SPECIAL_IDS.items():
        token = tokenizer.config.get(name)
        if key not in cfg and token is not None:
            cfg[key] = token.get("content") if isinstance(token, dict) else token
        cfg[key] = convert.resolve_token(cfg.get(key), tokenizer, f"model.config.{key}")
    for key in ("eos_token_id", "mask_token_id"):
        if cfg[key] is None:
            raise RecipeError(f"model.config: set {key} (an id or a token string); the tokenizer's "
                              f"tokenizer_config.json names no {SPECIAL_IDS[key]}")
    cfg.setdefault("vocab_size", tokenizer.vocab_size)
    try:
        config_obj = NLDConfig(**cfg)
    except TypeError as e:
        raise RecipeError(f"model.config: {e}") from None
    torch.manual_seed(seed)  # the same initial weights on every rank (FSDP shards each rank's copy as is)
    net = NLDTransformer(config_obj)
    with torch.no_grad():
        for p in net.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, std)
    return net


def build_model(recipe: Recipe, tokenizer: NLDTokenizer, resume_dir: Path | None) -> NLDTransformer:
    m = recipe.model
    dtype = DTYPES[m.dtype]
    mask_id = convert.resolve_token(m.mask_token_id, tokenizer, "model.mask_token_id")
    if resume_dir is not None:
        net = load_model(resume_dir, dtype=torch.float32)
    elif m.init_from is not None:
        path = resolve_checkpoint(m.init_from)
        kind = convert.model_type(path)
        if kind == NLD_MODEL_TYPE:
            net = load_model(path, dtype=torch.float32)
            if mask_id is not None:
                net.config.mask_token_id = mask_id
        elif convert.is_convertible(path):
            if mask_id is None:
                raise RecipeError(f"model.init_from {path} is a {kind} AR checkpoint: set model.mask_token_id "
                                  "(an unused or reserved token id, or its token string)")
            net = convert.load_hf_causal_lm(path, mask_id, recipe.objective.block_size or 32)
        else:
            raise RecipeError(f"model.init_from {path}: model_type {kind!r} is neither an NLD checkpoint nor a "
                              f"convertible causal LM ({', '.join(convert.TEXT_MODELS + convert.VLM_WRAPPERS)})")
    else:
        cfg = dict(m.config or {})
        if mask_id is not None:
            cfg["mask_token_id"] = mask_id
        net = random_init(cfg, tokenizer, m.init_std, recipe.train.seed)
    cfg = net.config
    cfg.dtype = m.dtype
    if tokenizer.vocab_size > cfg.vocab_size:
        raise RecipeError(f"the tokenizer has {tokenizer.vocab_size} tokens but the model only {cfg.vocab_size}")
    if not 0 <= cfg.mask_token_id < cfg.vocab_size:
        raise RecipeError(f"mask_token_id {cfg.mask_token_id} is outside the vocabulary [0, {cfg.vocab_size})")
    if not 0 <= cfg.eos_token_id < cfg.vocab_size:
        raise RecipeError(f"eos_token_id {cfg.eos_token_id} is outside the vocabulary [0, {cfg.vocab_size})")
    net = net.to(dtype)
    return net.train()


def wrap(objective: JointObjective, recipe: Recipe, procs: Processes) -> torch.nn.Module:
    """The module the training forward runs through: the objective itself, DDP around it, or FSDP-sharded."""
    if procs.world == 1:
        return objective
    if recipe.train.parallel == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for layer in objective.net.encoder.layers:
            fully_shard(layer)
        fully_shard(objective)
        return objective
    from torch.nn.parallel import DistributedDataParallel

    ids = [procs.device.index] if procs.device.type == "cuda" else None
    return DistributedDataParallel(objective, device_ids=ids)


def make_optimizer(objective: JointObjective, recipe: Recipe) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices (embeddings, projections, head) and none on norm weights."""
    o = recipe.optim
    decay = [p for p in objective.parameters() if p.dim() >= 2]
    other = [p for p in objective.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": o.weight_decay}, {"params": other, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=o.lr, betas=tuple(o.betas), eps=o.adam_eps)


# ---------------------------------------------------------------------------------------------- checkpoints


def checkpoint_dirs(out: Path) -> list[Path]:
    root = out / CHECKPOINTS
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.name.startswith("step-") and (p / STATE_JSON).is_file()]
    return sorted(found, key=lambda p: int(p.name.removeprefix("step-")))


def save_tokenizer(tokenizer: NLDTokenizer, out: Path) -> None:
    tokenizer.tok.save(str(out / "tokenizer.json"))
    cfg = dict(tokenizer.config)
    if tokenizer.chat_template and "chat_template" not in cfg:
        (out / "chat_template.jinja").write_text(tokenizer.chat_template)
    if cfg:
        (out / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2) + "\n")


def _state_options(**kw):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, **kw)


def full_network(objective: JointObjective, sharded: bool, procs: Processes) -> NLDTransformer | None:
    """The whole network on the main rank (None elsewhere). Collective under FSDP: every rank must call it."""
    if not sharded:
        return objective.net if procs.main else None
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    state = get_model_state_dict(objective, options=_state_options(cpu_offload=True))
    if not procs.main:
        return None
    cfg = objective.net.config
    with torch.device("meta"):
        net = NLDTransformer(cfg)
    net.load_state_dict({k.removeprefix("net."): v for k, v in state.items()}, assign=True)
    return net.eval()


def save_training_checkpoint(out: Path, step: int, objective: JointObjective, optimizer, sharded: bool,
                             tokenizer: NLDTokenizer, state: dict, recipe: Recipe, procs: Processes) -> Path:
    """checkpoints/step-N: the NLD checkpoint in the training dtype plus the trainer state, renamed into place."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    net = full_network(objective, sharded, procs)
    optim = get_optimizer_state_dict(objective, optimizer, options=_state_options(cpu_offload=True))
    final = out / CHECKPOINTS / f"step-{step:08d}"
    if procs.main:
        tmp = final.with_name(f".{final.name}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        save_checkpoint(net, tmp, recipe.train.max_shard_bytes, dtype=DTYPES[recipe.model.dtype])
        save_tokenizer(tokenizer, tmp)
        tensors = {f"optim.{name}.{key}": v.detach().cpu().contiguous() for name, s in optim["state"].items()
                   for key, v in s.items()}
        tensors["rng.torch"] = torch.get_rng_state()
        save_file(tensors, str(tmp / STATE_TENSORS))
        groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()} for g in optim["param_groups"]]
        state = {**state, "format": 1, "optimizer_param_groups": groups, "recipe": recipe.to_dict()}
        (tmp / STATE_JSON).write_text(json.dumps(state, indent=2) + "\n")
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        for old in checkpoint_dirs(out)[: -recipe.train.keep_checkpoints]:
            shutil.rmtree(old)
    procs.barrier()
    return final


def load_trainer_state(ckpt: Path, objective: JointObjective, optimizer) -> dict:
    """Restore AdamW state and the RNG from `ckpt`; return its trainer_state.json."""
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    state = json.loads((ckpt / STATE_JSON).read_text())
    optim: dict = {"state": {}, "param_groups": []}
    with safe_open(str(ckpt / STATE_TENSORS), framework="pt") as fh:
        for key in fh.keys():
            if key == "rng.torch":
                torch.set_rng_state(fh.get_tensor(key))
                continue
            name, field = key.removeprefix("optim.").rsplit(".", 1)
            optim["state"].setdefault(name, {})[field] = fh.get_tensor(key)
    for g in state["optimizer_param_groups"]:
        optim["param_groups"].append({**g, "betas": tuple(g["betas"])})
    set_optimizer_state_dict(objective, optimizer, optim, options=_state_options())
    return state


def write_final(out: Path, net: NLDTransformer, tokenizer: NLDTokenizer, recipe: Recipe) -> None:
    """The final model in `out` itself: written beside, then each file renamed into place."""
    tmp = out / ".final.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    save_checkpoint(net, tmp, recipe.train.max_shard_bytes, dtype=DTYPES[recipe.model.dtype])
    save_tokenizer(tokenizer, tmp)
    for stale in [out / WEIGHTS, out / INDEX, *out.glob("model-*-of-*.safetensors")]:
        stale.unlink(missing_ok=True)
    for f in tmp.iterdir():
        os.replace(f, out / f.name)
    tmp.rmdir()


# ---------------------------------------------------------------------------------------------- the loop


class RunLog:
    """train_log.jsonl on the main rank; on resume, lines past the resumed step are dropped."""

    def __init__(self, path: Path, main: bool, resume_step: int | None) -> None:
        self.path, self.main = path, main
        if main and resume_step is not None and path.is_file():
            kept = [ln for ln in path.read_text().splitlines() if ln and json.loads(ln).get("step", 0) <= resume_step]
            path.write_text("".join(ln + "\n" for ln in kept))
        elif main and resume_step is None:
            path.write_text("")

    def write(self, record: dict) -> None:
        if self.main:
            with self.path.open("a") as f:
                f.write(json.dumps(record) + "\n")


def rank_rows(n: int, procs: Processes) -> slice:
    per = n // procs.world
    return slice(procs.rank * per, (procs.rank + 1) * per)


def evaluate(objective: JointObjective, data: PackedData, recipe: Recipe, micro: int, procs: Processes,
             autocast) -> dict[str, float]:
    """AR and diffusion losses on the first `eval.max_rows` held-out rows (a multiple of the world size, so every
    rank runs the same number of forwards), with the same noise at every evaluation."""
    n = min(recipe.eval.max_rows, len(data))
    n -= n % procs.world
    if n == 0:
        return {}
    mine = rank_rows(n, procs)
    total = None
    was_training = objective.training
    objective.eval()
    with torch.no_grad():
        for start in range(mine.start, mine.stop, micro):
            rows = slice(start, min(start + micro, mine.stop))
            ids, lm, extra = micro_rows(data.input_ids, data.loss_mask, data.ar_mask, data.block_spans, rows,
                                        procs.device)
            keys = [noise_key(recipe.train.seed, EVAL_STEP, row) for row in range(rows.start, rows.stop)]
            noise = make_noise(ids, lm, keys, objective.net.config, recipe)
            with autocast():
                sums = objective(ids, lm, noise, **extra).detach()
            total = sums if total is None else total + sums
    objective.train(was_training)
    summed = LossSums.from_tensor(procs.all_reduce(total.as_tensor()))
    result = losses(summed, recipe.objective.alpha, edit_weights(recipe))
    return {f"eval_{k}": v for k, v in result.items()}


def micro_rows(input_ids: torch.Tensor, loss_mask: torch.Tensor, ar_mask: torch.Tensor | None,
               block_spans: torch.Tensor | None, rows: slice, device: torch.device
               ) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """(ids, loss mask, the objective's extra keywords: ar_mask / block_spans where the data has them) of `rows`."""
    extra = {}
    if ar_mask is not None:
        extra["ar_mask"] = ar_mask[rows].to(device)
    if block_spans is not None:
        extra["block_spans"] = block_spans[rows].to(device)
    return input_ids[rows].to(device), loss_mask[rows].to(device), extra


def make_noise(ids: torch.Tensor, lm: torch.Tensor, keys: list[int], cfg: NLDConfig, recipe: Recipe) -> Noise:
    o = recipe.objective
    return corrupt(ids, lm, cfg.mask_token_id, keys, o.eps, substitute_rate=o.substitute_rate,
                   substitute_from=o.substitute_from, vocab_size=cfg.vocab_size)


def edit_weights(recipe: Recipe) -> EditWeights:
    return EditWeights(recipe.objective.substitute_weight, recipe.objective.keep_weight)


def infill_options(recipe: Recipe) -> InfillOptions | None:
    f = recipe.data.infill
    if f.share <= 0:
        return None
    return InfillOptions(f.share, f.max_hole, f.max_pad, f.max_suffix, f.tail, f.prefix_space, f.holes)


def run_eval_tasks(objective: JointObjective, sharded: bool, tokenizer: NLDTokenizer, recipe: Recipe,
                   procs: Processes) -> dict | None:
    """`trimode.train.evaluate.evaluate_modes(tm, **eval.tasks)` on the main rank, when the recipe asks for it."""
    if recipe.eval.tasks is None:
        return None
    net = full_network(objective, sharded, procs)
    result = None
    if procs.main:
        was_training = net.training
        net.eval()
        result = evaluate_modes(TriMode(net, tokenizer), **recipe.eval.tasks)
        net.train(was_training)
    procs.barrier()
    return result


def train(recipe: Recipe, resume: bool = False, stop_at: int | None = None, progress: bool = True) -> Path:
    """Run (or resume) the recipe. Returns the final output directory, or the checkpoint where `stop_at` stopped."""
    procs = start_processes(recipe.train.device)
    try:
        return _train(recipe, procs, resume, stop_at, progress)
    finally:
        procs.close()


def _train(recipe: Recipe, procs: Processes, resume: bool, stop_at: int | None, progress: bool) -> Path:
    run = setup(recipe, procs, resume)
    total = recipe.train.steps
    stop = total if stop_at is None else min(stop_at, total)
    bar = tqdm(total=total, initial=run.step, disable=not (progress and procs.main), unit="step", dynamic_ncols=True)
    window = Window()
    where = run.out
    while run.step < stop:
        lr = run.schedule(run.step)
        sums, grad_norm, tokens = train_step(run, lr)
        window.add(sums, tokens)
        if run.step % recipe.train.log_every == 0 or run.step == stop:
            window = log_train_step(run, window, lr, grad_norm, bar)
        bar.update(1)
        if recipe.eval.every and (run.step % recipe.eval.every == 0 or run.step == total):
            log_evaluation(run)
        if (recipe.train.save_every and run.step % recipe.train.save_every == 0) or run.step == stop < total:
            where = save(run)
    bar.close()
    return finish(run, where)


# ---------------------------------------------------------------------------------------------- setup


@dataclass
class Run:
    """A training run as `setup` builds it: what the step, the log, the evaluation and the checkpoints share."""

    recipe: Recipe
    procs: Processes
    out: Path
    micro: int  # rows per forward pass
    tokenizer: NLDTokenizer
    objective: JointObjective
    model: torch.nn.Module  # what the training forward runs through: the objective, DDP around it, or FSDP's
    sharded: bool  # FSDP: the objective's parameters are sharded over the ranks
    optimizer: torch.optim.Optimizer
    schedule: WSD
    train_data: PackedData
    eval_data: PackedData | None
    fingerprint: str  # of the training data: a resume must see the same
    stream: BatchStream
    log: RunLog
    step: int = 0
    tokens_seen: int = 0

    def autocast(self):
        dtype = DTYPES.get(self.recipe.train.autocast or "", None)
        return contextlib.nullcontext() if dtype is None else torch.autocast(self.procs.device.type, dtype=dtype)

    def sync_grads(self, last: bool):
        """Gradients are reduced over the ranks at the last micro-batch of a step only."""
        if self.sharded:
            self.objective.set_requires_gradient_sync(last)
            return contextlib.nullcontext()
        if self.procs.world > 1 and not last:
            return self.model.no_sync()
        return contextlib.nullcontext()


def setup(recipe: Recipe, procs: Processes, resume: bool) -> Run:
    """Output directory, data, tokenizer, model, optimizer, schedule and (on resume) the state to continue from."""
    out = Path(recipe.output_dir)
    resume_dir = output_dir(out, recipe, procs, resume)
    micro, accum = recipe.grad_accumulation(procs.world)
    train_docs = load_documents(recipe, recipe.data.train_split, recipe.data.train_jsonl)
    if not train_docs:
        raise RecipeError("the training data is empty")
    tokenizer = build_tokenizer(recipe, procs, train_docs, resume_dir)
    net = build_model(recipe, tokenizer, resume_dir)
    train_data, eval_data = datasets(recipe, tokenizer, net.config, train_docs)

    objective = JointObjective(net.to(procs.device), recipe.objective.block_size or net.config.block_size)
    sharded = procs.world > 1 and recipe.train.parallel == "fsdp"
    model = wrap(objective, recipe, procs)
    optimizer = make_optimizer(objective, recipe)
    o = recipe.optim
    schedule = WSD(o.lr, o.min_lr, recipe.train.steps, o.warmup_steps, o.decay_steps or 0, o.decay)
    fingerprint = train_data.fingerprint()
    step, tokens_seen, position = 0, 0, None
    if resume_dir is not None:
        state = load_trainer_state(resume_dir, objective, optimizer)
        if state["data_fingerprint"] != fingerprint:
            raise RecipeError(f"the training data differs from the data of the checkpoint {resume_dir}; "
                              "resuming would not continue the same run")
        step, tokens_seen, position = state["step"], state["tokens_seen"], state["data_position"]
    stream = BatchStream(train_data, recipe.train.batch_size, recipe.train.seed, position)
    log = RunLog(out / LOG, procs.main, step if resume_dir is not None else None)
    if procs.main:
        print(f"trimode train: {sum(p.numel() for p in net.parameters()) / 1e6:.2f}M parameters, {len(train_data)} "
              f"rows x {recipe.data.seq_len} tokens, global batch {recipe.train.batch_size} = {procs.world} "
              f"process(es) x {accum} x {micro} rows, {recipe.train.steps} steps, from step {step}", flush=True)
    return Run(recipe, procs, out, micro, tokenizer, objective, model, sharded, optimizer, schedule, train_data,
               eval_data, fingerprint, stream, log, step, tokens_seen)


def output_dir(out: Path, recipe: Recipe, procs: Processes, resume: bool) -> Path | None:
    """Check `out` against `resume` (checkpoints there iff resuming), write recipe.yaml; the checkpoint to resume."""
    existing = checkpoint_dirs(out)
    if resume and not existing:
        raise RecipeError(f"--resume: no checkpoint in {out / CHECKPOINTS}")
    if not resume and existing:
        raise RecipeError(f"{out} already holds checkpoints; pass --resume to continue, or choose a new output_dir")
    if procs.main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "recipe.yaml").write_text(recipe.to_yaml())
    procs.barrier()
    return existing[-1] if resume else None


def datasets(recipe: Recipe, tokenizer: NLDTokenizer, cfg: NLDConfig, train_docs: list[Document]
             ) -> tuple[PackedData, PackedData | None]:
    """The packed training rows and (when the recipe evaluates) the packed held-out rows."""
    infill = infill_options(recipe)
    if infill is not None and cfg.pad_token_id is None:
        raise RecipeError("data.infill needs a pad token: the model config has no pad_token_id")

    def pack(docs: list[Document]) -> PackedData:
        return pack_documents(docs, tokenizer, recipe.data.seq_len, cfg.eos_token_id, recipe.data.packing, infill,
                              recipe.train.seed, cfg.pad_token_id)

    train_data, eval_data = pack(train_docs), None
    if recipe.eval.every:
        eval_docs = load_documents(recipe, recipe.data.eval_split, recipe.data.eval_jsonl)
        if not eval_docs:
            raise RecipeError(f"eval.every is set but the held-out data (split {recipe.data.eval_split!r}, "
                              "data.eval_jsonl) is empty")
        eval_data = pack(eval_docs)
    for name, data in (("training", train_data), ("held-out", eval_data)):
        if data is not None and len(data) and int(data.input_ids.max()) >= cfg.vocab_size:
            raise RecipeError(f"the {name} data has token ids >= the model's vocab_size {cfg.vocab_size}")
    return train_data, eval_data


# ---------------------------------------------------------------------------------------------- one step


def train_step(run: Run, lr: float) -> tuple[LossSums, torch.Tensor, int]:
    """One optimizer step on the next global batch: (its loss sums over all ranks, the gradient norm before
    clipping, its tokens). The denominators of the loss are the whole global batch's, counted before any
    backward pass."""
    for g in run.optimizer.param_groups:
        g["lr"] = lr
    batch = run.stream.next()
    micros = noised_micro_batches(run, batch)
    counts = torch.tensor([0.0] * 4, dtype=torch.float64)
    for _, lm, noise, extra in micros:
        counts += torch.tensor(step_counts(lm, noise, extra.get("ar_mask")), dtype=torch.float64)
    ar_count, diff_count, sub_count, keep_count = run.procs.all_reduce(counts).tolist()
    alpha, weights = run.recipe.objective.alpha, edit_weights(run.recipe)

    run.optimizer.zero_grad(set_to_none=True)
    step_sums: LossSums | None = None
    for i, (ids, lm, noise, extra) in enumerate(micros):
        with run.sync_grads(i == len(micros) - 1):
            with run.autocast():
                sums = run.model(ids, lm, noise, **extra)
            # DDP and FSDP average gradients over ranks; the loss is a global sum, hence x world.
            loss = global_loss(sums, alpha, ar_count, diff_count, sub_count, keep_count, weights)
            (loss * run.procs.world).backward()
        step_sums = sums.detach() if step_sums is None else step_sums + sums.detach()
    clip = run.recipe.optim.grad_clip
    grad_norm = torch.nn.utils.clip_grad_norm_(run.objective.parameters(), clip if clip > 0 else float("inf"))
    if hasattr(grad_norm, "full_tensor"):
        grad_norm = grad_norm.full_tensor()
    run.optimizer.step()
    run.step += 1
    tokens = batch.input_ids.numel()
    run.tokens_seen += tokens
    return LossSums.from_tensor(run.procs.all_reduce(step_sums.as_tensor())), grad_norm, tokens


def noised_micro_batches(run: Run, batch) -> list[tuple[torch.Tensor, torch.Tensor, Noise, dict]]:
    """This rank's rows of `batch` in micro-batches: (ids, loss mask, noise, the objective's extra keywords). The
    noise of a row is keyed by (seed, step, the row's index in the global batch)."""
    mine = rank_rows(batch.input_ids.shape[0], run.procs)
    micros = []
    for start in range(mine.start, mine.stop, run.micro):
        rows = slice(start, min(start + run.micro, mine.stop))
        ids, lm, extra = micro_rows(*batch, rows, run.procs.device)
        keys = [noise_key(run.recipe.train.seed, run.step, row) for row in range(rows.start, rows.stop)]
        micros.append((ids, lm, make_noise(ids, lm, keys, run.objective.net.config, run.recipe), extra))
    return micros


# ---------------------------------------------------------------------------------------------- log, eval, save


@dataclass
class Window:
    """The training loss sums since the last log line, and the tokens and time since then."""

    sums: LossSums | None = None
    tokens: int = 0
    since: float = field(default_factory=time.perf_counter)

    def add(self, sums: LossSums, tokens: int) -> None:
        self.sums = sums if self.sums is None else self.sums + sums
        self.tokens += tokens


def log_train_step(run: Run, window: Window, lr: float, grad_norm: torch.Tensor, bar) -> Window:
    """One train_log.jsonl line of the window's mean losses; a fresh window."""
    now = time.perf_counter()
    record = {"step": run.step, **losses(window.sums, run.recipe.objective.alpha, edit_weights(run.recipe)),
              "lr": lr, "grad_norm": float(grad_norm), "tokens": run.tokens_seen,
              "tokens_per_s": window.tokens / max(now - window.since, 1e-9)}
    run.log.write(record)
    bar.set_postfix(loss=f"{record['loss']:.4f}", ar=f"{record['ar_loss']:.4f}", diff=f"{record['diff_loss']:.4f}")
    return Window(since=now)


def log_evaluation(run: Run) -> None:
    """Held-out losses (and, when the recipe names them, task accuracies) as one train_log.jsonl line."""
    record = {"step": run.step, **evaluate(run.objective, run.eval_data, run.recipe, run.micro, run.procs,
                                           run.autocast)}
    tasks = run_eval_tasks(run.objective, run.sharded, run.tokenizer, run.recipe, run.procs)
    if tasks is not None:
        record["eval_tasks"] = tasks
    run.log.write(record)


def save(run: Run) -> Path:
    """checkpoints/step-N with everything a resume needs."""
    state = {"step": run.step, "tokens_seen": run.tokens_seen, "data_position": run.stream.position,
             "data_fingerprint": run.fingerprint, "world_size": run.procs.world}
    return save_training_checkpoint(run.out, run.step, run.objective, run.optimizer, run.sharded, run.tokenizer,
                                    state, run.recipe, run.procs)


def finish(run: Run, where: Path) -> Path:
    """After the last step, the final model in the output directory; after `stop_at`, the checkpoint to resume."""
    procs = run.procs
    if run.step >= run.recipe.train.steps:
        net_full = full_network(run.objective, run.sharded, procs)
        if procs.main:
            write_final(run.out, net_full, run.tokenizer, run.recipe)
            print(f"trimode train: done, {run.step} steps; the model is in {run.out}", flush=True)
        procs.barrier()
        return run.out
    if procs.main:
        print(f"trimode train: stopped after step {run.step}; continue with --resume (checkpoint {where})",
              flush=True)
    return where


def step_counts(lm: torch.Tensor, noise: Noise, ar_mask: torch.Tensor | None) -> list[float]:
    """[AR targets, masked, substituted, other visible loss tokens] of one micro-batch (the loss denominators,
    summed over the global batch before any backward pass)."""
    ar = float((lm if ar_mask is None else ar_mask)[:, 1:].sum())
    masked = float(noise.masked.sum())
    if noise.substituted is None:
        return [ar, masked, 0.0, 0.0]
    sub = float(noise.substituted.sum())
    return [ar, masked, sub, float((lm.bool() & ~noise.masked).sum()) - sub]


def load_recipe(path: str | Path, output_dir: str | None = None) -> Recipe:
    recipe = Recipe.load(path)
    if output_dir is not None:
        recipe.output_dir = output_dir
    return recipe

