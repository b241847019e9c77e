"""Gathered keys kept between steps: a width group's K/V as one [R, capacity, kv_heads, head_dim] buffer per layer,
updated in place, so a forward does not copy every row's whole prefix out of the paged pool again.

A batched forward over the pool attends over each row's keys laid out `[prefix | new tokens | padding]`; gathering
them from the pages copies the whole prefix of every row, every layer, every step (`RowsView`). When the same rows
run again in the next step (an AR or speculative decode in lockstep), only their new tokens changed: the buffer of
the last step is reused and those are written into it beside the pool (`RowsView.write_scratch`).

The buffer of rows r = 0..R-1 is valid for row r up to the end of its last pass, while the rows are the same
cache objects in the same order and nothing else wrote their slots since: each `PagedCache` names the buffer that
last wrote it (`gathered`); another forward of it, `commit_slots` (which moves K/V inside the pool) and `free`
clear that. Columns past a row's pass hold earlier values of that row (or zeros), which its mask hides. Buffers
live on the pool, at most `budget_bytes` of them in all (an eighth of the pool by default); a group that does not
fit gathers as before.
"""

from __future__ import annotations

import torch


class GatheredKeys:
    def __init__(self, like: torch.Tensor, caches: list, t: int, capacity: int) -> None:
        layers, _, heads, dim = like.shape
        shape = (len(caches), capacity, heads, dim)
        self.k = [torch.zeros(shape, dtype=like.dtype, device=like.device) for _ in range(layers)]
        self.v = [torch.zeros(shape, dtype=like.dtype, device=like.device) for _ in range(layers)]
        self.caches, self.t, self.capacity = caches, t, capacity
        self.valid: list[int] = [0] * len(caches)  # per row: columns equal to the pool's slots after the last pass

    @staticmethod
    def nbytes(like: torch.Tensor, rows: int, capacity: int) -> int:
        layers, _, heads, dim = like.shape
        return 2 * layers * rows * capacity * heads * dim * like.element_size()

    def fits(self, caches: list, t: int, width: int) -> bool:
        """Whether these rows can reuse the buffer: the same caches in the same order, each last written here, each
        committed prefix within what the buffer holds, and room for `width` columns."""
        return (t == self.t and width <= self.capacity and len(caches) == len(self.caches)
                and all(a is b and a.gathered is self and a.length <= n
                        for a, b, n in zip(caches, self.caches, self.valid)))


class GatheredStore:
    """The pool's buffers, oldest first, within a byte budget."""

    def __init__(self, budget_bytes: int) -> None:
        self.budget_bytes = budget_bytes
        self.buffers: dict[tuple, GatheredKeys] = {}

    def clear(self) -> None:
        self.buffers.clear()

    def take(self, like: torch.Tensor, caches: list, t: int, width: int) -> tuple[GatheredKeys | None, bool]:
        """The buffer for a forward of `caches` with `width` key columns, and whether it must be filled from the pool
        first (a new one); (None, True) when none fits the budget. Marks every cache as written by it."""
        key = (t, id(caches[0]))
        buf = self.buffers.get(key)
        fresh = buf is None or not buf.fits(caches, t, width)
        if fresh:
            self.buffers.pop(key, None)
            capacity = width + max(16, width // 2)  # room to grow a few steps before a new buffer is needed
            size = GatheredKeys.nbytes(like, len(caches), capacity)
            if size > self.budget_bytes:
                for c in caches:
                    c.gathered = None
                return None, True
            used = sum(GatheredKeys.nbytes(like, len(b.caches), b.capacity) for b in self.buffers.values())
            while self.buffers and used + size > self.budget_bytes:
                old = self.buffers.pop(next(iter(self.buffers)))
                used -= GatheredKeys.nbytes(like, len(old.caches), old.capacity)
            buf = self.buffers[key] = GatheredKeys(like, caches, t, capacity)
        for c in caches:
            c.gathered = buf
        return buf, fresh
