"""The shared KV pool: one preallocated buffer of token slots, handed out in pages under a token budget.

Layout: `k`, `v` are [layers, slots, kv_heads, head_dim]; slot 0 is a zero "null" slot that padded key
positions of a batched forward point at, so stale, uninitialised or non-finite values never reach an attention
sum (a masked key still multiplies its value by a zero weight, and 0 * NaN is NaN). A request owns a list of
pages (`page_size` slots each) reserved at admission for its worst case, so a running request never runs out
of memory; admission waits instead.

`PagedCache` is one request's cache inside the pool, with the `KVCache` contract the step machines rely on
(`length`, `commit`, `commit_slots`; a forward writes scratch after `length`). `runner.RowsView` is what one
batched forward sees: many rows, each with its own cache length, written and read through per-row slot indices.
"""

from __future__ import annotations

import math
import threading

import torch

from trimode.model.config import NLDConfig


class KVBudgetError(RuntimeError):
    """A request needs more KV slots than the pool can ever give it."""


class KVPool:
    def __init__(self, config: NLDConfig, dtype: torch.dtype, device: torch.device, budget_tokens: int,
                 page_size: int = 16) -> None:
        self.page_size = page_size
        self.num_pages = max(1, budget_tokens // page_size)
        slots = 1 + self.num_pages * page_size  # + the null slot 0
        shape = (config.num_hidden_layers, slots, config.num_key_value_heads, config.head_dim)
        # Uninitialised (a large zero-fill costs seconds): a slot is always written before a mask lets it be read.
        self.k = torch.empty(shape, dtype=dtype, device=device)
        self.v = torch.empty(shape, dtype=dtype, device=device)
        self.k[:, 0] = 0
        self.v[:, 0] = 0
        self._free = list(range(self.num_pages - 1, -1, -1))  # pop() hands out low pages first
        self._lock = threading.Lock()

    @staticmethod
    def bytes_per_token(config: NLDConfig, dtype: torch.dtype) -> int:
        item = torch.empty((), dtype=dtype).element_size()
        return 2 * config.num_hidden_layers * config.num_key_value_heads * config.head_dim * item

    @property
    def capacity_tokens(self) -> int:
        return self.num_pages * self.page_size

    @property
    def free_pages(self) -> int:
        return len(self._free)

    def pages_for(self, tokens: int) -> int:
        return math.ceil(tokens / self.page_size)

    def allocate(self, tokens: int) -> list[int] | None:
        """Pages for `tokens` slots, or None when they are not free now."""
        n = self.pages_for(tokens)
        if n > self.num_pages:
            raise KVBudgetError(f"needs {n * self.page_size} KV slots; the pool holds {self.capacity_tokens}")
        with self._lock:
            if n > len(self._free):
                return None
            return [self._free.pop() for _ in range(n)]

    def release(self, pages: list[int]) -> None:
        with self._lock:
            self._free.extend(reversed(pages))

    def slot_index(self, pages: list[int]) -> torch.Tensor:
        """Slot of every token position of a page list: [len(pages) * page_size]."""
        p = torch.tensor(pages, dtype=torch.long)
        return (1 + p[:, None] * self.page_size + torch.arange(self.page_size)[None, :]).flatten().to(self.k.device)


class PagedCache:
    """One request's KV cache inside the pool (batch size 1); the `KVCache` contract the modes rely on."""

    def __init__(self, pool: KVPool, pages: list[int]) -> None:
        self.pool = pool
        self.pages = pages
        self.slots = pool.slot_index(pages)
        self.length = 0

    @property
    def capacity(self) -> int:
        return self.slots.numel()

    @property
    def batch_size(self) -> int:
        return 1

    def is_contiguous(self, tokens: int) -> bool:
        """Whether the first `tokens` slots are consecutive in the pool."""
        return tokens <= self.capacity and int(self.slots[tokens - 1]) - int(self.slots[0]) == tokens - 1

    def reserve(self, total: int) -> None:
        if total <= self.capacity:
            return
        more = self.pool.allocate(total - self.capacity)
        if more is None:
            raise KVBudgetError(f"the KV pool has no free page to grow a cache to {total} slots")
        self.pages += more
        self.slots = torch.cat([self.slots, self.pool.slot_index(more)])

    def free(self) -> None:
        self.pool.release(self.pages)
        self.pages = []
        self.slots = self.slots[:0]

    def commit(self, n: int) -> None:
        self.length += n

    def commit_slots(self, offsets: torch.Tensor | list[int]) -> None:
        src = self.slots[torch.as_tensor(offsets, dtype=torch.long, device=self.slots.device) + self.length]
        dst = self.slots[self.length : self.length + src.numel()]
        for pool in (self.pool.k, self.pool.v):
            pool.index_copy_(1, dst, pool.index_select(1, src))
        self.length += src.numel()

    def crop(self, length: int) -> None:
        if not 0 <= length <= self.length:
            raise ValueError(f"cannot crop a cache of length {self.length} to {length}")
        self.length = length
