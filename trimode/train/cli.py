"""`trimode train` and `trimode convert`. Heavy imports stay inside the commands so `trimode --help` is fast."""

from __future__ import annotations

from pathlib import Path

import typer

from trimode.train import drafter_cli, sampler_cli


def _fail(message: str) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code=2)


def register(app: typer.Typer) -> None:
    drafter_cli.register(app)  # `trimode train-drafter`
    sampler_cli.register(app)  # `trimode train-sampler`

    @app.command("train")
    def train_command(
        recipe: Path = typer.Option(..., "--recipe", "-r", help="Recipe YAML file (see docs/training.md)."),
        resume: bool = typer.Option(False, "--resume", help="Continue from the latest checkpoint in output_dir."),
        stop_at: int | None = typer.Option(
            None, "--stop-at", help="Stop after this many steps and write a checkpoint (split a run into jobs)."),
        output_dir: str | None = typer.Option(None, "--output-dir", "-o", help="Override the recipe's output_dir."),
        no_progress: bool = typer.Option(False, "--no-progress", help="No progress bar (logs still written)."),
        threads: int | None = typer.Option(None, "--threads", help="torch CPU threads per process (default: torch's)."),
    ) -> None:
        """Train or fine-tune an NLD model (joint AR + block-diffusion objective) from a YAML recipe.

        Under `torchrun --nproc-per-node N` the same command trains data-parallel (DDP, or FSDP with
        train.parallel: fsdp); the global batch stays train.batch_size rows.
        """
        import torch

        from trimode.train.recipe import Recipe
        from trimode.train.trainer import train

        if threads is not None:
            if threads < 1:
                _fail("--threads must be >= 1")
            torch.set_num_threads(threads)
        try:
            r = Recipe.load(recipe)
            if output_dir is not None:
                r.output_dir = output_dir
            if stop_at is not None and stop_at < 1:
                _fail("--stop-at must be >= 1")
            train(r, resume=resume, stop_at=stop_at, progress=not no_progress)
        except (ValueError, OSError) as e:  # RecipeError and CheckpointError are ValueErrors
            _fail(str(e))

    @app.command("convert")
    def convert_command(
        source: Path = typer.Argument(..., help="HF causal-LM directory (Llama / Mistral / Ministral3 / Qwen2)."),
        output: Path = typer.Argument(..., help="New NLD checkpoint directory."),
        mask_token_id: str = typer.Option(
            ..., "--mask-token-id", help="Token id (or token string) to use as the diffusion mask token."),
        block_size: int = typer.Option(32, "--block-size", help="Default block size written to config.json."),
        dtype: str = typer.Option("bfloat16", help="Stored weight dtype: bfloat16 / float32 / float16."),
        max_shard_bytes: int | None = typer.Option(None, "--max-shard-bytes", help="Shard weights above this size."),
    ) -> None:
        """Convert a Hugging Face causal LM into an NLD checkpoint (weights renamed, no training).

        The result decodes in AR mode like the source model; diffusion and speculative modes need training
        (`trimode train` with model.init_from pointing at the source or at this output).
        """
        import torch

        from trimode.train.convert import convert_checkpoint

        dtypes = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float16": torch.float16}
        if dtype not in dtypes:
            _fail(f"--dtype must be one of {', '.join(dtypes)}")
        mask: int | str = int(mask_token_id) if mask_token_id.lstrip("-").isdigit() else mask_token_id
        try:
            out = convert_checkpoint(source, output, mask, block_size, dtypes[dtype], max_shard_bytes)
        except (ValueError, OSError) as e:
            _fail(str(e))
        typer.echo(f"wrote {out}")
