"""Training the linear self-speculation drafter: a LoRA adapter on every `o_proj`, the base model frozen
(spec 3.3, paper section 3.3 and appendix B).

One training block, exactly as `trimode.decode.linear_spec` drafts and verifies at inference:
- context: a window of real tokens ending at a random cut point (teacher forcing); its causal K/V are computed
  once with the adapter off, as the prefill / verify passes write them at inference;
- `next_token` = the verifier's own argmax after the context;
- draft: one bidirectional pass over `[next_token, MASK x (B-1)]` on that read-only prefix, adapter ON: the
  drafter logits q; the drafted tokens are sampled at T=1 in `sample_fraction` of the slots, greedy elsewhere;
- verify: one causal pass over the drafted block, adapter OFF, no gradient: the verifier logits p (the target);
- active positions: the accepted prefix plus the first rejected draft (every position when none is rejected);
- loss per position, on the union of the top-K tokens of p and of q, renormalised, at temperature tau:
  `lambda KL(p~ || q~) + (1 - lambda) * TV(p~, q~)`, `lambda = exp(-0.5 * stopgrad(alpha))`,
  `alpha = sum min(p~, q~)` (the expected acceptance), plus the cross-entropy of q (tau = 1, renormalised on the
  union) to the verifier's argmax (skipped where that argmax is outside the union); the mean over the active
  positions of a block, then over the blocks of a batch.
The adapter is saved in the PEFT layout (`save_lora`) that `load_lora` / `trimode.load` read.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path

import torch
import yaml

from trimode.model.cache import KVCache
from trimode.model.loading import LORA_DIR, save_lora
from trimode.model.transformer import NLDTransformer

NEG = -1e9  # logit for tokens outside the top-K union: exp() is 0 but differences stay finite (no NaN grads)


@dataclass
class DrafterConfig:
    rank: int = 16
    alpha: float = 64.0  # LoRA scale = alpha / rank
    block_length: int | None = None  # default: the model's block_size
    steps: int = 300
    batch_size: int = 16
    lr: float = 1e-3
    min_lr: float = 1e-4  # reached by a linear decay at the last step
    warmup_steps: int = 20
    grad_clip: float = 1.0
    top_k: int = 200  # per side of the union (capped at the vocabulary size)
    tau: float = 3.0
    sample_fraction: float = 0.9  # drafted slots sampled at T=1 (the rest greedy)
    context: list[int] = field(default_factory=lambda: [16, 192])  # [min, max] context length in tokens
    eval_contexts: int = 128  # held-out contexts for the before / after acceptance
    seed: int = 0
    log_every: int = 10
    data: dict = field(default_factory=dict)  # {sources: [...]} for trimode.train.corpus.load_corpus

    def __post_init__(self) -> None:
        if self.rank < 1 or self.alpha <= 0:
            raise ValueError("rank must be >= 1 and alpha > 0")
        if self.block_length is not None and self.block_length < 2:
            raise ValueError("block_length must be >= 2")
        if self.steps < 1 or self.batch_size < 1 or self.lr <= 0 or self.top_k < 1 or self.tau <= 0:
            raise ValueError("steps, batch_size, top_k must be >= 1 and lr, tau > 0")
        if not 0 <= self.sample_fraction <= 1:
            raise ValueError("sample_fraction must be in [0, 1]")
        if len(self.context) != 2 or not 1 <= self.context[0] <= self.context[1]:
            raise ValueError(f"context must be [min, max] with 1 <= min <= max, got {self.context}")

    @classmethod
    def load(cls, path: str | Path) -> DrafterConfig:
        """Read a YAML drafter recipe; unknown keys are errors naming the key and the file."""
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"drafter recipe {path} does not exist")
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ValueError(f"{path}: not valid YAML: {e}") from None
        if not isinstance(raw, dict):
            raise ValueError(f"{path}: a drafter recipe is a mapping of keys (rank, alpha, steps, ...)")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise ValueError(f"{path}: unknown key(s) {', '.join(unknown)} (known: {', '.join(sorted(known))})")
        try:
            return cls(**raw)
        except (TypeError, ValueError) as e:
            raise ValueError(f"{path}: {e}") from None


class ReadOnlyPrefix:
    """The committed K/V of a cache, attended over without being written: a pass's own K/V are concatenated,
    not stored in place, so autograd can differentiate through the pass (the reference's `use_cache=False`).

    Stands in for `KVCache` in `NLDTransformer.forward` (it uses `length`, `reserve` and `write_scratch`).
    """

    def __init__(self, cache: KVCache) -> None:
        self.length = cache.length
        self.k = cache.k[:, :, :, : cache.length].clone()
        self.v = cache.v[:, :, :, : cache.length].clone()

    def reserve(self, total: int) -> None:
        pass

    def write_scratch(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.cat([self.k[layer], k], dim=2), torch.cat([self.v[layer], v], dim=2)


def attach_adapter(net: NLDTransformer, rank: int, alpha: float, seed: int = 0) -> list[torch.nn.Parameter]:
    """Freeze the base model and give every `o_proj` a trainable LoRA pair: A kaiming-normal, B zeros (so the
    drafter starts as the base model). Returns the adapter parameters."""
    for p in net.parameters():
        p.requires_grad_(False)
    g = torch.Generator().manual_seed(seed)
    params = []
    for layer in net.encoder.layers:
        o = layer.self_attn.o_proj
        out_features, in_features = o.weight.shape
        a = torch.randn(rank, in_features, generator=g, dtype=torch.float32) * math.sqrt(2.0 / in_features)
        b = torch.zeros(out_features, rank, dtype=torch.float32)
        o.set_adapter(a.requires_grad_(), b.requires_grad_(), alpha / rank)
        params += [o.lora_A, o.lora_B]
    return params


def lk_hybrid_loss(target_logits: torch.Tensor, draft_logits: torch.Tensor, top_k: int = 200, tau: float = 3.0
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per position ([..., V] logits -> [...]): the LK-hybrid loss, the CE to the target argmax, and alpha.

    `target_logits` (verifier) carry no gradient; `draft_logits` do.
    """
    p_logits, q_logits = target_logits.detach().float(), draft_logits.float()
    k = min(top_k, p_logits.shape[-1])
    union = torch.zeros_like(p_logits, dtype=torch.bool)
    union.scatter_(-1, p_logits.topk(k, dim=-1).indices, True)
    union.scatter_(-1, q_logits.detach().topk(k, dim=-1).indices, True)

    log_p = (p_logits / tau).masked_fill(~union, NEG).log_softmax(-1)
    log_q = (q_logits / tau).masked_fill(~union, NEG).log_softmax(-1)
    p, q = log_p.exp(), log_q.exp()
    kl = (p * (log_p - log_q)).sum(-1)
    tv = 0.5 * (p - q).abs().sum(-1)
    alpha = torch.minimum(p, q).sum(-1)
    lam = torch.exp(-0.5 * alpha.detach())
    lk = lam * kl + (1 - lam) * tv

    argmax = p_logits.argmax(-1, keepdim=True)
    in_union = union.gather(-1, argmax).squeeze(-1)
    log_q1 = q_logits.masked_fill(~union, NEG).log_softmax(-1)
    ce = -log_q1.gather(-1, argmax).squeeze(-1) * in_union
    return lk, ce, alpha


@dataclass
class BlockResult:
    loss: torch.Tensor  # scalar, differentiable w.r.t. the adapter
    lk: float
    ce: float
    accepted: float  # mean accepted drafts per block (0 .. B-1)
    alpha: float  # mean expected acceptance over the active positions


def drafter_loss(net: NLDTransformer, contexts: torch.Tensor, block_length: int, top_k: int = 200,
                 tau: float = 3.0, sample_fraction: float = 0.9, generator: torch.Generator | None = None
                 ) -> BlockResult:
    """The drafter loss of one block after each context row (`contexts` [N, L] token ids)."""
    n, length = contexts.shape
    mask_id = net.config.mask_token_id
    with torch.no_grad():
        cache = net.new_cache(n, length + block_length)
        logits = net(contexts, mask="causal", cache=cache)
        cache.commit(length)
        next_token = logits[:, -1].argmax(-1)
    block = torch.full((n, block_length), mask_id, dtype=torch.long, device=contexts.device)
    block[:, 0] = next_token
    draft_logits = net(block, mask="bidirectional", cache=ReadOnlyPrefix(cache), lora=True)

    with torch.no_grad():
        probs = draft_logits.detach().float().softmax(-1)
        # Drawn on the CPU so that one CPU generator makes runs reproducible on any device.
        sampled = torch.multinomial(probs.flatten(0, 1).cpu(), 1, generator=generator).view(n, block_length)
        use_sample = torch.rand(n, block_length, generator=generator) < sample_fraction
        drafts = torch.where(use_sample, sampled, probs.argmax(-1).cpu()).to(contexts.device)
        drafts[:, 0] = next_token
        verify_logits = net(drafts, mask="causal", cache=cache)  # scratch only: nothing is committed

    target = verify_logits[:, :-1]  # the causal logit at block slot i predicts slot i + 1
    draft = draft_logits[:, 1:]  # the diffusion logit at slot i predicts slot i
    matches = target.argmax(-1) == drafts[:, 1:]
    accepted = matches.long().cumprod(-1).sum(-1)  # [N]
    active = torch.arange(block_length - 1, device=contexts.device)[None, :] <= accepted[:, None]
    lk, ce, alpha = lk_hybrid_loss(target, draft, top_k, tau)
    weights = active.float() / active.sum(-1, keepdim=True)
    loss = ((lk + ce) * weights).sum(-1).mean()
    with torch.no_grad():
        return BlockResult(loss, float((lk * weights).sum(-1).mean()), float((ce * weights).sum(-1).mean()),
                           float(accepted.float().mean()), float((alpha * weights).sum(-1).mean()))


@torch.no_grad()
def greedy_acceptance(net: NLDTransformer, contexts: torch.Tensor, block_length: int, use_drafter: bool) -> float:
    """Mean tokens emitted per linear-spec cycle (accepted drafts + 1) with greedy one-pass drafts, as
    `linear_spec_decode(threshold=0)` would emit after each context."""
    n, length = contexts.shape
    cache = net.new_cache(n, length + block_length)
    logits = net(contexts, mask="causal", cache=cache)
    cache.commit(length)
    block = torch.full((n, block_length), net.config.mask_token_id, dtype=torch.long, device=contexts.device)
    block[:, 0] = logits[:, -1].argmax(-1)
    drafts = net(block, mask="bidirectional", cache=cache, lora=use_drafter).argmax(-1)
    drafts[:, 0] = block[:, 0]
    ar = net(drafts, mask="causal", cache=cache).argmax(-1)
    accepted = (ar[:, :-1] == drafts[:, 1:]).long().cumprod(-1).sum(-1)
    return float((accepted + 1).float().mean())


def token_stream(examples: list[tuple[list[int], list[bool]]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokenised documents (ids, loss mask) laid end to end: (ids [T], cut points [C]).

    A cut point c is a context end (exclusive) whose next token carries a loss (not an SFT prompt token).
    """
    ids = [t for doc_ids, _ in examples for t in doc_ids]
    mask = [m for _, doc_mask in examples for m in doc_mask]
    ids_t = torch.tensor(ids, dtype=torch.long)
    cuts = torch.nonzero(torch.tensor(mask, dtype=torch.bool)).squeeze(-1)
    return ids_t, cuts


def sample_contexts(ids: torch.Tensor, cuts: torch.Tensor, n: int, length: int, generator: torch.Generator
                    ) -> torch.Tensor:
    """`n` windows of `length` tokens, each ending just before a random cut point."""
    usable = cuts[cuts >= length]
    if usable.numel() == 0:
        raise ValueError(f"no cut point has {length} tokens of context before it: the data is too short")
    ends = usable[torch.randint(0, usable.numel(), (n,), generator=generator)]
    offsets = torch.arange(-length, 0)
    return ids[ends[:, None] + offsets[None, :]]


def train_drafter(net: NLDTransformer, ids: torch.Tensor, cuts: torch.Tensor, cfg: DrafterConfig,
                  log: Callable[[dict], None] | None = None) -> list[dict]:
    """Attach a fresh adapter to `net` and train it on contexts drawn from the token stream `ids` at `cuts`.

    Returns the logged records (one per `log_every` steps and the last): step, loss, lk, ce, accepted, alpha, lr.
    """
    block_length = cfg.block_length or net.config.block_size
    params = attach_adapter(net, cfg.rank, cfg.alpha, cfg.seed)
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(cfg.seed)
    lo, hi = cfg.context
    records = []
    window: list[BlockResult] = []
    tick = time.perf_counter()
    net.eval()  # no dropout anywhere; eval() only documents that the base model is not being trained
    for step in range(cfg.steps):
        lr = _lr(cfg, step)
        for group in optimizer.param_groups:
            group["lr"] = lr
        length = int(torch.randint(lo, hi + 1, (1,), generator=g))
        contexts = sample_contexts(ids, cuts, cfg.batch_size, length, g).to(net.device)
        result = drafter_loss(net, contexts, block_length, cfg.top_k, cfg.tau, cfg.sample_fraction, g)
        optimizer.zero_grad(set_to_none=True)
        result.loss.backward()
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        optimizer.step()
        window.append(result)
        if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps:
            k = len(window)
            record = {"step": step + 1, "loss": sum(float(r.loss.detach()) for r in window) / k,
                      "lk": sum(r.lk for r in window) / k, "ce": sum(r.ce for r in window) / k,
                      "accepted": sum(r.accepted for r in window) / k, "alpha": sum(r.alpha for r in window) / k,
                      "lr": lr, "seconds": time.perf_counter() - tick}
            records.append(record)
            if log is not None:
                log(record)
            window = []
    for p in params:
        p.requires_grad_(False)
    return records


def _lr(cfg: DrafterConfig, step: int) -> float:
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    span = max(cfg.steps - cfg.warmup_steps - 1, 1)
    return cfg.lr + (cfg.min_lr - cfg.lr) * (step - cfg.warmup_steps) / span


def save_drafter(net: NLDTransformer, model_dir: str | Path, cfg: DrafterConfig, out: str | Path | None = None
                 ) -> Path:
    """Write the adapter to `out` (default: `model_dir/linear_spec_lora`)."""
    target = Path(out) if out is not None else Path(model_dir) / LORA_DIR
    save_lora(net, target, cfg.rank, cfg.alpha)
    return target
