"""The editing options of the objective and the data (the infill and revision skills of docs/editing.md):
substituted tokens to correct (revision) and infill examples whose `middle + pads + suffix` is one noisy block.
Off by default: the reference objective."""

import random

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from tests.conftest import random_model
from tests.test_train_objective import brute_force_mask
from tests.test_train_support import tiny_recipe
from trimode.model.masks import dual_stream_mask
from trimode.train.data import (
    BatchStream,
    Example,
    InfillOptions,
    cut_infill,
    infill_example,
    infill_examples,
    pack,
    split_words,
)
from trimode.train.objective import (
    EditWeights,
    JointObjective,
    block_ids,
    corrupt,
    dual_stream_logits,
    dual_stream_row_masks,
    global_loss,
    losses,
    noise_key,
)
from trimode.train.recipe import Recipe, RecipeError
from trimode.train.trainer import train

MASK_ID = 5  # random_model's mask_token_id
PAD = 0


def keys(n, step=0):
    return [noise_key(3, step, r) for r in range(n)]


# ------------------------------------------------------------------------------------------- defaults


def test_defaults_leave_the_reference_objective_unchanged():
    net = random_model(11)
    ids = torch.randint(6, 64, (3, 12))
    lm = torch.ones_like(ids, dtype=torch.bool)
    lm[0, :4] = False
    ref = corrupt(ids, lm, MASK_ID, keys(3))
    off = corrupt(ids, lm, MASK_ID, keys(3), substitute_rate=0.0, substitute_from="vocab", vocab_size=64)
    assert off.substituted is None
    assert torch.equal(off.noisy, ref.noisy) and torch.equal(off.masked, ref.masked) and torch.equal(off.p, ref.p)

    obj = JointObjective(net, 4)
    plain = obj(ids, lm, ref)
    # Explicit defaults (AR mask = loss mask, no spans) give the same sums, bit for bit.
    spans = torch.zeros_like(ids, dtype=torch.int32)
    explicit = obj(ids, lm, ref, ar_mask=lm.clone(), block_spans=spans)
    torch.testing.assert_close(explicit.as_tensor(), plain.as_tensor(), rtol=0, atol=1e-12)
    assert plain.sub_count.item() == plain.keep_count.item() == 0
    counts = (float(plain.ar_count), float(plain.diff_count))
    reference = 0.3 * plain.diff_sum / counts[1] + plain.ar_sum / counts[0]
    assert global_loss(plain, 0.3, *counts).item() == reference.item()
    assert set(losses(plain.detach(), 0.3)) == {"loss", "ar_loss", "diff_loss", "diff_ce", "masked_tokens", "ar_tokens"}


