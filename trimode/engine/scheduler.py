"""Who runs: the waiting queue, admission under the KV budget, and the grouping of forward calls into batches.

- A request is admitted (FIFO) when a running row is free and the pool can reserve its worst-case KV slots;
  otherwise it waits, so a running request never runs out of memory. New work is rejected once max_running +
  max_queue requests are running or waiting.
- Each step, every running request has one pending forward call. Calls with the same token count and adapter
  flag share a forward (rows carry their own positions, cache lengths and masks); a long causal prefill runs
  in chunks of `prefill_chunk` tokens, one chunk per step, so it does not stall the other rows.
"""

from __future__ import annotations

import math
from collections import defaultdict, deque
from dataclasses import dataclass, field

from trimode.engine.kv_pool import KVPool
from trimode.engine.request import EngineRequest, QueueFull, RequestHandle
from trimode.engine.runner import ForwardCall


def kv_tokens_needed(req: EngineRequest, block_length: int) -> int:
    """The KV slots a request may use at most: what its decode mode asks `new_cache` for."""
    p, n, b = len(req.prompt_ids), req.max_new_tokens, block_length
    if req.mode == "ar":
        return p + n
    if req.mode == "diffusion":
        return p + math.ceil(n / b) * b
    if req.mode == "linear_spec":
        return p + n + 2 * b
    return p + n + b * (b + 1) + b  # quadratic_spec and auto (whose widest pass is a quadratic one)


@dataclass
class Sequence:
    """A request inside the engine."""

    handle: RequestHandle
    kv_tokens: int
    knobs: dict  # the effective mode knobs (validated)
    pages: list[int] = field(default_factory=list)
    call: ForwardCall | None = None  # the forward it waits on, if any
    finished: bool = False

    @property
    def request(self) -> EngineRequest:
        return self.handle.request


Batch = list[tuple[ForwardCall, int, int]]  # (call, first token, end token) rows of one forward


class Scheduler:
    def __init__(self, pool: KVPool, max_queue: int, max_running: int, max_batch_tokens: int,
                 prefill_chunk: int) -> None:
        self.pool = pool
        self.max_queue = max_queue
        self.max_running = max_running
        self.max_batch_tokens = max_batch_tokens
        self.prefill_chunk = prefill_chunk
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []

    def add(self, seq: Sequence) -> None:
        # Capacity is running + waiting: a burst arrives before the loop admits anything, so counting only the
        # waiting requests would reject work that free rows are about to take (and max_queue 0 would reject all).
        if sum(not s.finished for s in self.running) + len(self.waiting) >= self.max_running + self.max_queue:
            raise QueueFull(f"the engine is full ({self.max_running} running + {self.max_queue} waiting requests)")
        self.waiting.append(seq)

    def admit(self) -> tuple[list[Sequence], list[Sequence]]:
        """Move waiting requests to running while rows and KV pages allow (first come, first served).

        Returns (admitted, dropped): dropped are requests cancelled while they waited."""
        admitted, dropped = [], []
        while self.waiting and len(self.running) < self.max_running:
            seq = self.waiting[0]
            if seq.handle.cancelled:
                dropped.append(self.waiting.popleft())
                continue
            pages = self.pool.allocate(seq.kv_tokens)
            if pages is None:
                break  # the head waits for pages; admitting later requests first could starve it
            seq.pages = pages
            self.running.append(self.waiting.popleft())
            admitted.append(seq)
        dropped += [s for s in self.waiting if s.handle.cancelled]
        self.waiting = deque(s for s in self.waiting if not s.handle.cancelled)
        return admitted, dropped

    def plan(self, calls: list[ForwardCall]) -> list[Batch]:
        """Group this step's calls into forwards; each call runs once (or one chunk of a long causal pass)."""
        groups: dict[tuple[int, bool], Batch] = defaultdict(list)
        for call in calls:
            start = call.chunks_done
            end = call.tokens
            if isinstance(call.mask, str) and call.mask == "causal":
                end = min(end, start + self.prefill_chunk)
            groups[(end - start, call.lora)].append((call, start, end))
        batches = []
        for (t, _), rows in sorted(groups.items(), key=lambda kv: kv[0]):
            per_forward = max(1, self.max_batch_tokens // t)
            batches += [rows[i : i + per_forward] for i in range(0, len(rows), per_forward)]
        return batches
