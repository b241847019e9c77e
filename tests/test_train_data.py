"""Training data: tokenising with SFT prompts, packing, the seeded resumable batch stream, the WSD schedule."""

import math

import pytest
import torch

from tests.test_train_support import make_tokenizer, toy_texts, write_jsonl
from trimode.train.data import BatchStream, Document, PackedData, pack, pack_documents, read_jsonl, tokenize
from trimode.train.schedule import WSD

EOS = 2


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return make_tokenizer(tmp_path_factory.mktemp("tok"))


def test_tokenize_marks_prompt_tokens_without_loss(tok):
    [(ids, mask)] = tokenize([Document("the cat sat.", prompt="say: ")], tok, EOS)
    prompt, text = tok.encode("say: "), tok.encode("the cat sat.")
    assert ids == prompt + text + [EOS]
    assert mask == [False] * len(prompt) + [True] * (len(text) + 1)


def test_concat_packing_keeps_every_token_in_order():
    examples = [([10 + i] * n, [True] * n) for i, n in enumerate([5, 9, 3, 14, 2])]
    data = pack(examples, seq_len=8, pad_id=EOS)
    flat = data.input_ids.flatten().tolist()
    stream = [t for ids, _ in examples for t in ids]
    assert data.input_ids.shape == (math.ceil(len(stream) / 8), 8)
    assert flat[: len(stream)] == stream
    assert flat[len(stream):] == [EOS] * (data.input_ids.numel() - len(stream))
    assert data.loss_mask.flatten().tolist() == [True] * len(stream) + [False] * (data.input_ids.numel() - len(stream))


def test_pad_packing_starts_documents_on_a_new_row_when_they_do_not_fit():
    examples = [([11] * 5, [True] * 5), ([12] * 4, [True] * 4), ([13] * 3, [False, True, True]),
                ([14] * 10, [True] * 10)]
    data = pack(examples, seq_len=8, pad_id=EOS, packing="pad")
    rows = data.input_ids.tolist()
    assert rows[0] == [11] * 5 + [EOS] * 3
    assert rows[1] == [12] * 4 + [13] * 3 + [EOS]
    assert rows[2] == [14] * 8 and rows[3] == [14] * 2 + [EOS] * 6  # longer than a row: continues
    assert data.loss_mask[1].tolist() == [True] * 4 + [False, True, True] + [False]
    with pytest.raises(ValueError, match="packing"):
        pack(examples, 8, EOS, packing="best")


def test_packing_is_deterministic(tok):
    docs = [Document(t) for t in toy_texts(30)]
    a, b = pack_documents(docs, tok, 16, EOS), pack_documents(docs, tok, 16, EOS)
    assert torch.equal(a.input_ids, b.input_ids) and a.fingerprint() == b.fingerprint()
    c = pack_documents(docs[::-1], tok, 16, EOS)
    assert c.fingerprint() != a.fingerprint()


def rows(n: int = 10, length: int = 4) -> PackedData:
    ids = torch.arange(n)[:, None].expand(n, length).clone()
    return PackedData(ids, torch.ones(n, length, dtype=torch.bool))


def test_batch_stream_visits_each_row_once_per_epoch_in_a_seeded_order():
    data = rows(10)
    s = BatchStream(data, batch_size=3, seed=1)
    epoch0 = [s.next()[0][:, 0].tolist() for _ in range(3)]
    seen = sorted(r for b in epoch0 for r in b)
    assert len(set(seen)) == 9  # 10 rows, batches of 3: one row left out of this epoch
    assert s.position == {"epoch": 0, "index": 9}
    s.next()
    assert s.position == {"epoch": 1, "index": 3}
    again = BatchStream(data, 3, seed=1)
    assert [again.next()[0][:, 0].tolist() for _ in range(3)] == epoch0
    other = BatchStream(data, 3, seed=2)
    assert [other.next()[0][:, 0].tolist() for _ in range(3)] != epoch0


def test_batch_stream_resumes_from_a_saved_position():
    data = rows(7)
    straight = BatchStream(data, 2, seed=5)
    expected = [straight.next()[0][:, 0].tolist() for _ in range(9)]
    first = BatchStream(data, 2, seed=5)
    got = [first.next()[0][:, 0].tolist() for _ in range(4)]
    resumed = BatchStream(data, 2, seed=5, position=first.position)
    got += [resumed.next()[0][:, 0].tolist() for _ in range(5)]
    assert got == expected
    with pytest.raises(ValueError, match="fewer than one batch"):
        BatchStream(rows(3), 4, seed=0)


def test_read_jsonl(tmp_path):
    p = write_jsonl(tmp_path / "d.jsonl", [Document("a b"), Document("c", prompt="q")])
    assert read_jsonl(p) == [Document("a b"), Document("c", "q")]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "x"}\n{"txt": "y"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2"):
        read_jsonl(bad)
    with pytest.raises(ValueError, match="does not exist"):
        read_jsonl(tmp_path / "missing.jsonl")


def test_wsd_schedule():
    s = WSD(lr=1.0, min_lr=0.1, total_steps=10, warmup_steps=2, decay_steps=4)
    values = [s(i) for i in range(10)]
    assert values[:2] == [0.5, 1.0]
    assert values[2:6] == [1.0] * 4
    assert values[6:] == pytest.approx([0.775, 0.55, 0.325, 0.1])
    c = WSD(lr=1.0, min_lr=0.0, total_steps=4, decay_steps=4, decay="cosine")
    assert [c(i) for i in range(4)] == pytest.approx([0.5 * (1 + math.cos(math.pi * k / 4)) for k in range(1, 5)])
    assert WSD(1.0, 0.1, 5)(4) == 1.0  # no decay: constant after warmup
    with pytest.raises(ValueError, match="exceed"):
        WSD(1.0, 0.1, 5, warmup_steps=3, decay_steps=3)
    with pytest.raises(ValueError, match="decay"):
        WSD(1.0, 0.1, 5, decay="step")
