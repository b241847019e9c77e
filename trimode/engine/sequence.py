"""A request inside the engine: its step machine, its pages, the pass it waits for, and its output so far."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass

import torch

from trimode.decode.result import GenerationResult
from trimode.decode.step import Commit, Forward, Machine
from trimode.engine.kv_pool import PagedCache
from trimode.engine.request import EngineRequest, RequestHandle
from trimode.engine.runner import Row
from trimode.model.handle import ModelHandle
from trimode.request import EditOutput, Prepared, TextOutput


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
    output: TextOutput | EditOutput | None = None  # what the client sees (from `start` on)
    started: float = 0.0

    @property
    def request(self) -> EngineRequest:
        return self.handle.request

    def start(self, model: ModelHandle, cache: PagedCache, steer, now: float) -> None:
        self.cache, self.status, self.started = cache, Status.RUNNING, now
        self.output = self.prepared.output(model)
        self.machine = self.prepared.machine(model, self.request.provisional, steer)

    def advance(self, reply: torch.Tensor | None) -> GenerationResult | None:
        """Send the machine its logits and run it to its next forward (cache commits and events on the way).
        Returns the result when the request is over."""
        self.pending, self.chunk_done = None, 0
        while True:
            try:
                op = self.machine.send(reply)
            except StopIteration:
                return self.result()
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
            for event in self.output.events(op):
                self.handle._put(event)
            if self.output.stop_hit:
                self.machine.close()
                return self.result()

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

    def result(self, finish: str | None = None) -> GenerationResult:
        self.status = Status.FINISHED
        return self.output.result(finish, time.perf_counter() - self.started)
