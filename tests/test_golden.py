"""Every run of the reference implementation's golden file, reproduced through the drop-in adapter."""

import json

import pytest
import torch

from tests.conftest import DATA, TINY_A
from trimode.compat import NLDReference
from trimode.model.loading import load_lora, load_model

GOLDEN = json.loads((DATA / "tiny-a.json").read_text())


@pytest.fixture(scope="module")
def refs():
    plain = load_model(TINY_A)
    with_lora = load_model(TINY_A)
    load_lora(with_lora, TINY_A / "linear_spec_lora")
    return {False: NLDReference(plain), True: NLDReference(with_lora)}


def test_golden_file_is_complete():
    # Guards against the parametrised test silently running on nothing.
    assert len(GOLDEN["runs"]) == 79
    assert {r["function"] for r in GOLDEN["runs"]} == {
        "ar_generate", "generate", "linear_spec_generate", "self_spec_generate"}


@pytest.mark.parametrize("run", GOLDEN["runs"], ids=[r["id"] for r in GOLDEN["runs"]])
def test_golden_run(refs, run):
    ref = refs[run["lora"]]
    out, nfe = getattr(ref, run["function"])(run["prompt_ids"], **run["kwargs"])
    batched = isinstance(run["prompt_ids"][0], list)
    prompt_len = len(run["prompt_ids"][0]) if batched else len(run["prompt_ids"])
    expected = run["output_ids"] if batched else [run["output_ids"]]
    limit = run["kwargs"]["max_new_tokens"]
    got = out[:, prompt_len:].tolist()
    got = [g[: len(e[:limit])] for g, e in zip(got, expected)] if out.shape[1] - prompt_len > 0 else got
    assert got == [e[:limit] for e in expected]
    assert out.shape[1] - prompt_len == max(len(e[:limit]) for e in expected)
    assert nfe == run["nfe"]


FORWARDS = {
    "causal_full": dict(mask="causal"),
    "bidirectional_full": dict(mask="bidirectional"),
    "bidirectional_full_lora_on": dict(mask="bidirectional", lora=True),
}


@pytest.mark.parametrize("name", [*FORWARDS, "cached_block_bidirectional"])
def test_forward_checks(refs, name):
    net = refs[True].net
    fc = GOLDEN["forward_checks"]
    expect = fc[name]
    ids = torch.tensor([fc["prompt_ids"]])
    with torch.no_grad():
        if name in FORWARDS:
            logits = net(ids, **FORWARDS[name])
        else:
            cache = net.new_cache()
            net(ids, mask="causal", cache=cache)
            cache.commit(ids.shape[1])
            assert expect["block_ids"][0] == int(net(ids, mask="causal")[0, -1].argmax())
            logits = net(torch.tensor([expect["block_ids"]]), mask="bidirectional", cache=cache)
    assert list(logits.shape) == expect["shape"]
    torch.testing.assert_close(logits[0, -1, :8], torch.tensor(expect["last_first8"]), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(logits[0, 0, :8], torch.tensor(expect["first_first8"]), rtol=1e-4, atol=1e-4)
    assert logits.double().sum().item() == pytest.approx(expect["sum"], rel=1e-4, abs=1e-2)
    assert logits.double().abs().sum().item() == pytest.approx(expect["abs_sum"], rel=1e-4)
    assert logits[0].argmax(-1).tolist() == expect["argmax"]
