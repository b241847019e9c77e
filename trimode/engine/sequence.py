"""A request inside the engine: its step machine, its pages, the pass it waits for, and its output so far."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

import torch

from trimode.api import Prepared, TriMode
from trimode.decode.result import GenerationResult
from trimode.decode.stats import DecodeStats
from trimode.decode.step import Commit, Committed, Forward, Machine
from trimode.decode.text import TextStream
from trimode.engine.kv_pool import PagedCache
from trimode.engine.request import EngineRequest, RequestHandle
from trimode.engine.runner import Row


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class Sequence:
    handle: RequestHandle
    prepared: Prepared
    kv_slots: int  # the most KV slots it uses (reserved at admission)
    status: Status = Status.WAITING
    cache: PagedCache | None = None
    machine: Machine | None = None
    pending: Forward | None = None  # the pass it waits for
    chunk_done: int = 0  # tokens of `pending` already run (a long causal prompt pass runs in chunks)
    text: TextStream | None = None
    stats: DecodeStats = field(default_factory=lambda: DecodeStats("ar"))
    started: float = 0.0
    block: list[int] | None = None  # an edit's filled block

    @property
    def request(self) -> EngineRequest:
        return self.handle.request

    def start(self, tm: TriMode, cache: PagedCache, steer, now: float) -> None:
        self.cache, self.status, self.started = cache, Status.RUNNING, now
        self.stats = DecodeStats(self.prepared.mode, prompt_tokens=len(self.prepared.prompt_ids))
        self.text = TextStream(tm.tokenizer, self.prepared.rule, self.prepared.stop)
        self.machine = tm.machine(self.prepared, self.request.provisional, steer)

    def advance(self, tm: TriMode, reply: torch.Tensor | None) -> GenerationResult | None:
        """Send the machine its logits and run it to its next forward (cache commits and events on the way).
        Returns the result when the request is over."""
        self.pending, self.chunk_done = None, 0
        while True:
            try:
                op = self.machine.send(reply)
            except StopIteration:
                return self.result(tm)
            reply = None
            if isinstance(op, Forward):
                self.pending = op
                return None
            if isinstance(op, Commit):
                if op.slots is not None:
                    self.cache.commit_slots(op.slots)
                else:
                    self.cache.commit(op.n)
                continue
            if op.stats is not None:
                self.stats = op.stats
            if isinstance(op, Committed) and self.prepared.edit is not None:
                self.block = op.tokens[0]
            if isinstance(op, Committed) and self.prepared.edit is None:  # the common event, without a generator
                delta = self.text.add(op.tokens[0])
                if delta is not None:
                    delta.forward_passes = self.stats.forward_passes
                    self.handle._put(delta)
            else:
                for event in tm.events(self.prepared, self.text, op, self.stats):
                    self.handle._put(event)
            if self.prepared.edit is None and self.text.stop_hit:
                self.machine.close()
                return self.result(tm)

    def next_row(self, prefill_chunk: int) -> Row:
        """The part of `pending` to run this step: all of it, or the next chunk of a long causal prompt pass."""
        f = self.pending
        t = f.tokens
        start, end = self.chunk_done, t
        positions = f.positions  # None: right after the cache (a chunk's earlier chunks are committed by then)
        if self.chunkable(prefill_chunk):
            end = min(t, start + prefill_chunk)
        read = None if f.logits == "all" else ([t - 1] if f.logits == "last" else list(f.logits))
        if (start, end) != (0, t):  # a chunk reads only the logits it holds
            read = [i - start for i in read if start <= i < end]
        if positions is not None:
            positions = positions[start:end].reshape(-1)
        return Row(self.cache, f.ids[0, start:end], positions, f.mask, f.lora, read)

    def chunkable(self, prefill_chunk: int) -> bool:
        f = self.pending
        return (f.tokens > prefill_chunk and isinstance(f.mask, str) and f.mask == "causal" and f.cache == "append"
                and f.logits != "all")

    def ran(self, row: Row, logits: torch.Tensor) -> torch.Tensor | None:
        """A row of `pending` ran: the logits to send when the pass is complete, else None (more chunks)."""
        f = self.pending
        if f.cache == "append":
            self.cache.commit(row.tokens)
        self.chunk_done += row.tokens
        if self.chunk_done < f.tokens:
            return None
        return logits[None] if f.logits != "last" else logits  # [1, n, V] or [1, V] as the batch-1 driver gives

    def result(self, tm: TriMode, finish: str | None = None) -> GenerationResult:
        import time

        self.status = Status.FINISHED
        result = tm.result(self.prepared, self.text, self.stats, finish, time.perf_counter() - self.started,
                           self.block)
        return result
