"""Training the learned unmasking sampler (spec 2.5; the network is trimode/model/sampler.py).

1. Trajectories: the model decodes train-split task items with block diffusion (seed, causal context, as it
   serves) under a collection policy, through the real step machine (`decode.diffusion.diffusion` with a rule):
   - "confidence": one token per pass, the most confident masked slot;
   - "hybrid": every masked slot whose top-1 equals the ground truth (the item's completion and EOS) first;
     when none does, the most confident slot.
2. Labels, exactly as the paper defines them: at each pass, for each masked slot, 1[the slot's current top-1 ==
   the token finally committed at that slot under the same policy]. Slots left undecided (a block cut at EOS)
   carry no label.
3. Per-slot features (`BlockSampler.features`), a tiny bidirectional transformer over the block, per-slot
   linear + sigmoid, BCE over the labelled slots, early stop on the AUC of held-out trajectories (items of the
   train split set aside, never the task's held-out split).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, fields
from pathlib import Path

import torch

from trimode.decode.diffusion import diffusion
from trimode.decode.driver import drive, run
from trimode.decode.sampling import SamplingParams
from trimode.decode.stopping import StopRule
from trimode.decode.transfer import commit_by_threshold
from trimode.model.sampler import BlockSampler, SamplerConfig
from trimode.tasks import load_tasks, plain_tasks, prompt_text


@dataclass
class SamplerRecipe:
    tasks: tuple[str, ...] = ()  # empty: every task
    items_per_task: int = 60
    policies: tuple[str, ...] = ("confidence", "hybrid")
    holdout_fraction: float = 0.15
    hidden: int = 64
    layers: int = 2
    heads: int = 4
    ffn: int = 128
    embed_dim: int = 8
    top_k: int = 5
    embed_top: int = 3
    epochs: int = 30
    batch: int = 64
    lr: float = 2e-3
    patience: int = 5
    seed: int = 0

    @classmethod
    def load(cls, path: Path) -> SamplerRecipe:
        import yaml

        raw = yaml.safe_load(path.read_text()) or {}
        known = {f.name: f for f in fields(cls)}
        unknown = sorted(set(raw) - set(known))
        if unknown:
            raise ValueError(f"{path}: unknown sampler recipe key(s) {', '.join(unknown)}")
        values = {k: tuple(v) if isinstance(v, list) else v for k, v in raw.items()}
        recipe = cls(**values)
        bad = set(recipe.policies) - {"confidence", "hybrid"}
        if bad or not recipe.policies:
            raise ValueError(f"{path}: policies must be confidence and/or hybrid, got {list(recipe.policies)}")
        return recipe


class Recorder:
    """A diffusion rule that commits by its policy and records, per pass, the features of the block, the masked
    slots and their top-1; each block's final tokens label its passes when the block is done."""

    def __init__(self, sampler: BlockSampler, policy: str, truth: list[int], block_length: int) -> None:
        self.sampler, self.policy, self.truth, self.length = sampler, policy, truth, block_length
        self.block_index = -1
        self.passes: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        self.final = None
        self.examples: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []  # (feats, labelled, label)
        self.remaining = None

    def __call__(self, conf, masked, logits, proposal):
        if self.remaining is None or (masked & ~self.remaining).any():  # a new block
            self.finish()
            self.block_index += 1
            self.final = torch.full_like(proposal[0], -1)
        self.passes.append((self.sampler.features(logits, masked)[0], masked[0].clone(), proposal[0].clone()))
        transfer = commit_by_threshold(conf, masked, 2.0)  # the single most confident slot
        if self.policy == "hybrid":
            start = self.block_index * self.length
            truth = self.truth[start : start + self.length]
            truth = torch.tensor(truth + [-1] * (self.length - len(truth)), device=proposal.device)
            agree = masked[0] & (proposal[0] == truth)
            if agree.any():
                transfer = agree[None]
        self.final[transfer[0]] = proposal[0][transfer[0]]
        self.remaining = masked & ~transfer
        return transfer

    def finish(self) -> None:
        for feats, masked, top1 in self.passes:
            labelled = masked & (self.final >= 0)
            self.examples.append((feats, labelled, (top1 == self.final).float()))
        self.passes = []


