"""`trimode train-drafter`: train the linear self-speculation LoRA drafter of a model (trimode/train/drafter.py).

Heavy imports stay inside the command so `trimode --help` is fast.
"""

from __future__ import annotations

import json
from pathlib import Path

import typer


def _fail(message: str) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code=2)


def register(app: typer.Typer) -> None:
    app.command("train-drafter")(train_drafter_command)


def train_drafter_command(
    model: str = typer.Option(..., "--model", "-m", help="NLD checkpoint directory with a tokenizer.json."),
    recipe: Path = typer.Option(..., "--recipe", "-r", help="Drafter recipe YAML (see recipes/drafter.yaml)."),
    out: Path | None = typer.Option(None, "--out", "-o", help="Adapter directory (default: MODEL/linear_spec_lora)."),
    steps: int | None = typer.Option(None, "--steps", help="Override the recipe's steps."),
    threads: int | None = typer.Option(None, "--threads", help="torch CPU threads (default: torch's)."),
    device: str | None = typer.Option(None, help="cpu / cuda (default: cuda when available)."),
    log_file: Path | None = typer.Option(None, "--log", help="Also write the log records here (JSON lines)."),
) -> None:
    """Train the linear_spec drafter: a LoRA adapter on o_proj, the base model frozen (spec 3.3).

    Contexts are cut from the recipe's corpus (data.sources).
    Prints the greedy tokens per linear_spec cycle on held-out contexts, before and after.
    Saves the adapter (PEFT layout) where trimode.load finds it: MODEL/linear_spec_lora.
    """
    import torch

    from trimode.model.loading import load_model, resolve_checkpoint
    from trimode.model.tokenizer import NLDTokenizer
    from trimode.train.drafter import greedy_acceptance, save_drafter

    try:
        if threads is not None:
            if threads < 1:
                _fail("--threads must be >= 1")
            torch.set_num_threads(threads)
        cfg = _drafter_config(recipe, steps)
        ckpt = resolve_checkpoint(model)
        dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        net = load_model(ckpt, dtype=torch.float32, device=dev)
        tok = NLDTokenizer.from_dir(ckpt)
        if tok is None:
            _fail(f"{ckpt} has no tokenizer.json: the drafter's contexts are cut from text")
        block = cfg.block_length or net.config.block_size
        (ids, cuts), held = _contexts(cfg, tok, net.config.eos_token_id, dev)
        before = greedy_acceptance(net, held, block, use_drafter=False)
        typer.echo(f"trimode train-drafter: {ckpt}, block {block}, LoRA r={cfg.rank} alpha={cfg.alpha}, "
                   f"{cfg.steps} steps x {cfg.batch_size} contexts of {cfg.context[0]}-{cfg.context[1]} tokens, "
                   f"{len(ids)} training tokens")
        _train_logged(net, ids, cuts, cfg, log_file)
        after = greedy_acceptance(net, held, block, use_drafter=True)
        target = save_drafter(net, ckpt, cfg, out)
    except typer.Exit:
        raise
    except (ValueError, OSError, RuntimeError) as e:  # CheckpointError and CorpusError are ValueErrors
        _fail(str(e))
    typer.echo(f"greedy tokens per linear_spec cycle on {cfg.eval_contexts} held-out contexts "
               f"({held.shape[1]} tokens): {before:.2f} without the drafter, {after:.2f} with it")
    typer.echo(f"adapter saved to {target}")


def _drafter_config(recipe: Path, steps: int | None):
    """The recipe's `DrafterConfig`, `--steps` applied; its data must be exactly a corpus source list."""
    from trimode.train.drafter import DrafterConfig

    cfg = DrafterConfig.load(recipe)
    if steps is not None:
        if steps < 1:
            _fail("--steps must be >= 1")
        cfg.steps = steps
    unknown = set(cfg.data) - {"sources"}
    if unknown or not cfg.data.get("sources"):
        _fail(f"{recipe}: data needs exactly one key, sources (a corpus source list)")
    return cfg


def _contexts(cfg, tok, eos: int, dev):
    """((training token stream, its document cuts), held-out contexts [eval_contexts, half the mean context])."""
    import torch

    from trimode.train.corpus import load_corpus
    from trimode.train.data import tokenize
    from trimode.train.drafter import sample_contexts, token_stream

    def stream(split: str):
        docs = load_corpus(cfg.data["sources"], split, cfg.seed)
        if not docs:
            _fail(f"the corpus has no {split} documents")
        return token_stream(tokenize(docs, tok, eos))

    train = stream("train")
    held_ids, held_cuts = stream("heldout")
    held_len = min(sum(cfg.context) // 2, int(held_cuts.max()))
    held = sample_contexts(held_ids, held_cuts, cfg.eval_contexts, held_len,
                           torch.Generator().manual_seed(cfg.seed + 1)).to(dev)
    return train, held


def _train_logged(net, ids, cuts, cfg, log_file: Path | None) -> None:
    """`train_drafter`, each log record printed and, with `--log`, written as a JSON line."""
    from trimode.train.drafter import train_drafter

    log_fh = log_file.open("w") if log_file is not None else None

    def log(record: dict) -> None:
        typer.echo(f"step {record['step']}: loss {record['loss']:.4f} (lk {record['lk']:.4f}, "
                   f"ce {record['ce']:.4f}), accepted drafts {record['accepted']:.2f}, "
                   f"alpha {record['alpha']:.3f}, lr {record['lr']:.2e}, {record['seconds']:.0f}s")
        if log_fh is not None:
            log_fh.write(json.dumps(record) + "\n")
            log_fh.flush()

    try:
        train_drafter(net, ids, cuts, cfg, log)
    finally:
        if log_fh is not None:
            log_fh.close()
