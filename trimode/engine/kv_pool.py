"""The shared KV pool: one preallocated buffer of token slots, handed out in pages as requests grow.

Layout: `k`, `v` are [layers, slots, kv_heads, head_dim]; slot 0 is a zero "null" slot that padded key
positions of a batched forward point at, so stale, uninitialised or non-finite values never reach an attention
sum (a masked key still multiplies its value by a zero weight, and 0 * NaN is NaN).

A page's life: free -> allocated to one request as its cache grows (`allocate`) -> written by a pass, committed
-> (full, final, causal) published in the prefix cache (`trimode.engine.prefix_cache`), where other requests find
it and share it (`share`: a reference count) -> released by every request holding it (`release`): back to the
free list, or, when cached, idle in the cache until the pool evicts it for a new allocation (least recently used
first). Nothing is reserved for a request's worst case: when the pool runs dry the scheduler preempts a request.

`PagedCache` is one request's cache inside the pool, with the `KVCache` contract the step machines rely on
(`length`, `commit`, `commit_slots`; a forward writes scratch after `length`, never into a committed slot, so a
shared page is never written). `runner.RowsView` is what one batched forward sees: many rows, each with its own
cache length, written and read through per-row slot indices.
"""

from __future__ import annotations

import math
import threading

import torch

from trimode.engine.prefix_cache import PrefixCache, page_key
from trimode.model.config import NLDConfig


class KVBudgetError(RuntimeError):
    """A request needs more KV slots than the pool can ever give it."""


class KVPool:
    def __init__(self, config: NLDConfig, dtype: torch.dtype, device: torch.device, budget_tokens: int,
                 page_size: int = 16, prefix_cache: bool = False, salt: str = "") -> None:
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
        self.refs = [0] * self.num_pages  # requests holding each page
        self.cache = PrefixCache(page_size, salt) if prefix_cache else None
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
        """Pages nobody holds and no cache entry keeps."""
        return len(self._free)

    @property
    def idle_pages(self) -> int:
        """Cached pages nobody holds (evicted when an allocation needs them)."""
        return 0 if self.cache is None else len(self.cache.idle)

    @property
    def available_pages(self) -> int:
        """Pages an allocation can have now: free or idle."""
        return self.free_pages + self.idle_pages

    @property
    def used_pages(self) -> int:
        """Pages held by at least one request."""
        return self.num_pages - self.available_pages

    @property
    def cached_pages(self) -> int:
        """Pages in the prefix cache, held or idle."""
        return 0 if self.cache is None else len(self.cache)

    def pages_for(self, tokens: int) -> int:
        return math.ceil(tokens / self.page_size)

    def allocate(self, tokens: int) -> list[int] | None:
        """Fresh pages for `tokens` slots (free ones first, then the least recently used idle cached ones), or None
        when not that many are available now."""
        n = self.pages_for(tokens)
        if n > self.num_pages:
            raise KVBudgetError(f"needs {n * self.page_size} KV slots; the pool holds {self.capacity_tokens}")
        with self._lock:
            if n > self.available_pages:
                return None
            pages = [self._free.pop() for _ in range(min(n, len(self._free)))]
            if len(pages) < n:
                pages += self.cache.evict(n - len(pages))
            for p in pages:
                self.refs[p] = 1
            return pages

    def share(self, pages: list[int]) -> None:
        """One more request holds these (cached) pages."""
        with self._lock:
            for p in pages:
                if self.refs[p] == 0:
                    self.cache.unpark(p)
                self.refs[p] += 1

    def release(self, pages: list[int]) -> None:
        """A request lets these pages go; a page nobody holds is idle when cached, else free."""
        with self._lock:
            for p in reversed(pages):
                self.refs[p] -= 1
                if self.refs[p] < 0:
                    raise RuntimeError(f"KV page {p} released more often than taken")
                if self.refs[p] == 0:
                    if self.cache is not None and self.cache.holds(p):
                        self.cache.park(p)
                    else:
                        self._free.append(p)

    def reset_prefix_cache(self) -> int:
        """Forget every cached page (idle ones become free; held ones stay with their requests). Returns how many
        pages the cache held."""
        if self.cache is None:
            return 0
        with self._lock:
            n = len(self.cache)
            self._free.extend(self.cache.reset())
            return n

    def slot_index(self, pages: list[int]) -> torch.Tensor:
        """Slot of every token position of a page list: [len(pages) * page_size]."""
        p = torch.tensor(pages, dtype=torch.long)
        return (1 + p[:, None] * self.page_size + torch.arange(self.page_size)[None, :]).flatten().to(self.k.device)


