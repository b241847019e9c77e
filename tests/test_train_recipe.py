"""Recipes: YAML into dataclasses, with errors that name the key and the file."""

import pytest
import yaml

from trimode.train.recipe import Recipe, RecipeError

BASE = {"output_dir": "out", "model": {"config": {"hidden_size": 32}}, "data": {"train_jsonl": ["t.jsonl"]}}


def write(tmp_path, raw) -> str:
    p = tmp_path / "r.yaml"
    p.write_text(yaml.safe_dump(raw) if not isinstance(raw, str) else raw)
    return str(p)


def test_defaults_and_relative_paths(tmp_path):
    r = Recipe.load(write(tmp_path, BASE))
    assert r.objective.alpha == 0.3 and r.objective.eps == 1e-3
    assert r.optim.decay_steps == int(0.2 * r.train.steps)
    assert r.output_dir == str(tmp_path / "out")
    assert r.data.train_jsonl == [str(tmp_path / "t.jsonl")]
    assert Recipe.from_dict(r.to_dict()).to_dict() == r.to_dict()


@pytest.mark.parametrize("raw,expected", [
    ({**BASE, "epochs": 3}, r"unknown key 'epochs'"),
    ({**BASE, "optim": {"lrr": 1.0}}, r"unknown key 'optim.lrr' \(known: lr, min_lr"),
    ({**BASE, "train": {"steps": "many"}}, r"'train.steps' must be int"),
    ({**BASE, "train": {"steps": 2.5}}, r"'train.steps' must be int"),
    ({**BASE, "optim": {"betas": 0.9}}, r"'optim.betas' must be list"),
    ({k: v for k, v in BASE.items() if k != "output_dir"}, r"missing required key 'output_dir'"),
    ({**BASE, "model": {"config": {}, "init_from": "x"}}, r"model: give exactly one of init_from"),
    ({**BASE, "data": {}}, r"data: no training data"),
    ({**BASE, "train": {"parallel": "zero3"}}, r"train.parallel: 'zero3'"),
    ({**BASE, "train": {"steps": 10}, "optim": {"warmup_steps": 8, "decay_steps": 5}}, r"warmup_steps \+ decay_steps"),
    ({**BASE, "eval": {"every": 5}}, r"eval.every: evaluation needs held-out data"),
    ({**BASE, "model": "big"}, r"model must be a mapping"),
])
def test_errors_name_the_key_and_the_file(tmp_path, raw, expected):
    path = write(tmp_path, raw)
    with pytest.raises(RecipeError, match=expected) as e:
        Recipe.load(path)
    assert str(e.value).startswith(path)


def test_yaml_scientific_notation_without_a_dot_is_a_float(tmp_path):
    text = "output_dir: o\nmodel: {config: {}}\ndata: {train_jsonl: [t]}\noptim: {lr: 1e-3, min_lr: 0}\n"
    r = Recipe.load(write(tmp_path, text))
    assert r.optim.lr == 1e-3 and r.optim.min_lr == 0.0


def test_not_yaml_and_missing_file(tmp_path):
    with pytest.raises(RecipeError, match="not valid YAML"):
        Recipe.load(write(tmp_path, "a: [1, 2"))
    with pytest.raises(RecipeError, match="does not exist"):
        Recipe.load(tmp_path / "nope.yaml")


def test_grad_accumulation_split(tmp_path):
    r = Recipe.from_dict({**BASE, "train": {"batch_size": 8, "micro_batch_size": 2}})
    assert r.grad_accumulation(1) == (2, 4)
    assert r.grad_accumulation(2) == (2, 2)
    assert r.grad_accumulation(4) == (2, 1)
    with pytest.raises(RecipeError, match="not divisible by the 3 processes"):
        r.grad_accumulation(3)
    with pytest.raises(RecipeError, match="not a multiple of train.micro_batch_size"):
        Recipe.from_dict({**BASE, "train": {"batch_size": 6, "micro_batch_size": 4}}).grad_accumulation(1)


@pytest.mark.parametrize("name", ["tiny", "sft", "from_ar_checkpoint"])
def test_example_recipes_parse(name):
    from pathlib import Path

    path = Path(__file__).parent.parent / "recipes" / f"{name}.yaml"
    r = Recipe.load(path)
    assert r.objective.alpha == 0.3
    assert Path(r.output_dir).is_absolute() == path.is_absolute()


@pytest.mark.parametrize("stage", ["", "_stage2", "_stage3", "_stage4"] + [f"_stage5{r}" for r in ("", *"bcdefgh")])
def test_the_bundled_models_recipes_parse(stage):
    from pathlib import Path

    r = Recipe.load(Path(__file__).parent.parent / "recipes" / f"default_model{stage}.yaml")
    assert r.data.sources and r.train.steps > 0
