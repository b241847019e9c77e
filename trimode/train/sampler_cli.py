"""`trimode train-sampler`: train the learned unmasking sampler of a model (trimode/train/sampler.py) and save
it next to the model as `sampler/`, where `trimode.load` finds it (`unmask="learned"`).

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
    @app.command("train-sampler")
    def train_sampler_command(
        model: str | None = typer.Option(None, "--model", "-m", help="NLD checkpoint directory (default: the "
                                                                      "bundled model)."),
        recipe: Path = typer.Option(Path("recipes/sampler.yaml"), "--recipe", "-r",
                                    help="Sampler recipe YAML (see recipes/sampler.yaml)."),
        out: Path | None = typer.Option(None, "--out", "-o", help="Sampler directory (default: MODEL/sampler)."),
        threads: int | None = typer.Option(None, "--threads", help="torch CPU threads (default: torch's)."),
    ) -> None:
        """Collect denoising trajectories of the model on the train split of the task items (confidence and
        hybrid policies), label each pass's slots (top-1 == the token finally committed there), train a tiny
        bidirectional transformer (BCE, early stop on held-out AUC) and save it (safetensors + JSON)."""
        import torch

        import trimode
        from trimode.model.config import CheckpointError
        from trimode.model.sampler import SAMPLER_DIR, save_sampler
        from trimode.train.sampler import SamplerRecipe, train_sampler

        if threads is not None:
            if threads < 1:
                _fail("--threads must be >= 1")
            torch.set_num_threads(threads)
        if not recipe.is_file():
            _fail(f"no recipe file {recipe}")
        try:
            cfg = SamplerRecipe.load(recipe)
            tm = trimode.load(model, device="cpu", dtype="float32")
        except (ValueError, TypeError, CheckpointError, OSError) as e:
            _fail(str(e))
        if tm.tokenizer is None:
            _fail(f"the model at {tm.path} has no tokenizer.json; the task items are text")
        sampler, summary = train_sampler(tm, cfg, log=lambda m: typer.echo(m, err=True))
        target = out or Path(tm.path) / SAMPLER_DIR
        save_sampler(sampler, target)
        (target / "train_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        typer.echo(f"best held-out AUC {summary['best_heldout_auc']:.4f}; saved {target}")
