"""A request inside the engine: its step machine, its pages, the pass it waits for, and its output so far."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

import torch

from trimode.decode.result import GenerationResult
from trimode.decode.step import Commit, Forward, Machine
from trimode.engine.kv_pool import PagedCache
from trimode.engine.request import EngineRequest, RequestHandle
from trimode.engine.runner import Row
from trimode.engine.scoring import PromptScorer, scores_prompt
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
    scorer: PromptScorer | None = None  # the prompt logprobs, read from the first pass (`prompt_logprobs`)
    read: list[int] = field(default_factory=list)  # this step's row: the positions of `pending` it reads
    pieces: list[torch.Tensor] = field(default_factory=list)  # the machine's logits from the chunks run so far

    @property
    def request(self) -> EngineRequest:
        return self.handle.request

    def start(self, model: ModelHandle, cache: PagedCache, steer, now: float) -> None:
        self.cache, self.status, self.started = cache, Status.RUNNING, now
        self.output = self.prepared.output(model)
        self.machine = self.prepared.machine(model, self.request.provisional, steer)
        if self.request.prompt_logprobs is not None:
            self.scorer = PromptScorer(self.prepared.prompt_ids, self.request.prompt_logprobs)

    def advance(self, reply: torch.Tensor | None) -> GenerationResult | None:
        """Send the machine its logits and run it to its next forward (cache commits and events on the way).
        Returns the result when the request is over."""
        self.pending, self.chunk_done, self.pieces = None, 0, []
        if self.request.max_new_tokens == 0 and (self.scorer is None or self.scorer.done):
            return self.scored()
        while True:
            try:
                op = self.machine.send(reply)
            except StopIteration:
                return self.result()
            reply = None
            if isinstance(op, Forward):
                if self.scorer is not None and not self.scorer.done and not scores_prompt(op, self.scorer.prompt):
                    raise ValueError(f"prompt_logprobs: the first pass of {self.prepared.mode} is not a causal pass "
                                     "over the prompt (use ar, linear_spec, quadratic_spec or auto)")
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
        read = list(range(t)) if f.logits == "all" else ([t - 1] if f.logits == "last" else list(f.logits))
        if self.scoring:  # the prompt's positions too, in order, each once
            read = sorted(set(read) | set(self.scorer.positions))
        self.read = [i for i in read if start <= i < end]  # a chunk reads only the logits it holds
        if positions is not None:
            positions = positions[start:end].reshape(-1)
        whole = f.logits == "all" and (start, end) == (0, t)
        return Row(self.cache, f.ids[0, start:end], positions, f.mask, f.lora,
                   None if whole else [i - start for i in self.read])

    @property
    def scoring(self) -> bool:
        """Whether the pending pass is the first one of a request that scores its prompt."""
        return self.scorer is not None and not self.scorer.done

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
        wanted = None if f.logits == "all" else {f.tokens - 1} if f.logits == "last" else set(f.logits)
        if self.scoring:
            prompt = set(self.scorer.positions)
            self.scorer.add([p for p in self.read if p in prompt], logits[[i for i, p in enumerate(self.read)
                                                                           if p in prompt]])
            logits = logits[[i for i, p in enumerate(self.read) if wanted is None or p in wanted]]
        self.pieces.append(logits)
        if self.chunk_done < f.tokens:
            return None
        if self.scorer is not None:
            self.scorer.done = True
        logits = torch.cat(self.pieces) if len(self.pieces) > 1 else self.pieces[0]
        return logits[None] if f.logits != "last" else logits  # [1, n, V] or [1, V] as the batch-1 driver gives

    def result(self, finish: str | None = None) -> GenerationResult:
        self.status = Status.FINISHED
        result = self.output.result(finish, time.perf_counter() - self.started)
        if self.scorer is not None and self.scorer.done:
            result.prompt_logprobs = self.scorer.entries
        return result

    def scored(self) -> GenerationResult:
        """A request with max_new_tokens=0 is over: its prompt was scored (one pass), or nothing was asked."""
        self.machine.close()
        result = self.result("length")
        result.stats.forward_passes = int(self.scorer is not None)
        return result
