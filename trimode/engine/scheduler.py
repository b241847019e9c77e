"""Who runs: the waiting queue, admission under the KV budget, and the grouping of pending passes into forwards.

- Capacity is `max_running` rows decoding plus `max_queue` waiting beyond them; a request beyond that is
  rejected at once (`QueueFull`), one within it is never rejected (a burst of running + queue is served).
- A waiting request is admitted (FIFO) when a row is free and the pool can reserve its worst-case KV slots;
  otherwise it waits, so a running request never runs out of memory.
- Each step, every running request has one pending pass. Passes with the same token count share a forward
  (rows carry their own positions, cache lengths, masks and adapter flag); a long causal prompt pass runs in
  chunks of `prefill_chunk` tokens, one chunk per step, so it does not stall the other rows.
"""

from __future__ import annotations

from collections import deque

from trimode.engine.kv_pool import KVPool, PagedCache
from trimode.engine.request import QueueFull
from trimode.engine.runner import Row
from trimode.engine.sequence import Sequence, Status


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
        if len(self.running) + len(self.waiting) >= self.max_running + self.max_queue:
            raise QueueFull(f"the server is at capacity ({self.max_running} running, {self.max_queue} waiting)")
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
            pages = self.pool.allocate(seq.kv_slots)
            if pages is None:
                break  # the head waits for pages; admitting later requests first could starve it
            seq.cache = PagedCache(self.pool, pages)
            self.running.append(self.waiting.popleft())
            admitted.append(seq)
        dropped += [s for s in self.waiting if s.handle.cancelled]
        self.waiting = deque(s for s in self.waiting if not s.handle.cancelled)
        return admitted, dropped

    def finish(self, seq: Sequence) -> None:
        """A running request left: its pages go back to the pool."""
        seq.status = Status.FINISHED
        if seq.cache is not None:
            seq.cache.free()
        self.running.remove(seq)

    def plan(self) -> list[list[tuple[Sequence, Row]]]:
        """This step's forwards: every running request's pending pass (or its next chunk), rows of all widths
        together (narrow first), a new forward only where `max_batch_tokens` is reached."""
        rows = sorted(((seq, seq.next_row(self.prefill_chunk)) for seq in self.running if seq.pending is not None),
                      key=lambda sr: sr[1].tokens)
        batches: list[list[tuple[Sequence, Row]]] = []
        tokens = 0
        for seq, row in rows:
            if not batches or tokens + row.tokens > self.max_batch_tokens:
                batches.append([])
                tokens = 0
            batches[-1].append((seq, row))
            tokens += row.tokens
        return batches
