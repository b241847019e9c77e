"""The step-machine protocol: what a decoding mode yields to whoever drives it, and what it gets back.

A mode is a generator function. It owns its algorithm and nothing else (no model, no cache object, no thread):

    logits = yield Forward(ids, mask="causal", cache="append", logits="last")   # a forward pass; its logits
    decision = yield Forward(ids, ..., pick=Pick(...))                        # or what the decision stage
                                                                              # makes of them (decode/decide.py)
    yield Commit(n)                                                            # keep K/V of the last pass
    yield Committed(tokens, stats)                                             # tokens that became final
    yield Provisional(block)                                                   # the block being denoised

and returns a `DecodeOutput`. The batch-1 driver (`driver.py`) runs each `Forward` on the network over a
contiguous KV cache; the engine runs the forwards of many machines fused over a paged pool. Either way the
machine sees the same logits, so a mode is written once.

Cache contract (the driver's cache, see `trimode/model/cache.py`): a pass attends over the committed prefix and
itself, and leaves its K/V as scratch right after the prefix. `cache="append"` commits all of them; otherwise the
machine decides after seeing the logits: `Commit(n)` keeps the first n, `Commit(slots=[...])` the tokens at
those offsets (quadratic speculation), nothing keeps none (a draft or denoising pass).
"""

from __future__ import annotations

from collections.abc import Generator
from dataclasses import dataclass
from typing import Literal

import torch

from trimode.decode.decide import Decision, Pick
from trimode.decode.stats import DecodeStats
from trimode.model.masks import MaskSpec


@dataclass
class Forward:
    """One forward pass a machine needs. It gets back logits: `"all"` -> [B, T, V], `"last"` -> [B, V] (the last
    token's), a list of token indices -> [B, len, V]. Only those positions go through the LM head. With `pick`,
    it gets the `Decision` for those positions (row-major) instead: the tokens chosen there, and what else the
    pick asks for. Machines keep their own tensors on the host: ids and positions may be CPU tensors. A one-row
    pass may give its ids as `host_ids` alone (`ids=None`, an AR step): the engine batches host lists with one
    tensor op for all its rows, and `id_tensor()` makes the tensor where one is needed."""

    ids: torch.Tensor | None  # [B, T] token ids (B > 1 only in the batch-1 driver's multi-row decodes)
    mask: MaskSpec = "causal"
    positions: torch.Tensor | None = None  # [T] absolute positions; None: cache length + arange(T)
    lora: bool = False  # the drafter adapter on o_proj, for this pass only
    cache: Literal["read", "append"] = "read"
    logits: Literal["all", "last"] | list[int] = "all"
    pick: Pick | None = None
    host_ids: list[int] | None = None  # row 0's ids as a list, when the machine has them (spares the engine a read)

    @property
    def tokens(self) -> int:
        return len(self.host_ids) if self.ids is None else self.ids.shape[1]

    @property
    def rows(self) -> int:
        return 1 if self.ids is None else self.ids.shape[0]

    def id_tensor(self) -> torch.Tensor:
        """[B, T] int64 ids (made from `host_ids` once, when the pass was given as a list)."""
        if self.ids is None:
            self.ids = torch.tensor([self.host_ids], dtype=torch.long)
        return self.ids


@dataclass
class Commit:
    """Keep K/V of the last forward as committed cache: its first `n` tokens, or its tokens at `slots`."""

    n: int = 0
    slots: list[int] | None = None


@dataclass
class Committed:
    """Tokens that became final, per batch row (empty lists for rows with nothing new), and the live stats;
    with logprobs asked for, each token's (log-probability, [(alternative id, its log-probability), ...])."""

    tokens: list[list[int]]
    stats: DecodeStats
    logprobs: list[list[tuple[float, list]]] | None = None


@dataclass
class Provisional:
    """The current state of the block being denoised, per row; undecided slots hold the mask id. `forced`: per
    row and slot, whether its grammar forced the token (written as a given token, no forward pass: see
    decode/frontier.py); None without a grammar."""

    block: list[list[int]]
    stats: DecodeStats | None = None
    forced: list[list[bool]] | None = None


@dataclass
class DecodeOutput:
    tokens: list[list[int]]  # generated ids per row, prompt excluded
    stats: DecodeStats


Machine = Generator["Forward | Commit | Committed | Provisional", "torch.Tensor | Decision | None", DecodeOutput]
Event = Committed | Provisional