@torch.no_grad()
def collect(tm, items, sampler: BlockSampler, policy: str) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Per-pass examples (features [L, F], labelled slots [L], labels [L]) of decoding `items` under `policy`."""
    length = tm.config.block_size
    examples = []
    for item in items:
        ids = tm.encode(prompt_text(item, tm.tokenizer))
        truth = tm.encode(item.completion) + [tm.config.eos_token_id]
        recorder = Recorder(sampler, policy, truth, length)
        budget = getattr(item, "max_new_tokens", 32)
        machine = diffusion(torch.tensor([ids]), StopRule(budget, tm.eos_ids()), SamplingParams(),
                            tm.config.mask_token_id, length, None, True, rule=recorder)
        drive(run(tm.net, machine, len(ids) + budget + length))
        recorder.finish()
        examples += recorder.examples
    return examples


def token_projection(embeddings: torch.Tensor, dim: int) -> torch.Tensor:
    """[V, dim]: the token embeddings on their first `dim` principal components, scaled to unit variance."""
    x = embeddings.float() - embeddings.float().mean(0)
    _, _, v = torch.linalg.svd(x, full_matrices=False)
    proj = x @ v[:dim].T
    return proj / proj.std(0).clamp_min(1e-6)


def auc(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """Area under the ROC curve (the rank statistic; ties share their mean rank)."""
    pos = int(labels.sum())
    neg = labels.numel() - pos
    if pos == 0 or neg == 0:
        return 0.5
    order = scores.argsort()
    ranks = torch.empty_like(scores)
    ranks[order] = torch.arange(1, scores.numel() + 1, dtype=scores.dtype)
    for value in scores.unique()[scores.unique(return_counts=True)[1] > 1]:  # ties: mean rank
        tie = scores == value
        ranks[tie] = ranks[tie].mean()
    return float((ranks[labels > 0.5].sum() - pos * (pos + 1) / 2) / (pos * neg))


def stack(examples):
    return tuple(torch.stack([e[i] for e in examples]) for i in range(3))


def train(sampler: BlockSampler, train_set, held_out, recipe: SamplerRecipe, log=print) -> dict:
    """BCE over labelled slots; keeps the weights of the epoch with the best held-out AUC (early stop)."""
    feats, labelled, labels = stack(train_set)
    hf, hl, hy = stack(held_out)
    params = [p for n, p in sampler.named_parameters()]
    opt = torch.optim.AdamW(params, lr=recipe.lr, weight_decay=0.01)
    gen = torch.Generator().manual_seed(recipe.seed)
    best, best_state, stale, history = -1.0, None, 0, []
    for epoch in range(recipe.epochs):
        sampler.train()
        for idx in torch.randperm(len(feats), generator=gen).split(recipe.batch):
            logit = sampler(feats[idx])
            mask = labelled[idx]
            loss = torch.nn.functional.binary_cross_entropy_with_logits(logit[mask], labels[idx][mask])
            opt.zero_grad()
            loss.backward()
            opt.step()
        sampler.eval()
        with torch.no_grad():
            score = torch.sigmoid(sampler(hf))[hl]
        value = auc(score, hy[hl])
        history.append({"epoch": epoch + 1, "loss": loss.item(), "heldout_auc": value})
        log(f"epoch {epoch + 1}: loss {loss.item():.4f} held-out AUC {value:.4f}")
        if value > best:
            best, stale = value, 0
            best_state = {k: v.clone() for k, v in sampler.state_dict().items()}
        else:
            stale += 1
            if stale >= recipe.patience:
                break
    sampler.load_state_dict(best_state)
    sampler.eval()
    return {"best_heldout_auc": best, "epochs": history, "train_passes": len(feats), "heldout_passes": len(hf),
            "positive_rate": float(labels[labelled].mean())}


def train_sampler(tm, recipe: SamplerRecipe, log=print) -> tuple[BlockSampler, dict]:
    """Collect trajectories on the train split, train, return the sampler and its training summary."""

    torch.manual_seed(recipe.seed)
    cfg = SamplerConfig(tm.config.vocab_size, recipe.top_k, recipe.embed_dim, recipe.embed_top, recipe.hidden,
                        recipe.layers, recipe.heads, recipe.ffn)
    sampler = BlockSampler(cfg)
    with torch.no_grad():
        sampler.token_proj.copy_(token_projection(tm.net.encoder.embed_tokens.weight.cpu(), cfg.embed_dim))
    items = [it for name in (recipe.tasks or sorted(plain_tasks()))
             for it in load_tasks(name, recipe.items_per_task, recipe.seed, split="train")]
    random.Random(recipe.seed).shuffle(items)
    cut = max(1, int(len(items) * recipe.holdout_fraction))
    train_set, held_out = [], []
    for policy in recipe.policies:
        held_out += collect(tm, items[:cut], sampler, policy)
        train_set += collect(tm, items[cut:], sampler, policy)
        log(f"collected {policy}: {len(train_set)} train / {len(held_out)} held-out passes so far")
    summary = train(sampler, train_set, held_out, recipe, log)
    summary |= {"items": len(items), "heldout_items": cut, "policies": list(recipe.policies)}
    return sampler, summary
