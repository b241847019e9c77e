"""`trimode train`: a tiny run end to end, exact resume, checkpoints without pickle, fine-tuning, CLI errors."""

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from typer.testing import CliRunner

import trimode
from tests.test_train_support import TINY_MODEL, tiny_recipe
from trimode.cli import app
from trimode.train.recipe import Recipe, RecipeError
from trimode.train.trainer import train

runner = CliRunner()



def log_lines(out):
    return [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]


def test_train_command_end_to_end(tmp_path):
    recipe = tiny_recipe(tmp_path, train={"save_every": 3})
    result = runner.invoke(app, ["train", "--recipe", str(recipe), "--no-progress"])
    assert result.exit_code == 0, result.output
    out = tmp_path / "out"

    logs = log_lines(out)
    train_steps = [r for r in logs if "loss" in r]
    evals = [r for r in logs if "eval_loss" in r]
    assert [r["step"] for r in train_steps] == [1, 2, 3, 4, 5, 6]
    assert [r["step"] for r in evals] == [3, 6]
    assert [r["lr"] for r in train_steps] == pytest.approx([1.5e-3, 3e-3, 3e-3, 3e-3, 1.65e-3, 3e-4])
    for r in train_steps:
        assert r["loss"] == pytest.approx(0.3 * r["diff_loss"] + r["ar_loss"])
        assert r["tokens_per_s"] > 0 and r["tokens"] == r["step"] * 4 * 32
    assert train_steps[-1]["ar_loss"] < train_steps[0]["ar_loss"]
    assert evals[0]["eval_ar_tokens"] > 0 and evals[0]["eval_masked_tokens"] > 0

    # Checkpoints: NLD format + trainer state as safetensors and JSON only (no pickle anywhere).
    ckpts = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert ckpts == ["step-00000003", "step-00000006"]
    ck = out / "checkpoints" / "step-00000003"
    state = json.loads((ck / "trainer_state.json").read_text())
    assert state["step"] == 3 and state["data_position"] == {"epoch": 0, "index": 12}
    with safe_open(str(ck / "trainer_state.safetensors"), "pt") as fh:
        keys = list(fh.keys())
    assert "rng.torch" in keys and "optim.net.encoder.embed_tokens.weight.exp_avg_sq" in keys
    assert not [p for p in out.rglob("*") if p.suffix in (".pt", ".bin", ".pkl", ".pth")]
    assert not list(out.glob(".*tmp"))

    # The final directory is an NLD checkpoint with its tokenizer.
    tm = trimode.load(out)
    assert tm.config.mask_token_id == 3 and tm.config.eos_token_id == 2 and tm.tokenizer is not None
    for mode in trimode.MODES:
        r = tm.generate("the cat", mode=mode, max_new_tokens=8, block_length=4)
        assert r.stats.generated_tokens >= 1
    final = load_file(str(out / "model.safetensors"))
    last = load_file(str(out / "checkpoints" / "step-00000006" / "model.safetensors"))
    assert all(torch.equal(final[k], last[k]) for k in final)


def test_resume_continues_exactly(tmp_path):
    straight = tiny_recipe(tmp_path, out="straight")
    train(Recipe.load(straight), progress=False)

    split = tiny_recipe(tmp_path, out="split")
    stopped = train(Recipe.load(split), stop_at=2, progress=False)
    assert stopped.name == "step-00000002" and not (tmp_path / "split" / "model.safetensors").exists()
    with pytest.raises(RecipeError, match="already holds checkpoints"):
        train(Recipe.load(split), progress=False)
    result = runner.invoke(app, ["train", "--recipe", str(split), "--resume", "--no-progress"])
    assert result.exit_code == 0, result.output

    a = load_file(str(tmp_path / "straight" / "model.safetensors"))
    b = load_file(str(tmp_path / "split" / "model.safetensors"))
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), "resumed weights differ from the uninterrupted run"
    drop = ("tokens_per_s",)
    la = [{k: v for k, v in r.items() if k not in drop} for r in log_lines(tmp_path / "straight")]
    lb = [{k: v for k, v in r.items() if k not in drop} for r in log_lines(tmp_path / "split")]
    assert la == lb


