"""The causal KV cache shared by every decoding mode.

Invariant: the first `length` slots hold causal K/V of committed tokens, nothing else. A forward pass always
writes the K/V of its tokens into the scratch slots right after `length` (so attention reads one contiguous
buffer, no concatenation); whether those slots become part of the cache is the caller's choice:

- read-only pass (drafts, denoising steps): `length` is left alone, the scratch is overwritten next time;
- append pass (prefill, verify, post-block refresh): `commit(n)` after the forward;
- quadratic self-speculation keeps only some of the scratch slots: `commit_slots(offsets)`;
- rejected drafts: `crop(new_length)`.

Storage is preallocated and grows by doubling, so a decode loop does no per-token allocation; on CUDA the
buffers can be sized once up front (`reserve`) for static shapes.
"""

from __future__ import annotations

import torch


class KVCache:
    def __init__(
        self,
        num_layers: int,
        batch_size: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device | str,
        capacity: int = 256,
    ) -> None:
        shape = (num_layers, batch_size, num_kv_heads, capacity, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.length = 0

    @property
    def capacity(self) -> int:
        return self.k.shape[3]

    @property
    def batch_size(self) -> int:
        return self.k.shape[1]

    def reserve(self, total: int) -> None:
        """Make room for `total` slots (committed plus scratch)."""
        if total <= self.capacity:
            return
        new_cap = max(total, 2 * self.capacity)
        grow = new_cap - self.capacity
        pad = (0, 0, 0, grow)
        self.k = torch.nn.functional.pad(self.k, pad)
        self.v = torch.nn.functional.pad(self.v, pad)

    def write_scratch(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store a pass's K/V ([B, Hkv, T, D]) after the committed prefix; return the K/V to attend over."""
        end = self.length + k.shape[2]
        self.k[layer, :, :, self.length : end] = k
        self.v[layer, :, :, self.length : end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]

    def commit(self, n: int) -> None:
        """Keep the first `n` scratch slots of the last pass as committed K/V."""
        self.length += n

    def commit_slots(self, offsets: torch.Tensor | list[int]) -> None:
        """Keep the scratch slots at `offsets` (relative to `length`, increasing) as the next committed slots."""
        idx = torch.as_tensor(offsets, device=self.k.device, dtype=torch.long) + self.length
        n = idx.numel()
        self.k[:, :, :, self.length : self.length + n] = self.k[:, :, :, idx].clone()
        self.v[:, :, :, self.length : self.length + n] = self.v[:, :, :, idx].clone()
        self.length += n

    def crop(self, length: int) -> None:
        if not 0 <= length <= self.length:
            raise ValueError(f"cannot crop a cache of length {self.length} to {length}")
        self.length = length
