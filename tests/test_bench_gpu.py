"""The fast path (`trimode.model.static`) gives the eager path's tokens in every mode, and `trimode bench gpu`
(the engine's decode steps against a weight + KV / compute floor) runs end to end at the tiny shape on a CPU. On
a CUDA machine the CUDA-graph replay and the bench on the GPU are checked too; without CUDA those tests skip."""

import pytest
import torch
from typer.testing import CliRunner

from tests.conftest import TINY_A, random_model
from trimode.cli import app
from trimode.decode.driver import decode, drive
from trimode.decode.sampling import SamplingParams
from trimode.decode.stopping import StopRule
from trimode.model.static import StaticKVCache, StaticModel

STOP = StopRule(12, frozenset([3]))
PROMPT = torch.tensor([[1, 7, 9, 22, 13]])
DECODERS = {
    "ar": lambda m, s: decode(m, "ar", PROMPT, STOP, s),
    "diffusion": lambda m, s: decode(m, "diffusion", PROMPT, STOP, s, block_length=4, threshold=0.5),
    "linear_spec": lambda m, s: decode(m, "linear_spec", PROMPT, STOP, s, block_length=4, threshold=0.0,
                                       use_drafter=True),
    "quadratic_spec": lambda m, s: decode(m, "quadratic_spec", PROMPT, STOP, s, block_length=4),
}


@pytest.fixture(scope="module")
def net():
    return random_model(seed=1, lora=True)


@pytest.mark.parametrize("mode", list(DECODERS))
@pytest.mark.parametrize("sampling", [SamplingParams(), SamplingParams(0.8, seed=5)], ids=["greedy", "sampled"])
def test_static_path_gives_eager_tokens(net, mode, sampling):
    # A small min_window makes the decode cross several attention windows (16 -> 32 -> 64).
    fast = StaticModel(net, max_seq_len=256, min_window=16)
    eager = drive(DECODERS[mode](net, sampling))
    static = drive(DECODERS[mode](fast, sampling))
    assert static.tokens == eager.tokens
    assert static.stats.forward_passes == eager.stats.forward_passes
    assert len(static.tokens[0]) > 1


def test_static_logits_match_eager_pass_by_pass(net):
    fast = StaticModel(net, max_seq_len=64, min_window=8)
    cache_e, cache_s = net.new_cache(1, 64), fast.new_cache(1, 64)
    assert isinstance(cache_s, StaticKVCache)
    ids = torch.tensor([[4, 8, 15, 16, 23, 42, 6, 7, 9]])
    for mask, tokens in [("causal", ids), ("bidirectional", ids[:, :4]), ("causal", ids[:, :1])]:
        a = net(tokens, mask=mask, cache=cache_e)
        b = fast(tokens, mask=mask, cache=cache_s)
        assert torch.allclose(a, b, atol=1e-10, rtol=0)
        cache_e.commit(tokens.shape[1])
        cache_s.commit(tokens.shape[1])
    # beyond original_max_position_embeddings the Llama-4 query scale is active
    pos = torch.arange(20_000, 20_003)
    assert torch.allclose(net(ids[:, :3], cache=cache_e, positions=pos), fast(ids[:, :3], cache=cache_s, positions=pos),
                          atol=1e-10, rtol=0)


def test_static_cache_is_bounded_and_reused(net):
    fast = StaticModel(net, max_seq_len=16, min_window=8)
    with pytest.raises(ValueError, match="static cache holds 16"):
        fast.new_cache(1, 17)
    a, b = fast.new_cache(1, 16), fast.new_cache(1, 16)
    assert a.k.data_ptr() == b.k.data_ptr()  # one buffer: graphs captured on it stay valid
    with pytest.raises(ValueError, match="raise max_seq_len"):
        fast(torch.zeros(1, 17, dtype=torch.long), cache=a)


def test_static_model_drops_into_the_api():
    import trimode

    tm = trimode.load(TINY_A)
    expected = {m: tm.generate([1, 5, 9, 200], mode=m, max_new_tokens=12).token_ids for m in trimode.MODES}
    tm.net = StaticModel(tm.net, max_seq_len=256)
    for mode, tokens in expected.items():
        assert tm.generate([1, 5, 9, 200], mode=mode, max_new_tokens=12).token_ids == tokens


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_cuda_graphs_give_eager_tokens():
    net = random_model(seed=2, dtype=torch.float32, lora=True).cuda()
    fast = StaticModel(net, max_seq_len=256, min_window=16, graph_tokens=(1, 4, 20))
    ids = PROMPT.cuda()
    stop = StopRule(40, frozenset([3]))
    for dec in (lambda m: decode(m, "ar", ids, stop), lambda m: decode(m, "linear_spec", ids, stop, block_length=4,
                                                                                     use_drafter=True),
                   lambda m: decode(m, "quadratic_spec", ids, stop, block_length=4)):
        assert drive(dec(fast)).tokens == drive(dec(net)).tokens
    assert fast.num_graphs > 0


