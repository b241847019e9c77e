"""One fused forward over rows of many requests: the inputs, the per-row masks and the paged cache view.

A row is one request's pending pass (or one chunk of a long causal prompt pass). Everything is per row:
positions, cache length, mask kind, the drafter adapter (applied per row, so drafts and verifies share a pass)
and which positions' logits it reads (only those go through the LM head). Rows of one width T form a group,
laid out [R, T] with keys [prefix | T tokens | padding] per row (`RowsView`, `row_masks`); rows of different
widths share the forward too (`run_step`): their tokens are packed into one sequence for every per-token
operation (embeddings, projections, MLP, LM head: the weights are read once per step), and only attention runs
per group (`PackedView.attend`). Built with a handful of batched tensor ops however many rows there are.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from trimode.engine.kv_pool import KVPool, PagedCache
from trimode.model.masks import MaskSpec, pass_pattern, resolve
from trimode.model.transformer import NLDTransformer


@dataclass
class Row:
    cache: PagedCache
    ids: torch.Tensor | list[int]  # [T] (a host list: an AR step's token)
    positions: torch.Tensor | None  # [T]; None: right after the cache's committed length
    mask: MaskSpec
    lora: bool
    read: list[int] | None  # token indices whose logits the row needs; None: all
    tokens: int = field(init=False)  # T (kept as an int: the scheduler and the runner ask for it often)

    def __post_init__(self) -> None:
        self.tokens = len(self.ids) if isinstance(self.ids, list) else self.ids.numel()


def batch_ids(rows: list[Row]) -> torch.Tensor:
    """Every row's ids in order, flat [sum T]: one tensor op when every row gave a host list (AR steps)."""
    if all(isinstance(r.ids, list) for r in rows):
        return torch.tensor([i for r in rows for i in r.ids], dtype=torch.long)
    return torch.cat([torch.tensor(r.ids, dtype=torch.long) if isinstance(r.ids, list) else r.ids for r in rows])


