"""The Python API on a tiny checkpoint with a real tokenizer: text in and out, streaming, stop strings, dtypes."""

import pytest
import torch

import trimode
from tests.conftest import TINY_A, random_model
from trimode.model.loading import save_checkpoint
from trimode.train.tokenizer_train import config_fields, train_tokenizer

TEXT = ["def add(a, b):\n    return a + b\n", "the cat sat on the mat. the dog sat on the log.",
        "one two three four five six seven eight nine ten"] * 20


@pytest.fixture(scope="module")
def tm(tmp_path_factory):
    out = tmp_path_factory.mktemp("ckpt")
    tok = train_tokenizer(TEXT, 300, out)
    net = random_model(9, dtype=torch.float32, vocab=tok.vocab_size, scale=1.0)
    net.config.__dict__.update(config_fields(tok))
    save_checkpoint(net, out, dtype=torch.float32)
    return trimode.load(out)


@pytest.mark.parametrize("mode", trimode.MODES)
def test_stream_deltas_add_up_to_the_result(tm, mode):
    gen = tm.stream("the cat", mode=mode, max_new_tokens=20, block_length=4, eos_token_id=-1)
    deltas = []
    while True:
        try:
            deltas.append(next(gen))
        except StopIteration as done:
            result = done.value
            break
    assert "".join(d.text for d in deltas) == result.text
    assert sum((d.token_ids for d in deltas), []) == result.token_ids
    assert result.text == tm.decode(result.token_ids)
    assert result.finish_reason == "length" and len(result.token_ids) == 20


@pytest.mark.parametrize("mode", trimode.MODES)
def test_stop_string_cuts_text_in_every_mode(tm, mode):
    full = tm.generate("the dog", mode=mode, max_new_tokens=24, block_length=8, eos_token_id=-1, threshold=0.5
                       if mode in ("diffusion", "linear_spec") else None)
    assert len(full.text) > 6
    stop = full.text[3:6]
    cut = tm.generate("the dog", mode=mode, max_new_tokens=24, block_length=8, eos_token_id=-1, stop=[stop],
                      threshold=0.5 if mode in ("diffusion", "linear_spec") else None)
    assert cut.finish_reason == "stop"
    assert cut.text == full.text[: full.text.find(stop)]
    assert stop not in cut.text


def test_provisional_blocks_only_when_asked(tm):
    events = list(tm.stream("one two", mode="diffusion", max_new_tokens=8, block_length=8, provisional=True,
                            threshold=0.95, eos_token_id=-1))
    states = [e for e in events if isinstance(e, trimode.api.BlockState)]
    assert states and any(None in s.token_ids for s in states)
    plain = list(tm.stream("one two", mode="diffusion", max_new_tokens=8, block_length=8, threshold=0.95))
    assert not any(isinstance(e, trimode.api.BlockState) for e in plain)


def test_chat_template_renders_in_a_sandbox(tm):
    text = tm.tokenizer.apply_chat_template([{"role": "user", "content": "hi"}])
    assert "hi" in text
    tm.tokenizer.chat_template = "{{ ''.__class__.__mro__ }}"
    with pytest.raises(trimode.model.tokenizer.TemplateError):
        tm.tokenizer.apply_chat_template([{"role": "user", "content": "hi"}])


def test_bad_arguments_name_the_problem(tm):
    with pytest.raises(ValueError, match="unknown mode"):
        tm.generate("x", mode="fast")
    with pytest.raises(ValueError, match="threshold must be in"):
        tm.generate("x", mode="diffusion", threshold=1.5)
    with pytest.raises(ValueError, match="max_new_tokens"):
        tm.generate("x", max_new_tokens=0)
    with pytest.raises(ValueError, match="exceeds the context"):
        tm.generate("x", max_new_tokens=10**9)
    with pytest.raises(ValueError, match="top_p"):
        tm.generate("x", temperature=1.0, top_p=0)
    with pytest.raises(ValueError, match="no linear_spec_lora"):
        tm.generate("x", mode="linear_spec", use_drafter=True)


def test_bfloat16_runs_every_mode_and_agrees_with_float32_greedy_start():
    fp32 = trimode.load(TINY_A, dtype="float32")
    bf16 = trimode.load(TINY_A, dtype="bfloat16")
    assert bf16.net.dtype == torch.bfloat16
    a = fp32.generate([119, 69, 157, 61], max_new_tokens=4, eos_token_id=-1).token_ids
    b = bf16.generate([119, 69, 157, 61], max_new_tokens=4, eos_token_id=-1).token_ids
    assert a[0] == b[0]
    for mode in trimode.MODES:
        assert len(bf16.generate([1, 2, 3], mode=mode, max_new_tokens=8, eos_token_id=-1).token_ids) == 8