def test_bench_gpu_tiny_on_cpu(tmp_path):
    out = tmp_path / "gpu.md"
    r = CliRunner().invoke(app, ["bench", "gpu", "--shapes", "tiny", "--device", "cpu", "--contexts", "24",
                                 "--requests", "1,2", "--block", "4", "--lora-rank", "4", "--steps", "2",
                                 "--model", str(TINY_A), "--out", str(out)])
    assert r.exit_code == 0, r.output
    text = out.read_text()
    assert text.startswith("Command: `") and "incomplete" not in text.splitlines()[0]
    assert "**Device: CPU" in text and "Not a GPU" in text
    for mode in ("ar", "diffusion", "linear_spec", "quadratic_spec"):
        for n in (1, 2):
            row = next(line for line in text.splitlines() if line.startswith(f"| tiny (0.61M) | 24 | {n} | {mode} |"))
            cells = [c.strip() for c in row.split("|")[1:-1]]
            assert cells[4] == "1.0" and float(cells[5]) > 0 and float(cells[8]) > 0, row  # fwd/step, ms, x floor
            assert cells[12] not in ("-", "?"), row  # the attention kernel seen
    assert "measured on `tiny-a` at batch 1" in text
    assert "- tiny, context 24: AR step" in text and "targets do not apply" in text
    assert "Loading: `load_model` on a random tiny checkpoint" in text and "failed" not in text


def test_step_floor_counts_weights_kv_and_compute():
    from trimode.bench import roofline as g
    from trimode.bench.gpu_cells import SHAPES
    from trimode.engine.engine import ForwardShape
    from trimode.model.config import NLDConfig
    from trimode.model.masks import QuadraticStep
    from trimode.model.transformer import NLDTransformer

    cfg = NLDConfig(**SHAPES["8b"])
    with torch.device("meta"):
        net = NLDTransformer(cfg).to(torch.bfloat16)
    costs = g.NetCosts.of(net)
    assert costs.weights == 2 * (sum(p.numel() for p in net.parameters()) - cfg.vocab_size * cfg.hidden_size)
    assert costs.kv_token == 2 * 34 * 8 * 128 * 2
    dev = g.DeviceInfo("test", torch.device("cuda"), torch.bfloat16, 4e12, 1e15, "test")
    ar = ForwardShape(1, 1, 2048, ("causal",), (False,), 1)
    seconds, bound = g.step_floor([ar], cfg, costs, dev, 32)
    expected = costs.weights + 2048 * costs.kv_token + 2 * costs.kv_token + cfg.vocab_size * 2
    assert bound == "memory" and seconds == pytest.approx(expected / 4e12)
    # 64 quadratic passes: compute-bound, and the weights count once however the engine splits the rows
    quad = [ForwardShape(8, 1056, 2048, (QuadraticStep(32),) * 8, (False,) * 8, 8 * 1056)] * 8
    seconds, bound = g.step_floor(quad, cfg, costs, dev, 32)
    assert bound == "compute" and seconds > 64 * 1056 * 2 * costs.body / 1e15
    # drafts and verifies packed in one step: the adapter's bytes once, each group's K/V
    mixed = [ForwardShape(2, 32, 100, ("bidirectional",) * 2, (True,) * 2, 64),
             ForwardShape(3, 32, 200, ("causal",) * 3, (False,) * 3, 96)]
    seconds, bound = g.step_floor(mixed, cfg, costs, dev, 32)
    kv = (2 * 100 + 3 * 200 + 2 * 5 * 32) * costs.kv_token
    assert bound == "memory" and seconds == pytest.approx((costs.weights_lora + kv + 160 * cfg.vocab_size * 2) / 4e12)


def test_attention_kernel_probe_sees_the_math_fallback():
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from trimode.bench.gpu_cells import AttentionKernels

    q, k = torch.randn(1, 4, 8, 16), torch.randn(1, 2, 12, 16)
    mask = torch.rand(1, 1, 8, 12) > 0.3
    with sdpa_kernel([SDPBackend.MATH]), AttentionKernels() as probe:
        F.scaled_dot_product_attention(q, k, k, attn_mask=mask, enable_gqa=True)
    assert probe.summary() == "MATH"
    with AttentionKernels() as probe:
        F.scaled_dot_product_attention(q, k, k, attn_mask=mask, enable_gqa=True)
    assert "MATH" not in probe.summary() and probe.summary() != "?"


def test_bench_gpu_refuses_big_shapes_without_cuda():
    r = CliRunner().invoke(app, ["bench", "gpu", "--shapes", "8b", "--device", "cpu"])
    assert r.exit_code == 2 and "need a CUDA GPU" in r.output and "Traceback" not in r.output
    r = CliRunner().invoke(app, ["bench", "gpu", "--shapes", "70b", "--device", "cpu"])
    assert r.exit_code == 2 and "unknown shape" in r.output
    r = CliRunner().invoke(app, ["bench", "gpu", "--shapes", "tiny", "--device", "cpu", "--modes", "auto"])
    assert r.exit_code == 2 and "unknown mode" in r.output


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the GPU bench needs a CUDA device")
def test_bench_gpu_runs_the_engine_on_cuda(tmp_path):
    out = tmp_path / "gpu.md"
    r = CliRunner().invoke(app, ["bench", "gpu", "--shapes", "tiny", "--contexts", "256", "--requests", "1,4",
                                 "--block", "8", "--lora-rank", "8", "--steps", "2", "--out", str(out)])
    assert r.exit_code == 0, r.output
    text = out.read_text()
    assert "**Device: GPU, " in text and "Not a GPU" not in text
    rows = [line for line in text.splitlines() if line.startswith("| tiny (0.61M) | 256 |")]
    assert len(rows) == 8 and not any("Error" in row for row in rows), rows
    assert "device peak" in text and "- failed" not in text
