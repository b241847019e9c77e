"""The fast path: a static KV cache and fixed-shape forward passes, replayed as CUDA graphs on a GPU.

`StaticModel(net, max_seq_len)` is a drop-in for `NLDTransformer` in every decoding mode (same call,
`new_cache`, `config`): the modes do not change, only what runs each pass.

- One preallocated KV buffer per batch size, `max_seq_len` slots, never reallocated (graphs hold its address).
  `new_cache()` hands out a `StaticKVCache` view over it with length 0, so one decode runs at a time per
  `StaticModel` and batch size (as gpt-fast's `setup_caches`).
- A pass attends over a fixed *window* of the buffer, the smallest power of two (at least `min_window`, at
  most `max_seq_len`) covering prefix + pass, with an explicit boolean mask that hides the slots past the
  pass. K/V are written with `index_copy_` at tensor positions and the Llama-4 query scale is always applied
  (it is exactly 1 below `original_max_position_embeddings`), so a pass has no data-dependent shape or host
  sync and can be captured.
- On CUDA, passes whose token count is in `graph_tokens` (default 1: AR steps, the block length: block steps
  and verifies, B(B+1): quadratic passes) are captured once per (batch, tokens, window, LoRA) and replayed;
  other shapes (the prefill) and every pass on CPU run the same static code eagerly.
Attention is `scaled_dot_product_attention` with the query heads of each K/V head stacked along the sequence
(GQA without repeating K/V), so on CUDA a fused kernel (memory-efficient / cuDNN) takes the boolean mask.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from trimode.model.cache import KVCache
from trimode.model.masks import MaskSpec, pass_pattern
from trimode.model.transformer import NLDTransformer, rotate_half


class StaticKVCache(KVCache):
    """A `KVCache` over a fixed buffer: same commit / crop / commit_slots, but it never grows."""

    def __init__(self, k: torch.Tensor, v: torch.Tensor) -> None:
        self.k, self.v, self.length = k, v, 0

    def reserve(self, total: int) -> None:
        if total > self.capacity:
            raise ValueError(
                f"this pass needs {total} cache slots but the static cache holds {self.capacity} "
                f"(raise max_seq_len)"
            )


class StaticModel:
    def __init__(
        self,
        net: NLDTransformer,
        max_seq_len: int = 4096,
        graph_tokens: tuple[int, ...] | None = None,
        min_window: int = 256,
        cuda_graphs: bool | None = None,
    ) -> None:
        self.net = net
        self.config = net.config
        self.max_seq_len = -(-max_seq_len // 16) * 16  # fused attention kernels want mask rows aligned to 16
        self.min_window = min(min_window, self.max_seq_len)
        b = self.config.block_size
        self.graph_tokens = set(graph_tokens if graph_tokens is not None else (1, b, b * (b + 1)))
        self.cuda_graphs = net.device.type == "cuda" if cuda_graphs is None else cuda_graphs
        if self.cuda_graphs and net.device.type != "cuda":
            raise ValueError("CUDA graphs need the model on a CUDA device")
        rp = self.config.rope_parameters
        self._beta = float(rp.get("llama_4_scaling_beta") or 0.0)
        self._orig = int(rp.get("original_max_position_embeddings") or 1)
        self._buffers: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self._graphs: dict[tuple, _Graph] = {}
        self._pool = None

    # What the decoding modes and the API read from a model.
    @property
    def device(self) -> torch.device:
        return self.net.device

    @property
    def dtype(self) -> torch.dtype:
        return self.net.dtype

    @property
    def encoder(self):
        return self.net.encoder

    @property
    def sampler(self):
        """The network's learned unmasking sampler (None without one): the decoders read it from here too."""
        return self.net.sampler

    @property
    def diffusion_head(self):
        return self.net.diffusion_head

    @property
    def num_graphs(self) -> int:
        return len(self._graphs)

    def new_cache(self, batch_size: int = 1, capacity: int = 0) -> StaticKVCache:
        if capacity > self.max_seq_len:
            raise ValueError(f"this decode needs {capacity} cache slots; the static cache holds {self.max_seq_len}")
        if batch_size not in self._buffers:
            c = self.config
            shape = (c.num_hidden_layers, batch_size, c.num_key_value_heads, self.max_seq_len, c.head_dim)
            self._buffers[batch_size] = (
                torch.zeros(shape, dtype=self.dtype, device=self.device),
                torch.zeros(shape, dtype=self.dtype, device=self.device),
            )
        return StaticKVCache(*self._buffers[batch_size])

    def window(self, total: int) -> int:
        """Cache slots a pass ending at slot `total` attends over (a few fixed sizes, so few graphs)."""
        w = self.min_window
        while w < total:
            w *= 2
        return min(w, self.max_seq_len)

    @torch.no_grad()
    def __call__(
        self,
        input_ids: torch.Tensor,
        *,
        mask: MaskSpec = "causal",
        cache: KVCache | None = None,
        positions: torch.Tensor | None = None,
        lora: bool = False,
        return_hidden: bool = False,
        logits_at: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits [B, T, V], as `NLDTransformer.forward`; passes over a `StaticKVCache` take the static path
        (which computes every position's logits, for fixed graph shapes, then keeps `logits_at`)."""
        if not isinstance(cache, StaticKVCache) or return_hidden:
            return self.net(input_ids, mask=mask, cache=cache, positions=positions, lora=lora,
                            return_hidden=return_hidden, logits_at=logits_at)
        logits = self._static(input_ids, mask, cache, positions, lora)
        if logits_at is None:
            return logits
        return logits.flatten(0, 1).index_select(0, logits_at.to(logits.device))

    def _static(self, input_ids, mask, cache, positions, lora) -> torch.Tensor:
        b, t = input_ids.shape
        past = cache.length
        cache.reserve(past + t)
        w = self.window(past + t)
        dev = self.device
        if positions is None:
            positions = torch.arange(past, past + t, device=dev).expand(b, t)
        elif positions.dim() == 1:
            positions = positions.expand(b, t)
        slots = torch.arange(past, past + t, device=dev)
        attn = self._window_mask(mask, b, t, past, w)
        args = (input_ids.to(dev), positions.to(dev), slots, attn)
        if not self.cuda_graphs or t not in self.graph_tokens:
            return self._forward(*args, cache.k, cache.v, w, lora)
        key = (b, t, w, lora)
        graph = self._graphs.get(key)
        if graph is None:
            if self._pool is None:
                self._pool = torch.cuda.graph_pool_handle()
            graph = _Graph(lambda *a: self._forward(*a, cache.k, cache.v, w, lora), args, self._pool)
            self._graphs[key] = graph
        return graph.replay(args).clone()  # the graph's output buffer is reused by the next replay

    def _window_mask(self, mask: MaskSpec, b: int, t: int, past: int, w: int) -> torch.Tensor:
        """Boolean [B, 1, G*T, W] (G query heads per K/V head): the pass's mask over the first past + T slots,
        False past them, repeated for each query head of a group (see the attention in `_forward`)."""
        dev = self.device
        cols = torch.arange(w, device=dev)
        if isinstance(mask, torch.Tensor):
            m = mask.to(dev)
            full = torch.zeros(*m.shape[:-1], w, dtype=torch.bool, device=dev)
            full[..., : past + t] = m
            m = full.expand(b, 1, t, w) if full.dim() == 2 else full
        elif mask == "causal":
            m = cols[None, :] <= past + torch.arange(t, device=dev)[:, None]
        elif mask == "bidirectional":
            m = (cols < past + t)[None, :].expand(t, w)
        else:  # a structured kind (quadratic passes): the prefix, then the pass's own pattern
            m = (cols < past)[None, :].expand(t, w).clone()
            m[:, past : past + t] = pass_pattern(mask, t, dev)
        groups = self.config.num_attention_heads // self.config.num_key_value_heads
        return m.expand(b, 1, t, w).repeat(1, 1, groups, 1)

    def _forward(self, input_ids, positions, slots, attn, k_cache, v_cache, w: int, lora: bool) -> torch.Tensor:
        """One pass with static shapes: writes this pass's K/V at `slots`, attends over the first `w` slots."""
        net, cfg = self.net, self.config
        b, t = input_ids.shape
        n_heads, n_kv, hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        groups = n_heads // n_kv
        x = net.encoder.embed_tokens(input_ids)
        freqs = positions[..., None].float() * net.inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)
        cos = (emb.cos() * net.rope_scale).to(x.dtype)[:, None]
        sin = (emb.sin() * net.rope_scale).to(x.dtype)[:, None]
        q_scale = (1 + self._beta * torch.log(1 + torch.floor(positions.float() / self._orig))).to(x.dtype)
        q_scale = q_scale[:, None, :, None]
        for i, layer in enumerate(net.encoder.layers):
            a = layer.self_attn
            h = layer.input_layernorm(x)
            q = a.q_proj(h).view(b, t, n_heads, hd).transpose(1, 2)
            k = a.k_proj(h).view(b, t, n_kv, hd).transpose(1, 2)
            v = a.v_proj(h).view(b, t, n_kv, hd).transpose(1, 2)
            q = (q * cos + rotate_half(q) * sin) * q_scale
            k = k * cos + rotate_half(k) * sin
            k_cache[i].index_copy_(2, slots, k)
            v_cache[i].index_copy_(2, slots, v)
            # GQA as plain attention: the query heads sharing a K/V head are stacked along the sequence, so any
            # fused SDPA kernel applies and K/V are read once per K/V head, never repeated.
            out = F.scaled_dot_product_attention(
                q.reshape(b, n_kv, groups * t, hd), k_cache[i, :, :, :w], v_cache[i, :, :, :w], attn_mask=attn
            )
            x = x + a.o_proj(out.reshape(b, n_heads, t, hd).transpose(1, 2).reshape(b, t, -1), lora)
            x = x + layer.mlp(layer.post_attention_layernorm(x))
        return net.diffusion_head(net.encoder.norm(x))


class _Graph:
    """A captured pass: static input buffers, one CUDA graph, its output buffer."""

    def __init__(self, fn, args: tuple[torch.Tensor, ...], pool) -> None:
        self.inputs = tuple(a.clone() for a in args)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):  # warm-up: lets cuBLAS / SDPA pick and allocate their kernels before capture
                fn(*self.inputs)
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, pool=pool):
            self.output = fn(*self.inputs)

    def replay(self, args: tuple[torch.Tensor, ...]) -> torch.Tensor:
        for buf, a in zip(self.inputs, args, strict=True):
            buf.copy_(a)
        self.graph.replay()
        return self.output
