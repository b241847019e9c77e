"""The LoRA drafter (trimode.train.drafter): its loss, its training, the saved adapter, `trimode train-drafter`."""

import json

import pytest
import torch
import typer
from typer.testing import CliRunner

from tests.conftest import random_model
from trimode.decode.driver import decode, drive
from trimode.decode.stopping import StopRule
from trimode.model.loading import LORA_DIR, load_lora, save_checkpoint
from trimode.train.drafter import (
    DrafterConfig,
    ReadOnlyPrefix,
    attach_adapter,
    drafter_loss,
    greedy_acceptance,
    lk_hybrid_loss,
    sample_contexts,
    save_drafter,
    train_drafter,
)
from trimode.train.drafter_cli import register

BLOCK = 4



def stream(seed: int = 0, n: int = 3000):
    """A token stream with structure a drafter can pick up (repeated phrases), avoiding the special ids 0-5."""
    g = torch.Generator().manual_seed(seed)
    phrases = torch.randint(6, 64, (12, 6), generator=g)
    ids = phrases[torch.randint(0, 12, (n // 6,), generator=g)].flatten()
    return ids, torch.arange(ids.numel())


def test_lk_hybrid_loss_matches_its_definition():
    torch.manual_seed(0)
    p_logits, q_logits = torch.randn(5, 10, dtype=torch.float64), torch.randn(5, 10, dtype=torch.float64)
    lk, ce, alpha = lk_hybrid_loss(p_logits, q_logits, top_k=10, tau=3.0)  # K >= V: the union is everything
    p, q = (p_logits / 3).softmax(-1), (q_logits / 3).softmax(-1)
    a = torch.minimum(p, q).sum(-1)
    lam = torch.exp(-0.5 * a)
    expected = lam * (p * (p.log() - q.log())).sum(-1) + (1 - lam) * 0.5 * (p - q).abs().sum(-1)
    assert torch.allclose(lk.double(), expected, atol=1e-5) and torch.allclose(alpha.double(), a, atol=1e-6)
    expected_ce = -q_logits.log_softmax(-1).gather(-1, p_logits.argmax(-1, keepdim=True)).squeeze(-1)
    assert torch.allclose(ce.double(), expected_ce, atol=1e-5)
    same, _, alpha_same = lk_hybrid_loss(p_logits, p_logits.clone(), top_k=3)
    assert same.abs().max() < 1e-5 and torch.allclose(alpha_same.double(), torch.ones(5, dtype=torch.float64))


def test_lk_hybrid_loss_restricts_to_the_top_k_union_without_nan_gradients():
    p_logits = torch.tensor([[9.0, 8.0, 0.0, 0.0, -5.0, -5.0]])
    q_logits = torch.tensor([[0.0, 0.0, 0.0, 7.0, 6.0, 0.0]], requires_grad=True)
    lk, ce, _ = lk_hybrid_loss(p_logits, q_logits, top_k=2, tau=1.0)  # union = {0, 1, 3, 4}
    (lk + ce).sum().backward()
    assert torch.isfinite(q_logits.grad).all()
    assert q_logits.grad[0, 2] == 0 and q_logits.grad[0, 5] == 0  # outside the union: no signal
    union = torch.tensor([0, 1, 3, 4])
    p, q = p_logits[0, union].softmax(-1), q_logits[0, union].detach().softmax(-1)
    lam = torch.exp(-0.5 * torch.minimum(p, q).sum())
    expected = lam * (p * (p / q).log()).sum() + (1 - lam) * 0.5 * (p - q).abs().sum()
    assert torch.allclose(lk[0], expected, atol=1e-5)
    assert torch.allclose(ce[0], -q.log()[0], atol=1e-5)


def test_read_only_prefix_gives_the_inference_draft_logits():
    net = random_model(0)
    ctx = torch.randint(6, 64, (2, 7))
    cache = net.new_cache(2, 16)
    net(ctx, mask="causal", cache=cache)
    cache.commit(7)
    block = torch.tensor([[9, 5, 5, 5], [11, 5, 5, 5]])
    expected = net(block, mask="bidirectional", cache=cache)
    got = net(block, mask="bidirectional", cache=ReadOnlyPrefix(cache))
    assert torch.allclose(got, expected, atol=1e-10) and cache.length == 7


def test_adapter_starts_as_the_base_model_and_only_it_trains():
    net = random_model(0)
    params = attach_adapter(net, rank=4, alpha=8.0)
    assert len(params) == 2 * len(net.encoder.layers)
    assert all(p.requires_grad for p in params)
    assert not any(p.requires_grad for n, p in net.named_parameters() if ".lora_" not in n)
    ids = torch.randint(6, 64, (1, 9))
    assert torch.equal(net(ids, mask="bidirectional", lora=True), net(ids, mask="bidirectional"))
    result = drafter_loss(net, ids, BLOCK, top_k=8, generator=torch.Generator().manual_seed(0))
    result.loss.backward()
    assert all(p.grad is not None for p in params)
    assert 0 <= result.accepted <= BLOCK - 1


def test_training_lowers_the_loss_and_stays_lossless(tmp_path):
    net = random_model(3)
    ids, cuts = stream(3)
    held = sample_contexts(ids, cuts, 32, 10, torch.Generator().manual_seed(9))
    cfg = DrafterConfig(rank=4, alpha=16.0, steps=40, batch_size=16, lr=3e-2, min_lr=3e-3, warmup_steps=4,
                        top_k=16, context=[6, 12], log_every=10, block_length=BLOCK)
    attach_adapter(net, cfg.rank, cfg.alpha, cfg.seed)
    before = drafter_loss(net, held, BLOCK, top_k=16, sample_fraction=0.0)  # greedy drafts: deterministic
    records = train_drafter(net, ids, cuts, cfg)
    assert [r["step"] for r in records] == [10, 20, 30, 40]
    after = drafter_loss(net, held, BLOCK, top_k=16, sample_fraction=0.0)
    assert float(after.loss.detach()) < 0.75 * float(before.loss.detach())
    assert after.alpha > before.alpha + 0.03  # drafts agree more with the verifier on unseen contexts

    out = save_drafter(net, tmp_path, cfg)
    assert out == tmp_path / LORA_DIR
    adapter = json.loads((out / "adapter_config.json").read_text())
    assert (adapter["r"], adapter["lora_alpha"], adapter["target_modules"]) == (4, 16.0, ["o_proj"])
    fresh = random_model(3)
    load_lora(fresh, out)
    for a, b in zip(fresh.encoder.layers, net.encoder.layers, strict=True):
        for name in ("lora_A", "lora_B"):  # the PEFT file stores float32
            trained = getattr(b.self_attn.o_proj, name)
            assert torch.equal(getattr(a.self_attn.o_proj, name), trained.float().double())
        assert a.self_attn.o_proj.lora_scale == 4.0
    for row in held[:8]:  # greedy_acceptance measures what a linear_spec cycle emits
        first_cycle = drive(decode(fresh, "linear_spec", row[None], StopRule(BLOCK), block_length=BLOCK,
                                               use_drafter=True)).stats.acceptance[0]
        assert greedy_acceptance(fresh, row[None], BLOCK, use_drafter=True) == first_cycle
    # Losslessness: the trained drafter changes how many tokens a cycle emits, never which.
    stop = StopRule(20)
    for prompt in ([7, 8, 9], [30, 12, 44, 6, 50], held[0].tolist()):
        x = torch.tensor([prompt])
        ar = drive(decode(fresh, "ar", x, stop)).tokens[0]
        assert drive(decode(fresh, "linear_spec", x, stop, block_length=BLOCK, use_drafter=True)).tokens[0] == ar


def test_drafter_config_errors(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("rank: 8\nranks: 4\n")
    with pytest.raises(ValueError, match="unknown key.*ranks"):
        DrafterConfig.load(bad)
    bad.write_text("context: [10, 5]\n")
    with pytest.raises(ValueError, match="context must be"):
        DrafterConfig.load(bad)
    with pytest.raises(ValueError, match="does not exist"):
        DrafterConfig.load(tmp_path / "missing.yaml")
    with pytest.raises(ValueError, match="too short"):
        sample_contexts(torch.arange(5), torch.arange(5), 2, 8, torch.Generator())


# ------------------------------------------------------------------------------------------------ the command


@pytest.fixture()
def cli():
    app = typer.Typer(add_completion=False)

    @app.callback()
    def _root() -> None:
        """test app"""

    register(app)
    return app


def test_train_drafter_command(cli, tmp_path):
    from trimode.train.tokenizer_train import config_fields, train_tokenizer

    text = "\n".join(f"line {i % 7}: the quick brown fox {i % 5}" for i in range(400))
    (tmp_path / "corpus.txt").write_text(text)
    (tmp_path / "other.txt").write_text(text.replace("fox", "dog"))
    model = tmp_path / "model"
    tok = train_tokenizer([text], 300, model)
    fields = config_fields(tok)
    net = random_model(0, vocab=fields["vocab_size"])
    net.config.eos_token_id, net.config.mask_token_id = fields["eos_token_id"], fields["mask_token_id"]
    save_checkpoint(net, model, dtype=torch.float32)
    recipe = tmp_path / "drafter.yaml"
    recipe.write_text(
        "rank: 4\nalpha: 8\nbatch_size: 4\ncontext: [8, 16]\neval_contexts: 8\nlog_every: 2\nsteps: 100\n"
        f"data:\n  sources:\n    - {{kind: text_files, glob: '{tmp_path}/*.txt', heldout_fraction: 0.5}}\n")
    result = CliRunner().invoke(cli, ["train-drafter", "--model", str(model), "--recipe", str(recipe),
                                      "--steps", "2", "--log", str(tmp_path / "log.jsonl")])
    assert result.exit_code == 0, result.output
    assert "step 2: loss" in result.output and "tokens per linear_spec cycle" in result.output
    assert (model / LORA_DIR / "adapter_model.safetensors").is_file()
    assert len((tmp_path / "log.jsonl").read_text().splitlines()) == 1
    import trimode

    assert trimode.load(model, device="cpu").has_drafter

    result = CliRunner().invoke(cli, ["train-drafter", "--model", str(tmp_path / "nope"), "--recipe", str(recipe)])
    assert result.exit_code == 2 and result.output.startswith("error: ") and "Traceback" not in result.output
    (model / "tokenizer.json").unlink()
    result = CliRunner().invoke(cli, ["train-drafter", "--model", str(model), "--recipe", str(recipe)])
    assert result.exit_code == 2 and "no tokenizer.json" in result.output
