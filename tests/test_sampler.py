"""The unmasking policies (decode/unmask.py) and the learned sampler (model/sampler.py, train/sampler.py)."""

import json
import shutil

import pytest
import torch

import trimode
from tests.invariance import alone, flat_cost, run_mix
from trimode.engine import Engine, EngineRequest
from trimode.model.config import CheckpointError
from trimode.model.sampler import BlockSampler, SamplerConfig, load_sampler, save_sampler

PROMPTS = ["Sort: 5 3 9 1", "Reverse: a b c d", "What is 3 + 4?"]


@pytest.fixture(scope="module")
def tm():
    return trimode.load()


def chat(tm, text):
    return tm.tokenizer.apply_chat_template([{"role": "user", "content": text}])


def test_the_bundled_model_ships_a_small_sampler(tm):
    assert isinstance(tm.net.sampler, BlockSampler)
    files = list((tm.path / "sampler").iterdir())
    assert sum(f.stat().st_size for f in files) < 2_000_000
    assert not any(k.startswith("sampler") for k in tm.net.state_dict())  # not part of the network's weights


@pytest.mark.parametrize("mode", ["diffusion", "linear_spec"])
def test_unmask_threshold_is_the_default(tm, mode):
    for p in PROMPTS:
        a = tm.generate(chat(tm, p), mode=mode, max_new_tokens=24)
        b = tm.generate(chat(tm, p), mode=mode, max_new_tokens=24, unmask="threshold")
        assert a.token_ids == b.token_ids and a.stats.forward_passes == b.stats.forward_passes


def test_unmask_steps_is_the_fixed_schedule(tm):
    a = tm.generate(chat(tm, PROMPTS[0]), mode="diffusion", max_new_tokens=16, steps=8)
    b = tm.generate(chat(tm, PROMPTS[0]), mode="diffusion", max_new_tokens=16, unmask="steps", steps=8)
    assert a.token_ids == b.token_ids and a.knobs["unmask"] == b.knobs["unmask"] == "steps"


def test_learned_diffusion_runs_and_takes_fewer_passes(tm):
    from trimode.tasks import load_tasks

    learned = threshold = 0
    for p in [it.prompt for it in load_tasks("python_next_line", 4, 0)]:  # long answers: several passes a block
        r = tm.generate(p, mode="diffusion", max_new_tokens=32, unmask="learned")
        assert r.knobs["unmask"] == "learned" and r.knobs["threshold"] == 0.5 and r.stats.generated_tokens > 0
        learned += r.stats.forward_passes
        threshold += tm.generate(p, mode="diffusion", max_new_tokens=32).stats.forward_passes
    assert learned < threshold


def test_greedy_linear_spec_with_a_learned_draft_equals_ar(tm):
    for p in PROMPTS:
        ar = tm.generate(chat(tm, p), mode="ar", max_new_tokens=24)
        for t in (0.3, 0.9):
            ls = tm.generate(chat(tm, p), mode="linear_spec", max_new_tokens=24, unmask="learned", threshold=t)
            assert ls.token_ids == ar.token_ids


def test_learned_in_the_engine_batched_equals_alone(tm):
    reqs = [EngineRequest(prompt_ids=tm.encode(chat(tm, p)), mode=m, max_new_tokens=20,
                          knobs={"unmask": "learned", "threshold": t})
            for p in PROMPTS for m, t in (("diffusion", 0.5), ("linear_spec", 0.7))]
    results = run_mix(Engine(tm, cost=flat_cost()), [(i % 3, r) for i, r in enumerate(reqs)])
    for req, res in zip(reqs, results):
        assert res.token_ids == alone(tm, req).token_ids


@pytest.mark.parametrize("knobs, message", [
    ({"unmask": "fastest"}, "unmask must be one of"),
    ({"unmask": 3}, "unmask must be one of"),
    ({"unmask": "learned", "steps": 4}, "unmask='steps'"),
    ({"unmask": "steps", "threshold": 0.5}, "either threshold or steps"),
    ({"unmask": "learned", "remask_threshold": 0.3}, "remask_threshold"),
])
def test_bad_unmask_values_name_the_knob(tm, knobs, message):
    with pytest.raises(ValueError, match=message):
        tm.generate("x", mode="diffusion", max_new_tokens=4, **knobs)


def test_linear_spec_has_no_steps_policy(tm):
    with pytest.raises(ValueError, match="unmask must be one of threshold, learned"):
        tm.generate("x", mode="linear_spec", max_new_tokens=4, unmask="steps")


def test_learned_needs_a_sampler(tmp_path):
    src = trimode.load().path
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(src / name, tmp_path / name)
    bare = trimode.load(tmp_path)
    assert bare.net.sampler is None
    with pytest.raises(ValueError, match="unmask='learned' needs a learned sampler"):
        bare.generate("x", mode="diffusion", max_new_tokens=4, unmask="learned")
    assert bare.generate("x", mode="diffusion", max_new_tokens=4).stats.generated_tokens > 0


def test_the_sampler_dir_is_safetensors_and_json_only(tmp_path):
    cfg = SamplerConfig(vocab_size=64, hidden=16, layers=1, heads=2, ffn=32, embed_dim=4)
    s = BlockSampler(cfg)
    save_sampler(s, tmp_path / "s")
    assert sorted(p.name for p in (tmp_path / "s").iterdir()) == ["config.json", "model.safetensors"]
    loaded = load_sampler(tmp_path / "s")
    logits, masked = torch.randn(2, 8, 64), torch.rand(2, 8) > 0.3
    assert torch.allclose(loaded.score(logits, masked), s.eval().score(logits, masked))
    (tmp_path / "s" / "model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(CheckpointError, match="not a readable safetensors"):
        load_sampler(tmp_path / "s")
    save_sampler(s, tmp_path / "s")
    (tmp_path / "s" / "config.json").write_text(json.dumps({**cfg.__dict__, "hidden": 32}))
    with pytest.raises(CheckpointError, match="shape"):
        load_sampler(tmp_path / "s")


def test_train_sampler_labels_and_learns(tm):
    from trimode.train.sampler import Recorder, SamplerRecipe, auc, collect, train

    assert auc(torch.tensor([0.1, 0.4, 0.35, 0.8]), torch.tensor([0.0, 0.0, 1.0, 1.0])) == 0.75
    from trimode.tasks import load_tasks

    items = load_tasks("sort", 6, 0, split="train")
    sampler = BlockSampler(SamplerConfig(tm.config.vocab_size, hidden=16, layers=1, heads=2, ffn=32))
    data = {p: collect(tm, items, sampler, p) for p in ("confidence", "hybrid")}
    for policy, examples in data.items():
        feats, labelled, labels = examples[0]
        assert feats.shape == (tm.config.block_size, sampler.cfg.features) and labelled.any()
        # the slot a pass commits is final: under the confidence policy every pass has a positive label
        assert all(lab[m].max() == 1 for _, m, lab in examples if m.any()), policy
    assert len(data["hybrid"]) < len(data["confidence"])  # ground-truth agreeing slots go together
    summary = train(sampler, data["confidence"][6:] + data["hybrid"], data["confidence"][:6],
                    SamplerRecipe(epochs=2, patience=1), log=lambda m: None)
    assert 0 <= summary["best_heldout_auc"] <= 1 and Recorder  # noqa: B015
