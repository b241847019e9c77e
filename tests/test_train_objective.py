"""The joint AR + diffusion objective: the dual-stream mask, what each stream can see, the noise, the loss sums."""

import pytest
import torch
import torch.nn.functional as F

from tests.conftest import random_model
from trimode.model.masks import dual_stream_mask
from trimode.train.objective import (
    JointObjective,
    LossSums,
    corrupt,
    dual_stream_logits,
    global_loss,
    losses,
    noise_key,
)

MASK_ID = 5  # random_model's mask_token_id



def brute_force_mask(n: int, block: int) -> torch.Tensor:
    """The four rules of spec 3.2, one (query, key) pair at a time."""
    m = torch.zeros(2 * n, 2 * n, dtype=torch.bool)
    for i in range(2 * n):
        for j in range(2 * n):
            qi, kj = i % n, j % n
            q_noisy, k_noisy = i < n, j < n
            if q_noisy and k_noisy:
                m[i, j] = qi // block == kj // block
            elif q_noisy and not k_noisy:
                m[i, j] = qi // block > kj // block
            elif not q_noisy and not k_noisy:
                m[i, j] = qi >= kj
            else:
                m[i, j] = False
    return m


@pytest.mark.parametrize("n,block", [(8, 4), (12, 4), (10, 3), (6, 1), (7, 7), (9, 16)])
def test_dual_stream_mask_matches_definition(n, block):
    assert torch.equal(dual_stream_mask(n, block), brute_force_mask(n, block))


def test_clean_stream_sees_neither_noisy_tokens_nor_the_future():
    torch.manual_seed(0)
    net = random_model(1)
    length, block = 12, 4
    clean = torch.randint(6, 64, (2, length))
    noisy = clean.clone()
    noisy[:, ::3] = MASK_ID
    diff, causal = dual_stream_logits(net, noisy, clean, block)

    other_noisy = torch.randint(6, 64, (2, length))
    diff2, causal2 = dual_stream_logits(net, other_noisy, clean, block)
    torch.testing.assert_close(causal2, causal, rtol=0, atol=1e-12)
    assert not torch.allclose(diff2, diff)  # the noisy stream does depend on its tokens

    j = 7
    future = clean.clone()
    future[:, j:] = torch.randint(6, 64, (2, length - j))
    _, causal3 = dual_stream_logits(net, noisy, future, block)
    torch.testing.assert_close(causal3[:, :j], causal[:, :j], rtol=0, atol=1e-12)
    assert not torch.allclose(causal3[:, j:], causal[:, j:])


def test_causal_stream_equals_a_plain_causal_pass():
    """The clean half is the AR model: the same logits as an ordinary causal forward of the row."""
    net = random_model(2)
    clean = torch.randint(6, 64, (1, 10))
    _, causal = dual_stream_logits(net, clean.clone(), clean, 4)
    torch.testing.assert_close(causal, net(clean, mask="causal"), rtol=0, atol=1e-10)


def test_noisy_block_sees_its_block_and_earlier_clean_blocks_only():
    net = random_model(3)
    length, block = 12, 4
    clean = torch.randint(6, 64, (1, length))
    noisy = torch.full_like(clean, MASK_ID)
    diff, _ = dual_stream_logits(net, noisy, clean, block)
    # Changing clean block 1 (positions 4..7) may change noisy blocks 2 but not noisy blocks 0 and 1.
    changed = clean.clone()
    changed[:, 4:8] = torch.randint(6, 64, (1, 4))
    diff2, _ = dual_stream_logits(net, noisy, changed, block)
    torch.testing.assert_close(diff2[:, :8], diff[:, :8], rtol=0, atol=1e-12)
    assert not torch.allclose(diff2[:, 8:], diff[:, 8:])
    # Changing a noisy token of block 0 changes only noisy block 0.
    noisy2 = noisy.clone()
    noisy2[0, 1] = 9
    diff3, _ = dual_stream_logits(net, noisy2, clean, block)
    torch.testing.assert_close(diff3[:, 4:], diff[:, 4:], rtol=0, atol=1e-12)
    assert not torch.allclose(diff3[:, :4], diff[:, :4])