def test_resume_refuses_other_data_and_missing_checkpoints(tmp_path):
    recipe = tiny_recipe(tmp_path)
    with pytest.raises(RecipeError, match="no checkpoint"):
        train(Recipe.load(recipe), resume=True, progress=False)
    train(Recipe.load(recipe), stop_at=1, progress=False)
    (tmp_path / "train.jsonl").write_text('{"text": "something else entirely, and longer than before"}\n' * 40)
    with pytest.raises(RecipeError, match="training data differs"):
        train(Recipe.load(recipe), resume=True, progress=False)


def test_fine_tune_from_an_nld_checkpoint(tmp_path):
    base = tiny_recipe(tmp_path, out="base", train={"steps": 2}, optim={"warmup_steps": 0, "decay_steps": 0},
                       eval={"every": 0})
    train(Recipe.load(base), progress=False)
    sft = tiny_recipe(tmp_path, out="sft", model={"init_from": "base", "config": None}, tokenizer={"path": None},
                      data={"train_jsonl": ["eval.jsonl"], "eval_jsonl": ["eval.jsonl"], "packing": "pad"},
                      train={"steps": 2}, optim={"warmup_steps": 0, "decay_steps": 0})
    out = train(Recipe.load(sft), progress=False)
    before = load_file(str(tmp_path / "base" / "model.safetensors"))
    after = load_file(str(out / "model.safetensors"))
    assert before.keys() == after.keys() and any(not torch.equal(before[k], after[k]) for k in before)
    assert trimode.load(out).tokenizer is not None


def test_cli_errors_are_one_line(tmp_path):
    recipe = tiny_recipe(tmp_path, optim={"lrr": 1.0})
    result = runner.invoke(app, ["train", "--recipe", str(recipe)])
    assert result.exit_code == 2
    assert "Traceback" not in result.output
    assert f"error: {recipe}: unknown key 'optim.lrr'" in result.output
    result = runner.invoke(app, ["train", "--recipe", str(tmp_path / "none.yaml")])
    assert result.exit_code == 2 and "does not exist" in result.output
    bad_vocab = tiny_recipe(tmp_path, model={"config": {"hidden_size": 32, "vocab_size": 100, "eos_token_id": 2,
                                                        "mask_token_id": 3}})
    result = runner.invoke(app, ["train", "--recipe", str(bad_vocab)])
    assert result.exit_code == 2 and "the tokenizer has" in result.output and "Traceback" not in result.output


def test_corpus_sources_trained_tokenizer_and_task_evaluation(tmp_path):
    """The recipe path of the bundled model: corpus sources, a tokenizer trained by the run (special ids filled
    from its tokenizer_config.json), and the evaluate_modes hook at evaluation steps."""
    pytest.importorskip("trimode.train.corpus")
    pytest.importorskip("trimode.train.tokenizer_train")
    pytest.importorskip("trimode.train.evaluate")
    config = {k: v for k, v in TINY_MODEL.items() if not k.endswith("_token_id")}
    recipe = tiny_recipe(
        tmp_path, model={"config": config}, tokenizer={"path": None, "train_vocab_size": 280},
        data={"train_jsonl": [], "eval_jsonl": [], "sources": [{"kind": "tasks", "counts": {"arithmetic": 60}}],
              "seq_len": 64},
        train={"steps": 2}, optim={"warmup_steps": 0, "decay_steps": 0},
        eval={"every": 2, "tasks": {"tasks": {"arithmetic": 2}, "modes": [{"mode": "ar"}]}})
    out = train(Recipe.load(recipe), progress=False)
    tm = trimode.load(out)
    tok = tm.tokenizer
    assert tm.config.vocab_size == tok.vocab_size == 280
    assert (tm.config.eos_token_id, tm.config.mask_token_id) == (tok.token_id("</s>"), tok.token_id("<|mask|>"))
    [evaluation] = [r for r in log_lines(out) if "eval_loss" in r]
    [row] = evaluation["eval_tasks"]
    assert row["mode"] == "ar" and row["items"] == 2 and 0 <= row["accuracy"] <= 1