class RowsView:
    """The cache of one batched forward over R rows of T tokens, row r after its own `length` prefix.

    Keys are laid out per row as [its committed prefix | its T new tokens | null padding] up to
    `max(length) + T`; the mask built by `row_masks` hides the padding."""

    def __init__(self, pool: KVPool, caches: list[PagedCache], t: int) -> None:
        dev = pool.k.device
        self.pool = pool
        self.lengths = [c.length for c in caches]  # host ints: positions and masks are built from them
        self.length = max(self.lengths)
        width = self.length + t
        # One row whose slots are consecutive (pages handed out in order): read and write the pool in place.
        self.first_slot = None
        self.pasts: torch.Tensor | None = None
        if len(caches) == 1 and caches[0].is_contiguous(width):
            self.first_slot = 1 + caches[0].pages[0] * pool.page_size
            return
        self.pasts = torch.tensor(self.lengths, device=dev)
        # The slots of every row's first `width` positions, from its page list (one small tensor, no per-row tensor
        # op); a row with fewer pages is padded with page 0, which the next line masks: it reads the null slot
        # past its own prefix and pass.
        ps = pool.page_size
        n = -(-width // ps)
        pages = torch.tensor([c.pages[:n] + [0] * (n - len(c.pages[:n])) for c in caches], dtype=torch.long)
        table = (1 + pages[:, :, None] * ps + torch.arange(ps)[None, None, :]).view(len(caches), n * ps)
        table = table[:, :width].to(dev)
        cols = torch.arange(width, device=dev)
        self.read = torch.where(cols[None, :] < (self.pasts + t)[:, None], table, 0)  # [R, width]
        self.write = table.gather(1, self.pasts[:, None] + torch.arange(t, device=dev)[None, :]).flatten()
        self.read_flat = self.read.flatten()

    def reserve(self, total: int) -> None:
        """The scheduler grew every row's cache to hold its pass before the forward."""

    def write_scratch(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        r, h, t, d = k.shape
        if self.first_slot is not None:
            s0 = self.first_slot
            end = s0 + self.length + t
            self.pool.k[layer, s0 + self.length : end] = k[0].transpose(0, 1)
            self.pool.v[layer, s0 + self.length : end] = v[0].transpose(0, 1)
            return (self.pool.k[layer, s0:end].transpose(0, 1)[None], self.pool.v[layer, s0:end].transpose(0, 1)[None])
        width = self.read.shape[1]
        out = []
        for pool, new in ((self.pool.k[layer], k), (self.pool.v[layer], v)):
            # index_copy_ / index_select: several times faster than advanced indexing for these shapes.
            pool.index_copy_(0, self.write, new.transpose(1, 2).reshape(r * t, h, d))
            out.append(pool.index_select(0, self.read_flat).view(r, width, h, d).transpose(1, 2))
        return out[0], out[1]


def row_masks(rows: list[Row], pasts: torch.Tensor, width: int) -> torch.Tensor:
    """Boolean [R, 1, T, width]: every row sees its own prefix, and its own tokens by its mask kind."""
    t = rows[0].tokens
    dev = pasts.device
    cols = torch.arange(width, device=dev)
    kinds = {id(r.mask) if isinstance(r.mask, torch.Tensor) else r.mask for r in rows}
    if t == 1 and kinds <= {"causal", "bidirectional"}:  # one token (AR steps): it sees its prefix and itself
        return (cols[None, :] <= pasts[:, None])[:, None, None]
    rel = cols[None, :] - pasts[:, None]  # [R, width]: key position inside the row's pass
    if len(kinds) == 1 and not isinstance(rows[0].mask, torch.Tensor):
        patterns = pass_pattern(rows[0].mask, t, dev)[None].expand(len(rows), t, t)
    else:
        patterns = torch.stack([_pattern(r, p, t, dev) for r, p in zip(rows, pasts.tolist())])
    in_pass = (rel >= 0) & (rel < t)
    own = patterns.gather(2, rel.clamp(0, t - 1)[:, None, :].expand(-1, t, -1)) & in_pass[:, None, :]
    return ((rel < 0)[:, None, :] | own)[:, None]


def _pattern(row: Row, past: int, t: int, device) -> torch.Tensor:
    if isinstance(row.mask, torch.Tensor):  # an explicit [T, past + T] mask: its part over the pass
        return row.mask.reshape(t, past + t)[:, past:].to(device)
    return pass_pattern(row.mask, t, device)


def single_row_mask(row: Row, past: int):
    """One row needs no padding: its mask as the model resolves it (None where everything is visible)."""
    if isinstance(row.mask, torch.Tensor):
        return row.mask
    return "bidirectional" if row.tokens == 1 else row.mask  # one token sees its prefix and itself


@dataclass
class _Group:
    rows: list[Row]
    view: RowsView
    mask: object
    start: int  # its tokens in the packed sequence: start .. start + len(rows) * T
    t: int


class PackedView:
    """The cache of a forward whose tokens are several row groups packed as one sequence [1, N]: it writes each
    group's K/V into the pool and runs each group's attention over its own keys and mask."""

    length = 0

    def __init__(self, pool: KVPool, groups: list[list[Row]]) -> None:
        self.groups: list[_Group] = []
        start = 0
        for rows in groups:
            t = rows[0].tokens
            view = RowsView(pool, [r.cache for r in rows], t)
            mask = (single_row_mask(rows[0], view.length) if view.first_slot is not None
                    else row_masks(rows, view.pasts, view.length + t))
            self.groups.append(_Group(rows, view, mask, start, t))
            start += len(rows) * t

    def reserve(self, total: int) -> None:
        """The scheduler grew every row's cache to hold its pass before the forward."""

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, gqa: bool) -> torch.Tensor:
        """q [1, H, N, D], k / v [1, Hkv, N, D] of the packed tokens -> attention output [1, H, N, D]."""
        outs = []
        for g in self.groups:
            r, end = len(g.rows), g.start + len(g.rows) * g.t

            def rows_of(x: torch.Tensor, g=g, r=r, end=end) -> torch.Tensor:  # [1, H, R*T, D] -> [R, H, T, D]
                return x[0, :, g.start : end].reshape(x.shape[1], r, g.t, x.shape[-1]).transpose(0, 1)

            keys, values = g.view.write_scratch(layer, rows_of(k), rows_of(v))
            mask, is_causal = resolve(g.mask, g.t, g.view.length, q.device)
            out = F.scaled_dot_product_attention(rows_of(q), keys, values, attn_mask=mask, is_causal=is_causal,
                                                 enable_gqa=gqa)
            outs.append(out.transpose(0, 1).reshape(out.shape[1], r * g.t, out.shape[-1]))
        return torch.cat(outs, 1)[None]


@torch.no_grad()
def run_step(net: NLDTransformer, pool: KVPool, rows: list[Row]) -> list[torch.Tensor]:
    """Run rows of any widths in one forward; returns each row's logits ([T, V] or [len(read), V]) in order."""
    by_width: dict[int, list[int]] = {}
    for i, r in enumerate(rows):
        by_width.setdefault(r.tokens, []).append(i)
    if len(by_width) == 1:
        return run_rows(net, pool, rows)
    order = [i for idx in by_width.values() for i in idx]
    packed = [rows[i] for i in order]
    dev = net.device
    view = PackedView(pool, [[rows[i] for i in idx] for idx in by_width.values()])
    ids = batch_ids(packed).to(dev)[None]
    positions = torch.cat([r.positions if r.positions is not None
                           else r.cache.length + torch.arange(r.tokens) for r in packed]).to(dev)[None]
    lora = False
    if any(r.lora for r in packed):
        lora = torch.cat([torch.full((r.tokens,), r.lora) for r in packed]).to(dev)[None]
    index, counts, at = [], [], 0
    for r in packed:
        read = torch.arange(r.tokens) if r.read is None else torch.tensor(r.read, dtype=torch.long)
        index.append(read + at)
        counts.append(len(read))
        at += r.tokens
    logits = net(ids, mask="bidirectional", cache=view, positions=positions, lora=lora,
                 logits_at=torch.cat(index))
    out = list(logits.split(counts))
    result: list[torch.Tensor] = [None] * len(rows)  # type: ignore[list-item]
    for i, logit in zip(order, out):
        result[i] = logit
    return result


@torch.no_grad()
def run_rows(net: NLDTransformer, pool: KVPool, rows: list[Row]) -> list[torch.Tensor]:
    """Run rows of equal token count in one forward; returns each row's logits: [T, V] or [len(read), V]."""
    t = rows[0].tokens
    dev = net.device
    view = RowsView(pool, [r.cache for r in rows], t)
    ids = batch_ids(rows).view(len(rows), t).to(dev)
    if all(r.positions is None for r in rows):  # each row's pass right after its prefix
        if t == 1:  # an AR step: one tensor op from the host lengths
            positions = torch.tensor([[n] for n in view.lengths], device=dev)
        else:
            positions = torch.tensor(view.lengths, device=dev)[:, None] + torch.arange(t, device=dev)[None, :]
    else:
        positions = torch.stack([r.positions if r.positions is not None
                                 else r.cache.length + torch.arange(t) for r in rows]).to(dev)
    if view.first_slot is not None:
        masks = single_row_mask(rows[0], view.length)
    else:
        masks = row_masks(rows, view.pasts, view.length + t)
    lora = torch.tensor([r.lora for r in rows], device=dev) if any(r.lora for r in rows) else False
    counts = [t if r.read is None else len(r.read) for r in rows]
    index = None
    if all(r.read == [t - 1] for r in rows):  # every row reads its last token (AR steps, prompt passes)
        if t > 1:  # (with one token per row that is every token: no index)
            index = torch.arange(len(rows)) * t + (t - 1)
    elif any(r.read is not None for r in rows):
        index = torch.cat([torch.arange(t) + i * t if r.read is None else torch.tensor(r.read, dtype=torch.long) + i * t
                           for i, r in enumerate(rows)])
    logits = net(ids, mask=masks, cache=view, positions=positions, lora=lora,
                 logits_at=index if index is not None else None)
    logits = logits.reshape(-1, logits.shape[-1])
    return list(logits.split(counts))
