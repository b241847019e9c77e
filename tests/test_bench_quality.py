"""`trimode bench quality`: HumanEval checked in a sandboxed subprocess, the sweep's accounting, the report and
the accuracy-against-TPF PNG, end to end on a tiny random checkpoint that has a tokenizer."""

import json

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from typer.testing import CliRunner

from trimode.bench import quality
from trimode.bench.humaneval import load_humaneval, run_sandboxed, truncate_completion
from trimode.cli import app
from trimode.model.config import NLDConfig
from trimode.model.loading import save_checkpoint, save_lora
from trimode.model.transformer import NLDTransformer

SPECIALS = ["<pad>", "<s>", "</s>", "<|mask|>", "<|user|>", "<|assistant|>"]
TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")


@pytest.fixture(scope="module")
def text_model(tmp_path_factory):
    """A random 2-layer NLD checkpoint with a byte-level BPE tokenizer trained here on HumanEval prompts."""
    out = tmp_path_factory.mktemp("text-model")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([p.prompt for p in load_humaneval(40)], trainer)
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": "</s>", "chat_template": TEMPLATE}))
    torch.manual_seed(0)
    cfg = NLDConfig(vocab_size=tok.get_vocab_size(), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, head_dim=8, bos_token_id=1, eos_token_id=2,
                    mask_token_id=3, block_size=4)
    net = NLDTransformer(cfg)
    with torch.no_grad():
        for p in net.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.3)
        for layer in net.encoder.layers:  # a drafter adapter, so linear_spec runs with and without it
            o = layer.self_attn.o_proj
            o.set_adapter(torch.randn(4, o.weight.shape[1]) * 0.1, torch.randn(o.weight.shape[0], 4) * 0.1, 2.0)
    save_checkpoint(net, out, dtype=torch.float32)
    save_lora(net, out / "linear_spec_lora", r=4, alpha=8.0)
    return out


def test_humaneval_canonical_solutions_pass_and_wrong_ones_fail():
    tasks = load_humaneval(3)
    assert [t.task_id for t in tasks] == ["HumanEval/0", "HumanEval/1", "HumanEval/2"]
    assert all(t.check(t.answer) for t in tasks)
    assert not any(t.check("    return None\n") for t in tasks)
    # text after a new top-level statement is cut, as with the Codex stop sequences
    assert tasks[0].check(tasks[0].answer + "\ndef junk(:\n")
    assert truncate_completion("    return 1\nprint('x')") == "    return 1"


def test_sandbox_limits():
    slow = run_sandboxed("while True:\n    pass\n", timeout=1.0)
    assert slow.timed_out and not slow.passed
    hog = run_sandboxed("x = bytearray(8 << 30)\n", timeout=5.0)
    assert not hog.passed and "MemoryError" in hog.stderr_tail
    assert not run_sandboxed("raise SystemExit(3)\n").passed
    assert run_sandboxed("import os\nassert os.getcwd().split('/')[-1].startswith('trimode-sandbox-')\n").passed


def test_accounting_counts_what_the_checker_says(text_model):
    import trimode
    from trimode.tasks import Task

    tm = trimode.load(text_model)
    always = [Task("t", "def f(x):\n", "", checker=lambda out, ans: True, chat=False, max_new_tokens=5)] * 2
    never = [Task("t", "def f(x):\n", "", checker=lambda out, ans: False, chat=True, max_new_tokens=5)] * 2
    for items, acc in ((always, 1.0), (never, 0.0)):
        configs = quality.sweep(["ar", "diffusion", "linear_spec", "quadratic_spec"], [4], [0.9], tm.has_drafter)
        assert [c.label for c in configs] == ["ar", "diffusion B=4 t=0.9", "linear_spec B=4",
                                              "linear_spec B=4 +drafter", "quadratic_spec B=4"]
        for config in configs:
            o = quality.evaluate(tm, "t", items, config, None)
            assert o.n == 2 and o.accuracy == acc
            assert 1 <= o.generated <= 10 and o.forwards >= 2
            if config.mode == "ar":
                assert o.tpf == 1.0  # one forward per token, the prompt pass yields the first token
            if config.mode in ("linear_spec", "quadratic_spec"):
                assert o.acceptance and all(1 <= a <= 4 for a in o.acceptance)
            assert o.tpf_excl_prefill >= o.tpf
    # one denoising step per block: a 4-token generation is the prefill + 1 step (the budget is then full, so
    # the block's refresh pass never runs)
    one_step = quality.Config("diffusion", 4, steps=1)
    assert one_step.knobs() == {"block_length": 4, "steps": 1}
    o = quality.evaluate(tm, "t", always, one_step, 4)
    assert o.forwards == 2 * o.n and o.generated == 4 * o.n


def test_bench_quality_end_to_end(text_model, tmp_path):
    out = tmp_path / "quality.md"
    r = CliRunner().invoke(app, ["bench", "quality", "--model", str(text_model), "--tasks", "humaneval,arithmetic",
                                 "--n", "1", "--block-lengths", "4", "--thresholds", "0.5,0.9",
                                 "--steps", "2", "--max-new-tokens", "4", "--out", str(out)])
    assert r.exit_code == 0, r.output
    text = out.read_text()
    rows = [line for line in text.splitlines() if line.startswith("| humaneval") or line.startswith("| arithmetic")]
    # ar + diffusion at two thresholds and one step count + linear_spec without / with drafter + quadratic_spec,
    # for both tasks
    assert len(rows) == 14
    assert any("| diffusion B=4 t=0.5 |" in row for row in rows)
    assert any(row.startswith("| humaneval | diffusion B=4 steps=2 |") for row in rows)
    ar_row = next(row for row in rows if row.startswith("| humaneval | ar |"))
    assert ar_row.split("|")[5].strip() == "1.00"  # AR: TPF 1 with the prefill counted
    png = out.with_suffix(".png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_quality_errors(text_model, tmp_path):
    runner = CliRunner()
    r = runner.invoke(app, ["bench", "quality", "--model", str(text_model), "--tasks", "nope", "--n", "1"])
    assert r.exit_code == 2 and "unknown task 'nope'" in r.output
    r = runner.invoke(app, ["bench", "quality", "--model", str(text_model), "--modes", "fast"])
    assert r.exit_code == 2 and "unknown mode" in r.output
    r = runner.invoke(app, ["bench", "quality", "--model", str(text_model), "--thresholds", "0.5,x"])
    assert r.exit_code == 2 and "--thresholds" in r.output
    from tests.conftest import TINY_A

    r = runner.invoke(app, ["bench", "quality", "--model", str(TINY_A)])
    assert r.exit_code == 2 and "no tokenizer.json" in r.output
