"""The prefix cache: full, final KV pages of causal passes over real tokens, found again by the tokens before them.

Every mode and every edit reads and fills the same cache. A page enters it only when it is full (all its slots
committed), final (a committed slot is never written again) and written by a causal pass over real tokens (a
prompt pass, an AR step, the accepted tokens of a verify pass, diffusion's post-block refresh, the leaders of a
quadratic pass): never by a draft or denoising pass, a rejected token or a mask slot, none of which is committed.

A page's key hashes its parent page's key, the adapter of the pass that wrote it (the LoRA drafter changes the
values) and its token ids; the root key is the model's salt. So equal keys mean equal token chains from position
0, written by the same network: the page's K/V are what a causal pass over those tokens computes (bit for bit in
float64 whatever the chunking or the rows it ran with; see docs/engine.md for float32).

Pages are shared by reference count (`KVPool.share` / `release`); a cached page no request holds is *idle* and
stays findable until the pool needs it: `evict` hands back the least recently used idle pages first.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Sequence


def page_key(parent: bytes, tokens: Sequence[int], lora: bool = False) -> bytes:
    """The key of a page holding `tokens` after the chain whose last page has key `parent`."""
    h = hashlib.blake2b(parent, digest_size=16)
    h.update(b"L" if lora else b"-")
    h.update(b"".join(int(t).to_bytes(4, "little", signed=True) for t in tokens))
    return h.digest()


class PrefixCache:
    """Key -> page for every cached page, and the idle ones in least-recently-used order."""

    def __init__(self, page_size: int, salt: str = "") -> None:
        self.page_size = page_size
        self.root = hashlib.blake2b(salt.encode(), digest_size=16).digest()
        self.page_of: dict[bytes, int] = {}
        self.key_of: dict[int, bytes] = {}
        self.idle: OrderedDict[int, None] = OrderedDict()  # cached pages no request holds; oldest use first
        self.queries = 0  # prompt tokens looked up
        self.hits = 0  # prompt tokens found

    def __len__(self) -> int:
        return len(self.page_of)

    def match(self, tokens: Sequence[int]) -> list[int]:
        """The pages of the longest cached chain of full pages that `tokens` starts with (not yet shared: the
        caller takes them with `KVPool.share`)."""
        pages: list[int] = []
        key = self.root
        p = self.page_size
        for start in range(0, len(tokens) - p + 1, p):
            key = page_key(key, tokens[start : start + p])
            page = self.page_of.get(key)
            if page is None:
                break
            pages.append(page)
        return pages

    def insert(self, key: bytes, page: int) -> bool:
        """Cache `page` (held by a request) under `key`. False when the key is cached already (another request
        computed the same page meanwhile: its copy stays, this one remains the request's own)."""
        if key in self.page_of or page in self.key_of:
            return False
        self.page_of[key] = page
        self.key_of[page] = key
        return True

    def holds(self, page: int) -> bool:
        return page in self.key_of

    def park(self, page: int) -> None:
        """The last request holding a cached page let it go: it is idle, most recently used."""
        self.idle[page] = None

    def unpark(self, page: int) -> None:
        """A request takes an idle page again."""
        self.idle.pop(page, None)

    def evict(self, n: int) -> list[int]:
        """Forget the `n` least recently used idle pages and hand them back (fewer when fewer are idle)."""
        out = []
        while self.idle and len(out) < n:
            page, _ = self.idle.popitem(last=False)
            del self.page_of[self.key_of.pop(page)]
            out.append(page)
        return out

    def reset(self) -> list[int]:
        """Forget every page; returns the idle ones (free again). Held pages stay with their requests, uncached."""
        idle = list(self.idle)
        self.page_of.clear()
        self.key_of.clear()
        self.idle.clear()
        return idle
