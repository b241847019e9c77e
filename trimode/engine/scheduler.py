"""Who runs: the waiting queue, admission, KV pages on demand with preemption, and the grouping of pending passes
into forwards.

- Capacity is `max_running` rows decoding plus `max_queue` waiting beyond them; a request beyond that is
  rejected at once (`QueueFull`), one within it is never rejected (a burst of running + queue is served).
- A waiting request is admitted (FIFO) when a row is free and the pool has the pages of its first pass, leaving a
  page of room for each running request's growth. Nothing more is reserved: a cache grows page by page as passes
  need slots (`plan`).
- When a pass needs a page and the pool has none (free or idle in the prefix cache), the newest running request is
  preempted: its pages go back and it waits again at the head of the queue, to restart from scratch (its output
  is deterministic; what the client already has is not sent twice). The oldest request is never preempted while
  another runs, and every request's worst case fits the whole pool (checked at submission), so each one finishes.
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
        self.preempted = 0  # preemptions so far

    def add(self, seq: Sequence) -> None:
        if len(self.running) + len(self.waiting) >= self.max_running + self.max_queue:
            raise QueueFull(f"the server is at capacity ({self.max_running} running, {self.max_queue} waiting)")
        self.waiting.append(seq)

    def admit(self) -> tuple[list[Sequence], list[Sequence]]:
        """Move waiting requests to running while rows and KV pages allow (first come, first served).

        Returns (admitted, dropped): dropped are requests cancelled while they waited."""
        admitted, dropped = [], []
        available = self.pool.available_pages
        while self.waiting and len(self.running) < self.max_running:
            seq = self.waiting[0]
            if seq.handle.cancelled:
                dropped.append(self.waiting.popleft())
                continue
            need = self.pool.pages_for(seq.admit_slots)
            if available - need < len(self.running) and self.running:
                break  # the head waits for pages; admitting later requests first could starve it
            available -= need
            seq.cache = PagedCache(self.pool)
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

    def preempt(self, seq: Sequence) -> None:
        """`seq` goes back to the head of the queue; its pages go back to the pool."""
        self.running.remove(seq)
        seq.preempt()
        self.waiting.appendleft(seq)
        self.preempted += 1

    def plan(self) -> list[list[tuple[Sequence, Row]]]:
        """This step's forwards: every running request's pending pass (or its next chunk), its cache grown to hold
        it (preempting the newest requests when the pool is dry), rows of all widths together (narrow first), a
        new forward only where `max_batch_tokens` is reached."""
        rows = []
        for seq in list(self.running):  # oldest first: preemption takes the newest
            if seq.status is not Status.RUNNING or seq.pending is None:
                continue
            row = seq.next_row(self.prefill_chunk)
            while not seq.cache.grow(seq.cache.length + row.tokens):
                victim = self.running[-1]
                self.preempt(victim)
                if victim is seq:
                    break
            else:
                rows.append((seq, row))
        rows.sort(key=lambda sr: sr[1].tokens)
        batches: list[list[tuple[Sequence, Row]]] = []
        tokens = 0
        for seq, row in rows:
            if not batches or tokens + row.tokens > self.max_batch_tokens:
                batches.append([])
                tokens = 0
            batches[-1].append((seq, row))
            tokens += row.tokens
        return batches
