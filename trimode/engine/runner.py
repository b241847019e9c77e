"""Forward passes of many requests fused into one: the proxy a decode mode calls, and the batched forward.

A decode mode (`trimode/decode/*.py`) calls `model(ids, mask=..., cache=..., positions=..., lora=...)` and
expects logits back. In the engine, each request runs its mode in its own thread against a `ForwardProxy`:
the call records a `ForwardCall` and blocks until the step loop has run it, batched with the calls of the
other requests, and handed back this row's logits. The modes run unchanged.

Calls that can share one forward: same number of new tokens T and same adapter flag. Each row keeps its own
positions, cache length and mask kind (`row_masks` turns the kinds into one boolean mask).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

import torch

from trimode.engine.kv_pool import KVPool, PagedCache, RowsView
from trimode.model.masks import MaskSpec
from trimode.model.transformer import NLDTransformer


class RequestCancelled(Exception):
    """Raised inside a request's decode thread to unwind it when the request is cancelled."""


@dataclass
class ForwardCall:
    """One request's pending forward pass, filled in by the step loop."""

    input_ids: torch.Tensor  # [1, T]
    mask: MaskSpec
    cache: PagedCache
    positions: torch.Tensor  # [T] absolute positions
    lora: bool
    done: threading.Event = field(default_factory=threading.Event)
    logits: torch.Tensor | None = None
    error: BaseException | None = None
    chunks_done: int = 0  # tokens already run by chunked prefill
    chunk_logits: list = field(default_factory=list)

    @property
    def tokens(self) -> int:
        return self.input_ids.shape[1]

    def finish(self, logits: torch.Tensor | None = None, error: BaseException | None = None) -> None:
        self.logits, self.error = logits, error
        self.done.set()


class ForwardProxy:
    """What a decode mode sees as its model: the real network's attributes, forwards routed to the engine.

    `submit(call)` hands a ForwardCall to the engine (it parks the request's thread until the call is done).
    `new_cache` hands out the request's pool pages reserved at admission.
    """

    def __init__(self, net: NLDTransformer, pool: KVPool, pages: list[int], submit) -> None:
        self.net = net
        self.config = net.config
        self.encoder = net.encoder  # TriMode.has_drafter looks at the adapter
        self._pool = pool
        self._pages = pages
        self._submit = submit
        self.caches: list[PagedCache] = []

    @property
    def device(self) -> torch.device:
        return self.net.device

    @property
    def dtype(self) -> torch.dtype:
        return self.net.dtype

    def new_cache(self, batch_size: int = 1, capacity: int = 256) -> PagedCache:
        if batch_size != 1:
            raise ValueError("the engine runs one sequence per request (batch size 1)")
        cache = PagedCache(self._pool, self._pages)
        self._pages = []  # a second cache of the same request would grow from the free pool
        cache.reserve(capacity)
        self.caches.append(cache)
        return cache

    def free(self) -> None:
        for cache in self.caches:
            cache.free()
        if self._pages:
            self._pool.release(self._pages)
            self._pages = []

    def __call__(self, input_ids: torch.Tensor, *, mask: MaskSpec = "causal", cache: PagedCache | None = None,
                 positions: torch.Tensor | None = None, lora: bool = False, return_hidden: bool = False):
        if input_ids.shape[0] != 1 or cache is None or return_hidden:
            raise ValueError("engine forwards take one row [1, T] over the request's own cache")
        t = input_ids.shape[1]
        if positions is None:
            positions = torch.arange(cache.length, cache.length + t, device=input_ids.device)
        call = ForwardCall(input_ids, mask, cache, positions.reshape(-1), lora)
        self._submit(call)
        call.done.wait()
        if call.error is not None:
            raise call.error
        return call.logits


def row_mask(mask: MaskSpec, t: int, past: int, width: int, device) -> torch.Tensor:
    """One row's boolean mask [T, width] over keys [its prefix (past) | its T tokens | padding]."""
    cols = torch.arange(width, device=device)[None, :]
    if isinstance(mask, torch.Tensor):
        m = mask.reshape(t, past + t).to(device)
        return torch.cat([m, torch.zeros(t, width - past - t, dtype=torch.bool, device=device)], 1)
    if mask == "causal":
        return cols <= past + torch.arange(t, device=device)[:, None]
    if mask == "bidirectional":
        return (cols < past + t).expand(t, width)
    raise ValueError(f"unknown mask kind {mask!r}")


@torch.no_grad()
def run_batched(net: NLDTransformer, pool: KVPool, rows: list[tuple[ForwardCall, int, int]]) -> torch.Tensor:
    """Run rows (call, start, end) in one forward; row i feeds tokens start..end of its call.

    All rows have the same end - start and adapter flag. A row's cache prefix is its committed length plus
    `start` (the earlier chunks of a chunked causal pass). Returns logits [R, T, V].
    """
    t = rows[0][2] - rows[0][1]
    dev = net.device
    calls = [c for c, _, _ in rows]
    pasts = [c.cache.length + s for c, s, _ in rows]
    view = RowsView(pool, [c.cache for c in calls], pasts, t)
    width = view.length + t
    ids = torch.cat([c.input_ids[:, s:e] for c, s, e in rows]).to(dev)
    positions = torch.stack([c.positions[s:e] for c, s, e in rows]).to(dev)
    masks = torch.stack([row_mask(c.mask, t, p, width, dev) for c, p in zip(calls, pasts, strict=True)])[:, None]
    return net(ids, mask=masks, cache=view, positions=positions, lora=calls[0].lora)
