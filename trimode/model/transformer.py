"""The NLD network: a dense Ministral-3 decoder with an untied `diffusion_head`.

Layer math (spec 1.2): h = x + o_proj(Attn(RMSNorm(x))); y = h + down(silu(gate(n)) * up(n)), n = RMSNorm(h).
RoPE is YaRN (rotate-half convention), then queries are scaled by 1 + beta * ln(1 + floor(pos / orig_max))
(Llama-4 scaling, identity below `original_max_position_embeddings`).

The model knows nothing of decoding modes. One call = one forward pass over some tokens with
- an explicit mask (`"causal"`, `"bidirectional"` or a boolean tensor, see `masks.py`),
- an optional `KVCache` that is read (prefix) and written as scratch; the caller decides what to commit,
- `lora=True` to add the drafter adapter on `o_proj` for this pass only.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from trimode.model.cache import KVCache
from trimode.model.config import NLDConfig
from trimode.model.masks import MaskSpec, resolve


def yarn_inv_freq(cfg: NLDConfig) -> tuple[torch.Tensor, float]:
    """Inverse RoPE frequencies and the cos/sin scale (`attention_factor`), as HF computes them."""
    rp = cfg.rope_parameters
    base, dim = rp["rope_theta"], cfg.head_dim
    pos_freqs = base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    if rp["rope_type"] == "default":
        return 1.0 / pos_freqs, 1.0
    factor = rp.get("factor") or cfg.max_position_embeddings / rp["original_max_position_embeddings"]
    orig_max = rp["original_max_position_embeddings"]

    def get_mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attention_factor = rp.get("attention_factor")
    if attention_factor is None:
        mscale, mscale_all_dim = rp.get("mscale"), rp.get("mscale_all_dim")
        if mscale and mscale_all_dim:
            attention_factor = get_mscale(factor, mscale) / get_mscale(factor, mscale_all_dim)
        else:
            attention_factor = get_mscale(factor)
    beta_fast = rp.get("beta_fast") or 32
    beta_slow = rp.get("beta_slow") or 1

    def correction_dim(rotations: float) -> float:
        return (dim * math.log(orig_max / (rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if rp.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    extrapolation = 1 - ramp
    inv_freq = (1.0 / (factor * pos_freqs)) * (1 - extrapolation) + (1.0 / pos_freqs) * extrapolation
    return inv_freq, float(attention_factor)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


class LoRALinear(nn.Module):
    """A bias-free linear layer with an optional low-rank adapter, applied only when asked for."""

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.lora_A: nn.Parameter | None = None
        self.lora_B: nn.Parameter | None = None
        self.lora_scale = 0.0

    def set_adapter(self, a: torch.Tensor, b: torch.Tensor, scale: float) -> None:
        self.lora_A = nn.Parameter(a.to(self.weight), requires_grad=a.requires_grad)
        self.lora_B = nn.Parameter(b.to(self.weight), requires_grad=b.requires_grad)
        self.lora_scale = scale

    def forward(self, x: torch.Tensor, lora: bool | torch.Tensor = False) -> torch.Tensor:
        """`lora`: for the whole batch (bool), per row (bool tensor [B]) or per token ([B, T]): drafts and
        verifies of different requests share a pass."""
        y = F.linear(x, self.weight)
        if isinstance(lora, torch.Tensor) and not bool(lora.any()):
            return y
        if lora is not False:
            if self.lora_A is None:
                raise RuntimeError("a drafter pass asked for the LoRA adapter but none is loaded")
            delta = self.lora_scale * F.linear(F.linear(x, self.lora_A), self.lora_B)
            if isinstance(lora, torch.Tensor):
                delta = delta * (lora[:, None, None] if lora.dim() == 1 else lora[..., None]).to(delta.dtype)
            y = y + delta
        return y


class Attention(nn.Module):
    def __init__(self, cfg: NLDConfig) -> None:
        super().__init__()
        self.n_heads, self.n_kv, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, self.n_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.hidden_size, self.n_kv * self.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.hidden_size, self.n_kv * self.head_dim, bias=False)
        self.o_proj = LoRALinear(self.n_heads * self.head_dim, cfg.hidden_size)

    def forward(self, x, cos, sin, q_scale, mask: MaskSpec, cache: KVCache | None, layer: int, lora: bool):
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, t, self.n_kv, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, t, self.n_kv, self.head_dim).transpose(1, 2)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        if q_scale is not None:
            q = q * q_scale
        if hasattr(cache, "attend"):  # a packed forward of several row groups: the view runs their attention
            out = cache.attend(layer, q, k, v, self.n_kv != self.n_heads)
            return self.o_proj(out.transpose(1, 2).reshape(b, t, -1), lora)
        past = 0
        if cache is not None:
            past = cache.length
            k, v = cache.write_scratch(layer, k, v)
        attn_mask, is_causal = resolve(mask, t, past, x.device)
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, is_causal=is_causal, enable_gqa=self.n_kv != self.n_heads
        )
        return self.o_proj(out.transpose(1, 2).reshape(b, t, -1), lora)


class FeedForward(nn.Module):
    def __init__(self, cfg: NLDConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class TransformerBlock(nn.Module):
    def __init__(self, cfg: NLDConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = FeedForward(cfg)

    def forward(self, x, cos, sin, q_scale, mask, cache, layer, lora):
        h = x + self.self_attn(self.input_layernorm(x), cos, sin, q_scale, mask, cache, layer, lora)
        return h + self.mlp(self.post_attention_layernorm(h))


class Encoder(nn.Module):
    """Parameter container named like the checkpoint (`encoder.*`)."""

    def __init__(self, cfg: NLDConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(TransformerBlock(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class NLDTransformer(nn.Module):
    def __init__(self, cfg: NLDConfig) -> None:
        super().__init__()
        self.config = cfg
        self.encoder = Encoder(cfg)
        self.diffusion_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        inv_freq, self.rope_scale = yarn_inv_freq(cfg)
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        # The learned unmasking sampler (model/sampler.py), when the checkpoint has one: outside the module tree
        # (see loading.attach_sampler), so it never enters the network's state dict.
        object.__setattr__(self, "sampler", None)

    def _apply(self, fn, recurse=True):
        # Every .to()/.cuda()/.half()/to_empty() lands here. RoPE frequencies are derived from the config and
        # must stay float32 whatever the weights become: a bf16 inv_freq shifts bf16 logits visibly.
        super()._apply(fn, recurse)
        self.inv_freq = yarn_inv_freq(self.config)[0].to(self.diffusion_head.weight.device)
        return self

    @property
    def device(self) -> torch.device:
        return self.diffusion_head.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.diffusion_head.weight.dtype

    def new_cache(self, batch_size: int = 1, capacity: int = 256) -> KVCache:
        c = self.config
        return KVCache(
            c.num_hidden_layers, batch_size, c.num_key_value_heads, c.head_dim, self.dtype, self.device, capacity
        )

    def rope(self, positions: torch.Tensor, dtype: torch.dtype):
        """cos/sin [B, 1, T, D] and the Llama-4 query scale [B, 1, T, 1] (None when it is 1 everywhere)."""
        freqs = positions[..., None].float() * self.inv_freq.to(positions.device)
        emb = torch.cat((freqs, freqs), dim=-1)
        cos = (emb.cos() * self.rope_scale).to(dtype)[:, None]
        sin = (emb.sin() * self.rope_scale).to(dtype)[:, None]
        rp = self.config.rope_parameters
        beta, orig = rp.get("llama_4_scaling_beta"), rp.get("original_max_position_embeddings")
        q_scale = None
        if beta and orig and int(positions.max()) >= orig:
            q_scale = (1 + beta * torch.log(1 + torch.floor(positions.float() / orig))).to(dtype)[:, None, :, None]
        return cos, sin, q_scale

    def forward(
        self,
        input_ids: torch.Tensor,
        *,
        mask: MaskSpec = "causal",
        cache: KVCache | None = None,
        positions: torch.Tensor | None = None,
        lora: bool | torch.Tensor = False,
        return_hidden: bool = False,
        logits_at: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits [B, T, V] for `input_ids` [B, T].

        With a cache, tokens attend over [committed prefix | this pass] and their K/V are left in the cache's
        scratch slots; call `cache.commit(T)` to keep them. `positions` default to `cache.length + arange(T)`.
        `logits_at`: indices into the flattened [B * T] tokens; then only those rows go through the LM head and
        the result is [len(logits_at), V] (a prompt pass that needs one token's logits does not pay for T).
        """
        b, t = input_ids.shape
        past = cache.length if cache is not None else 0
        if cache is not None:
            cache.reserve(past + t)
        if positions is None:
            positions = torch.arange(past, past + t, device=input_ids.device).expand(b, t)
        elif positions.dim() == 1:
            positions = positions.expand(b, t)
        x = self.encoder.embed_tokens(input_ids)
        cos, sin, q_scale = self.rope(positions, x.dtype)
        for i, layer in enumerate(self.encoder.layers):
            x = layer(x, cos, sin, q_scale, mask, cache, i, lora)
        if logits_at is not None:
            x = x.reshape(b * t, -1).index_select(0, logits_at.to(x.device))
        x = self.encoder.norm(x)
        if return_hidden:
            return x
        return self.diffusion_head(x)