class PagedCache:
    """One request's KV cache inside the pool (batch size 1); the `KVCache` contract the modes rely on.

    Commits say which tokens they keep and whether a causal pass over real tokens wrote them; while every commit so
    far did (`clean`), each page that fills up is published in the pool's prefix cache under its chain key."""

    def __init__(self, pool: KVPool) -> None:
        self.pool = pool
        self.pages: list[int] = []
        self.length = 0
        self.tokens: list[int] = []  # the committed token ids (while clean)
        self.lora: list[bool] = []  # whether the adapter was on in the pass that wrote each of them
        self.keys: list[bytes] = []  # chain key of each published page (page i: self.keys[i])
        self.clean = pool.cache is not None
        self.cached_tokens = 0  # prompt tokens taken from the prefix cache

    @property
    def capacity(self) -> int:
        return len(self.pages) * self.pool.page_size  # = slots.numel(), without a tensor call

    @property
    def batch_size(self) -> int:
        return 1

    def is_contiguous(self, tokens: int) -> bool:
        """Whether the first `tokens` slots are consecutive in the pool (pages come in any order: check them all)."""
        n = self.pool.pages_for(tokens)
        return tokens <= self.capacity and all(b - a == 1 for a, b in zip(self.pages[: n - 1], self.pages[1:n]))

    def adopt_prefix(self, tokens: list[int], most: int) -> int:
        """Take the longest cached chain of full pages the prompt `tokens` starts with, at most `most` tokens of
        it, as this (empty) cache's committed prefix; returns its length in tokens."""
        cache = self.pool.cache
        if cache is None or self.length or self.pages:
            return 0
        cache.queries += len(tokens)
        pages = cache.match(tokens[:most])
        if not pages:
            return 0
        self.pool.share(pages)
        n = len(pages) * self.pool.page_size
        self._add_pages(pages)
        self.length = self.cached_tokens = n
        self.tokens, self.lora = list(tokens[:n]), [False] * n
        self.keys = [cache.key_of[p] for p in pages]
        cache.hits += n
        return n

    def grow(self, total: int) -> bool:
        """Make room for `total` slots (committed plus scratch); False when the pool has no pages for it now."""
        if total <= self.capacity:
            return True
        more = self.pool.allocate(total - self.capacity)
        if more is None:
            return False
        self._add_pages(more)
        return True

    def reserve(self, total: int) -> None:
        if not self.grow(total):
            raise KVBudgetError(f"the KV pool has no free page to grow a cache to {total} slots")

    def _add_pages(self, pages: list[int]) -> None:
        self.pages += pages

    @property
    def slots(self) -> torch.Tensor:
        """The pool slot of every position: [capacity] (made when asked: only a slot commit needs it, so a
        growing cache costs no tensor op per page)."""
        return self.pool.slot_index(self.pages)

    def free(self) -> None:
        self.pool.release(self.pages)
        self.pages, self.keys, self.tokens, self.lora = [], [], [], []
        self.length = 0

    def commit(self, n: int, ids: list[int] | None = None, causal: bool = False, lora: bool = False) -> None:
        """Keep the first `n` scratch slots of the last pass: `ids` its tokens, `causal` whether a causal pass over
        real tokens wrote them (only then may their pages be cached)."""
        self.length += n
        self._record(n, ids, causal, lora)

    def commit_slots(self, offsets: torch.Tensor | list[int], ids: list[int] | None = None, causal: bool = False,
                     lora: bool = False) -> None:
        slots = self.slots
        src = slots[torch.as_tensor(offsets, dtype=torch.long, device=slots.device) + self.length]
        dst = slots[self.length : self.length + src.numel()]
        for pool in (self.pool.k, self.pool.v):
            pool.index_copy_(1, dst, pool.index_select(1, src))
        self.length += src.numel()
        self._record(src.numel(), ids, causal, lora)

    def _record(self, n: int, ids: list[int] | None, causal: bool, lora: bool) -> None:
        if not self.clean:
            return
        if ids is None or not causal or len(ids) != n:
            self.clean = False  # this chain's later pages hold values no token chain names
            return
        self.tokens += ids
        self.lora += [lora] * n
        p = self.pool.page_size
        while len(self.tokens) >= (len(self.keys) + 1) * p:
            i = len(self.keys)
            parent = self.keys[-1] if self.keys else self.pool.cache.root
            key = page_key(parent, self.tokens[i * p : (i + 1) * p], any(self.lora[i * p : (i + 1) * p]))
            self.keys.append(key)
            self.pool.cache.insert(key, self.pages[i])

    def crop(self, length: int) -> None:
        if not 0 <= length <= self.length:
            raise ValueError(f"cannot crop a cache of length {self.length} to {length}")
        if length < len(self.keys) * self.pool.page_size:
            raise ValueError("cannot crop into a page the prefix cache holds (its slots are final)")
        self.length = length
        del self.tokens[length:], self.lora[length:]