@pytest.mark.parametrize("n,block", [(8, 4), (10, 3), (9, 16)])
def test_block_ids_without_spans_are_the_grid(n, block):
    spans = torch.zeros(2, n, dtype=torch.int32)
    blocks = block_ids(spans, block)
    assert torch.equal(blocks, (torch.arange(n) // block).expand(2, n))
    for row in dual_stream_row_masks(blocks):
        assert torch.equal(row, dual_stream_mask(n, block))


# ------------------------------------------------------------------------------------------- substitution


def test_substitution_replaces_visible_loss_tokens_only_and_keeps_the_masks():
    b, length = 64, 30
    ids = torch.randint(6, 64, (b, length))
    lm = torch.ones(b, length, dtype=torch.bool)
    lm[:, :8] = False  # an SFT prompt
    ref = corrupt(ids, lm, MASK_ID, keys(b))
    for source in ("row", "vocab"):
        n = corrupt(ids, lm, MASK_ID, keys(b), substitute_rate=0.2, substitute_from=source, vocab_size=64)
        assert torch.equal(n.masked, ref.masked) and torch.equal(n.p, ref.p)  # drawn after the reference noise
        sub = n.substituted
        assert not (sub & n.masked).any() and not sub[:, :8].any()
        assert (n.noisy[sub] != ids[sub]).all() and (n.noisy[sub] != MASK_ID).all()
        keep = ~sub & ~n.masked
        assert torch.equal(n.noisy[keep], ids[keep]) and (n.noisy[n.masked] == MASK_ID).all()
        visible = lm & ~n.masked
        assert 0.12 < sub.sum() / visible.sum() < 0.26  # about 0.2, less the draws equal to the original
        if source == "row":  # plausible wrong tokens: other tokens of the same row's answer
            for r in range(b):
                assert set(n.noisy[r][sub[r]].tolist()) <= set(ids[r][lm[r]].tolist())
        again = corrupt(ids, lm, MASK_ID, keys(b), substitute_rate=0.2, substitute_from=source, vocab_size=64)
        assert torch.equal(again.noisy, n.noisy)  # keyed
    with pytest.raises(ValueError, match="vocab_size"):
        corrupt(ids, lm, MASK_ID, keys(b), substitute_rate=0.2, substitute_from="vocab")
    with pytest.raises(ValueError, match="substitute_from"):
        corrupt(ids, lm, MASK_ID, keys(b), substitute_rate=0.2, substitute_from="nearby")


def test_substituted_positions_carry_the_loss_of_the_original_token():
    net = random_model(12)
    length, block = 12, 4
    ids = torch.randint(6, 64, (3, length))
    lm = torch.ones_like(ids, dtype=torch.bool)
    lm[1, :5] = False
    noise = corrupt(ids, lm, MASK_ID, keys(3, 1), substitute_rate=0.4, vocab_size=64, substitute_from="vocab")
    assert noise.substituted.any()
    sums = JointObjective(net, block)(ids, lm, noise)
    diff, _ = dual_stream_logits(net, noise.noisy, ids, block)
    sub_sum = keep_sum = 0.0
    n_sub = n_keep = 0
    for b in range(3):
        for i in range(length):
            if not lm[b, i] or noise.masked[b, i]:
                continue
            ce = F.cross_entropy(diff[b, i], ids[b, i]).item()  # the original token, whatever the input shows
            if noise.substituted[b, i]:
                sub_sum, n_sub = sub_sum + ce, n_sub + 1
            else:
                keep_sum, n_keep = keep_sum + ce, n_keep + 1
    assert sums.sub_count.item() == n_sub > 0 and sums.keep_count.item() == n_keep > 0
    assert sums.sub_sum.item() == pytest.approx(sub_sum, rel=1e-9)
    assert sums.keep_sum.item() == pytest.approx(keep_sum, rel=1e-9)
    w = EditWeights(substitute=2.0, keep=0.5)
    ar_n, diff_n = float(sums.ar_count), float(sums.diff_count)
    loss = global_loss(sums, 0.3, ar_n, diff_n, n_sub, n_keep, w)
    expected = (0.3 * sums.diff_sum.item() / diff_n + sums.ar_sum.item() / ar_n
                + 0.3 * (2.0 * sub_sum / n_sub + 0.5 * keep_sum / n_keep))
    assert loss.item() == pytest.approx(expected, rel=1e-9)
    report = losses(sums.detach(), 0.3, w)
    assert report["loss"] == pytest.approx(expected, rel=1e-9)
    assert report["substituted_tokens"] == n_sub and report["sub_ce"] == pytest.approx(sub_sum / n_sub)
    # The substitution terms have gradients (they train the network).
    loss.backward()
    assert net.diffusion_head.weight.grad.abs().sum() > 0


# ------------------------------------------------------------------------------------------- per-row blocks


def brute_force_row_mask(blocks: list[int]) -> torch.Tensor:
    n = len(blocks)
    m = torch.zeros(2 * n, 2 * n, dtype=torch.bool)
    for i in range(2 * n):
        for j in range(2 * n):
            qi, kj = i % n, j % n
            if i < n and j < n:
                m[i, j] = blocks[qi] == blocks[kj]
            elif i < n:
                m[i, j] = blocks[qi] > blocks[kj]
            elif j >= n:
                m[i, j] = qi >= kj
    return m


def test_a_span_is_one_block_of_any_length():
    spans = torch.tensor([[0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 0, 0, 0],
                          [1, 1, 1, 0, 0, 0, 2, 2, 0, 0, 0, 0, 0, 0]], dtype=torch.int32)
    blocks = block_ids(spans, 4)
    assert blocks.tolist() == [[0, 0, 0, 0, 1, 2, 2, 2, 2, 2, 2, 3, 4, 4],
                               [0, 0, 0, 1, 2, 2, 3, 3, 4, 4, 4, 4, 5, 5]]
    masks = dual_stream_row_masks(blocks)
    for r in range(2):
        assert torch.equal(masks[r], brute_force_row_mask(blocks[r].tolist()))
    with_grid = brute_force_mask(14, 4)
    assert not torch.equal(masks[0], with_grid)


def test_the_infill_block_sees_the_clean_prefix_and_itself_only():
    """prefix (5) | middle + pads + suffix (7) | rest (2): the span is one block, as in infill decoding."""
    net = random_model(13)
    length = 14
    spans = torch.zeros(1, length, dtype=torch.int32)
    spans[0, 5:12] = 1
    clean = torch.randint(6, 64, (1, length))
    noisy = clean.clone()
    noisy[0, 5:9] = MASK_ID  # the hole; 9..11 is the visible suffix
    diff, causal = dual_stream_logits(net, noisy, clean, 4, spans)
    span = slice(5, 12)
    # Clean tokens inside and after the span are invisible to it; the clean prefix is visible.
    later = clean.clone()
    later[0, 5:] = torch.randint(6, 64, (9,))
    diff2, _ = dual_stream_logits(net, noisy, later, 4, spans)
    torch.testing.assert_close(diff2[:, span], diff[:, span], rtol=0, atol=1e-12)
    earlier = clean.clone()
    earlier[0, 1] = (earlier[0, 1] + 1 - 6) % 58 + 6
    diff3, _ = dual_stream_logits(net, noisy, earlier, 4, spans)
    assert not torch.allclose(diff3[:, span], diff[:, span])
    # The suffix (noisy stream, inside the span) is seen by the hole, also across the 4-token grid.
    suffix = noisy.clone()
    suffix[0, 11] = (suffix[0, 11] + 1 - 6) % 58 + 6
    diff4, causal4 = dual_stream_logits(net, suffix, clean, 4, spans)
    assert not torch.allclose(diff4[:, 5:9], diff[:, 5:9])
    torch.testing.assert_close(diff4[:, :5], diff[:, :5], rtol=0, atol=1e-12)
    torch.testing.assert_close(causal4, causal, rtol=0, atol=1e-12)  # the clean stream never sees noisy tokens
    # The clean stream is still the plain causal model.
    torch.testing.assert_close(causal, net(clean, mask="causal"), rtol=0, atol=1e-10)


def test_ar_mask_chooses_the_ar_targets():
    net = random_model(14)
    ids = torch.randint(6, 64, (2, 10))
    lm = torch.ones_like(ids, dtype=torch.bool)
    ar = lm.clone()
    ar[:, 6:] = False  # pads and suffix of an infill example: no next-token loss
    noise = corrupt(ids, lm, MASK_ID, keys(2))
    sums = JointObjective(net, 4)(ids, lm, noise, ar_mask=ar)
    _, causal = dual_stream_logits(net, noise.noisy, ids, 4)
    expected = sum(F.cross_entropy(causal[b, i], ids[b, i + 1]).item() for b in range(2) for i in range(5))
    assert sums.ar_count.item() == 10 and sums.ar_sum.item() == pytest.approx(expected, rel=1e-9)
    assert sums.diff_count.item() == noise.masked.sum().item()  # the diffusion loss still follows loss_mask


# ------------------------------------------------------------------------------------------- infill data


def test_split_words_keeps_the_whitespace_before_each_word():
    assert split_words("1 2 3") == ["1", " 2", " 3"]
    assert split_words("  def f(x):\n    return x\n") == ["  def", " f(x):", "\n    return", " x\n"]
    assert split_words(" \n ") == []
    for text in ("a b", "x\n\ny  ", "  lead"):
        assert "".join(split_words(text)) == text


def test_an_infill_cut_is_words_with_a_suffix_that_is_never_empty():
    opts = InfillOptions(share=1.0, max_hole=2, max_pad=6, max_suffix=32, tail=0.0, prefix_space=0.0)
    text = "0 2 3 6 8"
    seen = set()
    for seed in range(300):
        c = cut_infill(text, random.Random(seed), opts, lambda rest: len(rest))
        assert c.before + c.middle + c.rest == text
        assert 1 <= len(split_words(c.middle)) <= 2 and 0 <= c.pads <= 6 and c.n_suffix is None
        assert c.eos or c.rest  # an empty rest always ends in EOS
        seen.add((c.before, c.middle, c.eos, c.pads))
    assert {(b, m) for b, m, _, _ in seen} == {("0 2 3 6 8"[:i], m) for i, m in [
        (0, "0"), (1, " 2"), (3, " 3"), (5, " 6"), (7, " 8"),
        (0, "0 2"), (1, " 2 3"), (3, " 3 6"), (5, " 6 8")]}
    assert {e for _, m, e, _ in seen if m in (" 8", " 6 8")} == {True}
    assert {e for _, m, e, _ in seen if m == "0"} == {True, False}  # a whole rest: EOS half of the time
    long = " ".join(["w"] * 100)
    for seed in range(20):
        c = cut_infill(long, random.Random(seed), opts, lambda rest: len(rest.split()))
        if len(c.rest.split()) > 32:  # a long rest: cut to 0..32 tokens, no EOS
            assert c.n_suffix is not None and 0 <= c.n_suffix <= 32 and not c.eos
        else:
            assert c.n_suffix is None
    assert cut_infill("  ", random.Random(0), opts, len) is None


def test_some_holes_leave_their_leading_space_in_the_prefix():
    opts = InfillOptions(share=1.0, max_hole=2, tail=0.0, prefix_space=0.5)
    cuts = [cut_infill("a b c d", random.Random(seed), opts, len) for seed in range(200)]
    assert all(c.before + c.middle + c.rest == "a b c d" for c in cuts)
    inside = [c for c in cuts if c.before and c.middle.startswith(" ")]
    outside = [c for c in cuts if c.before.endswith(" ")]
    assert inside and outside and len(inside) + len(outside) == sum(1 for c in cuts if c.before)
    assert all(not c.middle.startswith(" ") for c in outside)


def test_tails_end_the_text_with_eos_and_nothing_after(tok):
    from trimode.train.data import Document

    opts = InfillOptions(share=1.0, max_hole=2, max_pad=3, tail=1.0)
    cuts = [cut_infill("0 2 3 6 8", random.Random(seed), opts, len) for seed in range(50)]
    assert all(c.tail and c.rest == "" and c.middle in (" 8", " 6 8") for c in cuts)
    docs = [Document("a b c d", prompt="say: ")]
    [plain, tail] = infill_examples(docs, tok, 2, opts, seed=0, pad_id=PAD, seq_len=48)
    s, end = tail.span
    body = tail.ids[s:]
    n_middle = tail.ar[s:].count(True) - 1  # the middle, then its EOS (an AR target: the text ends there)
    assert PAD not in body and body[n_middle:] == [2] * (len(body) - n_middle)  # EOS, then EOS as the filler
    assert all(tail.loss[s:]) and end == len(tail.ids)  # every slot has a loss; nothing after the block
    assert tok.decode(tail.ids[len(tok.encode("say: ")) : s + n_middle]) == "a b c d"


def test_an_infill_example_is_prefix_middle_pads_suffix():
    e = infill_example([100, 101], [200, 201], [202, 203], [204, 2], pads=3, pad_id=PAD, seq_len=64)
    assert e.ids == [100, 101, 200, 201, 202, 203, PAD, PAD, PAD, 204, 2]
    assert e.span == (4, 11)  # middle + pads + suffix
    assert e.loss == [False, False, True, True, True, True, True, True, True, False, False]  # no loss on the suffix
    assert e.ar == [False, False, True, True, True, True, False, False, False, False, False]  # none on pads either
    cut = infill_example([100, 101], [200, 201], [202, 203], [204, 2], pads=3, pad_id=PAD, seq_len=9)
    assert cut.ids == [200, 201, 202, 203, PAD, PAD, PAD, 204, 2][-9:] and cut.span == (2, 9)  # prefix cut left
    assert infill_example([1], [2], [], [3], 2, PAD, 64) is None  # no middle
    assert infill_example([1], [2], [3, 4], [5] * 8, 2, PAD, 11) is None  # the hole and suffix do not fit


def test_an_example_with_two_holes_is_a_template_block():
    e = infill_example([100], [200], [202], [204, 2], pads=1, pad_id=PAD, seq_len=64, more=[([300, 301], [302], 2)])
    assert e.ids == [100, 200, 202, PAD, 300, 301, 302, PAD, PAD, 204, 2]
    assert e.span == (2, 11)  # both holes, the text between them and the suffix: one block
    assert e.loss == [False, True, True, True, False, False, True, True, True, False, False]
    assert e.ar == [False, True, True] + [False] * 8  # no AR target after the first pad
    assert infill_example([1], [2], [3], [4], 0, PAD, 64, more=[([5], [], 1)]) is None  # an empty second middle


def test_cuts_with_up_to_two_holes_leave_given_text_between_them():
    text = "a b c d e f g h"
    one = InfillOptions(share=1.0, max_hole=2, tail=0.0)
    two = InfillOptions(share=1.0, max_hole=2, tail=0.0, holes=2)
    assert [cut_infill(text, random.Random(s), one, len) for s in range(50)] == [
        cut_infill(text, random.Random(s), InfillOptions(share=1.0, max_hole=2, tail=0.0, holes=1), len)
        for s in range(50)]
    counts = set()
    for seed in range(300):
        c = cut_infill(text, random.Random(seed), two, len)
        joined = c.before + c.middle + "".join(given + m for given, m, _ in c.more) + c.rest
        assert joined == text
        for given, m, pads in c.more:
            assert given.strip() and 1 <= len(split_words(m)) <= 2 and 0 <= pads <= 8
        assert one.holes == 1 and len(c.more) <= 1
        counts.add(len(c.more))
    assert counts == {0, 1}


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    from tests.test_train_support import make_tokenizer

    return make_tokenizer(tmp_path_factory.mktemp("tok"))


def test_infill_examples_are_mixed_in_seeded_and_tokenised_like_a_caller(tok):
    from tests.test_train_support import toy_texts
    from trimode.train.data import Document, tokenize

    docs = [Document(t, prompt="say: ") for t in toy_texts(12)]
    opts = InfillOptions(share=0.5, max_hole=2, max_pad=4, tail=0.0, prefix_space=0.5)
    mixed = infill_examples(docs, tok, 2, opts, seed=1, pad_id=PAD, seq_len=48)
    assert mixed == infill_examples(docs, tok, 2, opts, seed=1, pad_id=PAD, seq_len=48)
    assert mixed != infill_examples(docs, tok, 2, opts, seed=2, pad_id=PAD, seq_len=48)
    plain = [e for e in mixed if not isinstance(e, Example)]
    spans = [e for e in mixed if isinstance(e, Example)]
    assert plain == tokenize(docs, tok, 2) and 0 < len(spans) < len(docs)
    assert infill_examples(docs, tok, 2, InfillOptions(share=0.0), 1, PAD, 48) == tokenize(docs, tok, 2)
    kept = [Document(d.text, d.prompt, infill=i % 2 == 0) for i, d in enumerate(docs)]
    some = infill_examples(kept, tok, 2, InfillOptions(share=2.0, max_hole=2, tail=0.0), 1, PAD, 48)
    owner, cut_from = -1, []  # each document's infill examples follow it
    for e in some:
        if isinstance(e, Example):
            cut_from.append(owner)
        else:
            owner += 1
    assert owner == len(kept) - 1 and cut_from and all(kept[i].infill for i in cut_from)
    prompt = tok.encode("say: ")
    for e in spans:
        s, end = e.span
        assert e.ids[: len(prompt)] == prompt
        hole = e.loss[s:].count(True)
        n_pad = hole - e.ar[s:].count(True)
        middle, suffix = e.ids[s : s + hole - n_pad], e.ids[s + hole :]
        text = tok.decode(e.ids[len(prompt) : s]) + tok.decode(middle) + tok.decode(suffix)
        assert any(text == d.text for d in docs)  # before + middle + rest = the document
        assert suffix  # never empty

    data = pack(mixed, seq_len=48, pad_id=2, packing="concat")
    assert data.ar_mask is not None and data.block_spans is not None
    found = 0
    for r in range(len(data)):
        row = data.block_spans[r]
        for k in range(1, int(row.max()) + 1):
            at = (row == k).nonzero().flatten()
            assert torch.equal(at, torch.arange(int(at[0]), int(at[-1]) + 1))  # contiguous, within the row
            found += 1
    assert found == len(spans)  # a span example is never split over rows, even in concat packing
    plain_data = pack(plain, seq_len=48, pad_id=2)
    assert plain_data.ar_mask is None and plain_data.block_spans is None
    batch = BatchStream(data, 2, seed=0).next()
    assert batch.block_spans.shape == batch.input_ids.shape == batch.ar_mask.shape


def test_pack_refuses_a_span_example_longer_than_a_row():
    e = Example([1] * 10, [True] * 10, [True] * 10, (2, 10))
    with pytest.raises(ValueError, match="more than seq_len"):
        pack([e], seq_len=8, pad_id=2)


# ------------------------------------------------------------------------------------------- recipe and trainer


def test_recipe_options_and_errors(tmp_path):
    r = Recipe.load(tiny_recipe(tmp_path))
    assert r.objective.substitute_rate == 0.0 and r.data.infill.share == 0.0  # off by default
    r = Recipe.load(tiny_recipe(tmp_path, objective={"substitute_rate": 0.1, "substitute_from": "vocab"},
                                data={"train_jsonl": ["train.jsonl"], "infill": {"share": 0.5, "max_pad": 4}}))
    assert r.objective.substitute_from == "vocab" and r.data.infill.max_pad == 4 and r.data.infill.max_hole == 4
    data = {"train_jsonl": ["train.jsonl"]}
    for sections, message in [({"objective": {"substitute_rate": 1.5}}, "substitute_rate"),
                              ({"objective": {"substitute_from": "near"}}, "substitute_from"),
                              ({"data": {**data, "infill": {"max_hole": 0}}}, "data.infill"),
                              ({"data": {**data, "infill": {"holes": 0}}}, "data.infill"),
                              ({"data": {**data, "infill": {"gaps": 1}}}, "data.infill.gaps")]:
        with pytest.raises(RecipeError, match=message):
            Recipe.load(tiny_recipe(tmp_path, **sections))


def editing_recipe(tmp_path, out):
    from tests.test_train_support import TINY_MODEL

    return tiny_recipe(tmp_path, out=out, model={"config": {**TINY_MODEL, "pad_token_id": "<unk>"}},
                       objective={"substitute_rate": 0.15},
                       data={"train_jsonl": ["train.jsonl"], "eval_jsonl": ["eval.jsonl"], "seq_len": 32,
                             "infill": {"share": 0.5, "max_hole": 2, "max_pad": 4, "max_suffix": 8}})


def test_training_with_the_editing_options_logs_them_and_resumes_exactly(tmp_path):
    straight = editing_recipe(tmp_path, "straight")
    train(Recipe.load(straight), progress=False)
    split = editing_recipe(tmp_path, "split")
    train(Recipe.load(split), stop_at=3, progress=False)
    train(Recipe.load(split), resume=True, progress=False)
    a = load_file(str(tmp_path / "straight" / "model.safetensors"))
    b = load_file(str(tmp_path / "split" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    import json

    logs = [json.loads(x) for x in (tmp_path / "straight" / "train_log.jsonl").read_text().splitlines()]
    steps = [r for r in logs if "loss" in r]
    assert all(r["substituted_tokens"] > 0 and r["sub_ce"] > 0 and "keep_ce" in r for r in steps)
    for r in steps:
        assert r["loss"] == pytest.approx(0.3 * (r["diff_loss"] + r["sub_ce"] + r["keep_ce"]) + r["ar_loss"])
    evals = [r for r in logs if "eval_loss" in r]
    assert evals and all("eval_sub_ce" in r for r in evals)


def test_infill_needs_a_pad_token(tmp_path):
    recipe = tiny_recipe(tmp_path, data={"train_jsonl": ["train.jsonl"], "infill": {"share": 0.5}})
    with pytest.raises(RecipeError, match="pad token"):
        train(Recipe.load(recipe), progress=False)


# ------------------------------------------------------------------------------------------- editing evaluation


def test_the_reference_infill_and_revision_follow_the_contract():
    from tests.edit_oracle import infill_tokens, revise_tokens

    net = random_model(15)
    net.config.pad_token_id = 7
    prefix, suffix = [10, 11, 12, 13], [20, 21]
    middle, forwards = infill_tokens(net, prefix, suffix, budget=5, threshold=0.9)
    assert len(middle) <= 5 and 7 not in middle and MASK_ID not in middle
    assert 2 <= forwards <= 1 + 5  # the prefill, then at least one slot per pass
    everything, passes = infill_tokens(net, prefix, suffix, budget=5, threshold=0.0)
    assert passes == 2  # threshold 0: every slot in the first pass

    draft = [30, 31, 32, 33]
    same, forwards, remasked = revise_tokens(net, prefix, draft, knob=1.1)  # no confidence reaches 1.1
    assert same == draft and forwards == 2 and remasked == 0
    out, forwards, remasked = revise_tokens(net, prefix, draft, knob=0.0, rounds=1)
    with torch.no_grad():
        cache = net.new_cache(1)
        net(torch.tensor([prefix]), mask="causal", cache=cache)
        cache.commit(len(prefix))
        logits = net(torch.tensor([draft]), mask="bidirectional", cache=cache)[0]
    logits[:, MASK_ID] = float("-inf")
    disagree = int((logits.argmax(-1) != torch.tensor(draft)).sum())
    assert remasked == disagree > 0 and len(out) == len(draft) and MASK_ID not in out
    assert forwards >= 3  # prefill, the check, at least one refill pass