def test_masking_respects_loss_mask_and_rate():
    b, length = 64, 40
    ids = torch.randint(6, 64, (b, length))
    loss_mask = torch.ones(b, length, dtype=torch.bool)
    loss_mask[:, :10] = False  # an SFT prompt
    noise = corrupt(ids, loss_mask, MASK_ID, [noise_key(0, 0, r) for r in range(b)])
    assert not noise.masked[:, :10].any()
    assert torch.equal(noise.noisy == MASK_ID, noise.masked)
    assert torch.equal(noise.noisy[~noise.masked], ids[~noise.masked])
    assert ((noise.p >= 1e-3) & (noise.p <= 1)).all()
    # The per-row masked fraction of loss tokens tracks p (30 Bernoulli draws per row).
    frac = noise.masked[:, 10:].double().mean(1)
    assert (frac - noise.p).abs().mean() < 0.1
    assert torch.corrcoef(torch.stack([frac, noise.p]))[0, 1] > 0.9
    # Keyed: the same keys give the same noise, another key other noise.
    again = corrupt(ids, loss_mask, MASK_ID, [noise_key(0, 0, r) for r in range(b)])
    assert torch.equal(again.masked, noise.masked)
    other = corrupt(ids, loss_mask, MASK_ID, [noise_key(0, 1, r) for r in range(b)])
    assert not torch.equal(other.masked, noise.masked)


def test_loss_sums_match_full_logits_definition():
    net = random_model(4)
    length, block = 12, 4
    ids = torch.randint(6, 64, (3, length))
    loss_mask = torch.ones_like(ids, dtype=torch.bool)
    loss_mask[0, :5] = False
    noise = corrupt(ids, loss_mask, MASK_ID, [noise_key(7, 0, r) for r in range(3)])
    sums = JointObjective(net, block)(ids, loss_mask, noise)

    diff, causal = dual_stream_logits(net, noise.noisy, ids, block)
    ar_sum = diff_sum = 0.0
    ar_n = diff_n = 0
    for b in range(3):
        for i in range(length):
            if noise.masked[b, i]:  # diffusion: logit i predicts token i, weighted by 1/p
                diff_sum += F.cross_entropy(diff[b, i], ids[b, i]).item() / noise.p[b].item()
                diff_n += 1
            if i + 1 < length and loss_mask[b, i + 1]:  # AR: logit i predicts token i + 1
                ar_sum += F.cross_entropy(causal[b, i], ids[b, i + 1]).item()
                ar_n += 1
    assert sums.diff_count.item() == diff_n > 0
    assert sums.ar_count.item() == ar_n == 3 * 11 - 4
    assert sums.diff_sum.item() == pytest.approx(diff_sum, rel=1e-9)
    assert sums.ar_sum.item() == pytest.approx(ar_sum, rel=1e-9)
    loss = global_loss(sums, 0.3, ar_n, diff_n)
    assert loss.item() == pytest.approx(0.3 * diff_sum / diff_n + ar_sum / ar_n, rel=1e-9)
    assert losses(sums.detach(), 0.3)["loss"] == pytest.approx(loss.item(), rel=1e-9)


def test_micro_batch_sums_add_up_to_the_batch():
    """Global averaging: sums over micro-batches equal the sums of the whole batch."""
    net = random_model(5)
    ids = torch.randint(6, 64, (4, 8))
    lm = torch.ones_like(ids, dtype=torch.bool)
    keys = [noise_key(1, 2, r) for r in range(4)]
    obj = JointObjective(net, 4)
    whole = obj(ids, lm, corrupt(ids, lm, MASK_ID, keys))
    parts = obj(ids[:1], lm[:1], corrupt(ids[:1], lm[:1], MASK_ID, keys[:1])) + \
        obj(ids[1:], lm[1:], corrupt(ids[1:], lm[1:], MASK_ID, keys[1:]))
    torch.testing.assert_close(parts.as_tensor(), whole.as_tensor(), rtol=1e-10, atol=1e-10)
    assert torch.equal(LossSums.from_tensor(whole.as_tensor()).as_tensor(), whole.as_tensor())


def test_overfitting_one_batch_lowers_both_losses():
    net = random_model(6, dtype=torch.float32, scale=1.0).train()
    ids = torch.randint(6, 64, (4, 16))
    lm = torch.ones_like(ids, dtype=torch.bool)
    obj = JointObjective(net, 4)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-2)
    history = []
    for step in range(25):
        noise = corrupt(ids, lm, MASK_ID, [noise_key(0, step, r) for r in range(4)])
        sums = obj(ids, lm, noise)
        loss = global_loss(sums, 0.3, float(sums.ar_count), float(sums.diff_count))
        opt.zero_grad()
        loss.backward()
        opt.step()
        history.append(losses(sums.detach(), 0.3))
    first, last = history[0], history[-1]
    assert last["ar_loss"] < 0.5 * first["ar_loss"]
    assert last["diff_ce"] < 0.7 * first["diff_ce"]
