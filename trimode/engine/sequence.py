"""A request inside the engine: its step machine, its pages, the pass it waits for, and its output so far."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

import torch

from trimode.decode.result import GenerationResult
from trimode.decode.step import Commit, Committed, Forward, Machine, Provisional
from trimode.engine.kv_pool import PagedCache
from trimode.engine.request import EngineRequest, RequestHandle
from trimode.engine.runner import Row
from trimode.engine.scoring import PromptScorer, scores_prompt
from trimode.model.handle import ModelHandle
from trimode.model.masks import QuadraticInit, QuadraticStep
from trimode.request import EditOutput, Prepared, TextOutput


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class Sequence:
    handle: RequestHandle
    prepared: Prepared
    kv_slots: int  # the most KV slots it uses (the whole pool must hold them: checked at submission)
    admit_slots: int = 0  # KV slots its first pass needs (admission waits until that many are available)
    status: Status = Status.WAITING
    cache: PagedCache | None = None
    machine: Machine | None = None
    pending: Forward | None = None  # the pass it waits for
    last: Forward | None = None  # the pass it ran last (a Commit keeps some of its tokens)
    # The token ids of `pending` / `last` as a host list (row 0), which key the pages they fill in the prefix cache:
    # the engine reads every row's in one transfer per step (`read_pending_ids`); None while nobody needs them.
    pending_ids: list[int] | None = None
    last_ids: list[int] | None = None
    chunk_done: int = 0  # tokens of `pending` already run or found in the prefix cache
    commit_skip: int = 0  # tokens of `last` that were in the prefix cache already (its Commit counts them)
    output: TextOutput | EditOutput | None = None  # what the client sees (from the first `start` on)
    started: float = 0.0
    sent: int = 0  # output tokens the current machine emitted
    replay: int = 0  # output tokens the client has already: a restarted machine's first ones are not sent again
    preemptions: int = 0
    cached_tokens: int = 0  # prompt tokens its first admission found in the prefix cache
    scorer: PromptScorer | None = None  # the prompt logprobs, read from the first pass (`prompt_logprobs`)
    read: list[int] = field(default_factory=list)  # this step's row: the positions of `pending` it reads
    pieces: list[torch.Tensor] = field(default_factory=list)  # the machine's logits from the chunks run so far

    @property
    def request(self) -> EngineRequest:
        return self.handle.request

    def start(self, model: ModelHandle, cache: PagedCache, steer, now: float) -> None:
        """Run on `cache` (empty) from the start: first admission, or again after a preemption."""
        self.cache, self.status = cache, Status.RUNNING
        if self.output is None:
            # The handle's reader decodes the text where it can (off the loop thread: `RequestHandle.text`).
            self.output, self.started = self.prepared.output(model, self.handle.decode is not None), now
        self.machine = self.prepared.machine(model, self.request.provisional, steer)
        if self.request.prompt_logprobs is not None:
            self.scorer = PromptScorer(self.prepared.prompt_ids, self.request.prompt_logprobs)

    def adopt_prefix(self) -> int:
        """Before its first pass runs: take the longest cached prefix of its prompt (full pages, never the last
        prompt token, whose logits the machine needs) and skip computing it. Only a causal prompt pass from
        position 0 qualifies (a bidirectional one computes other values). Returns the tokens found."""
        f = self.pending
        if f is None or self.cache.length or f.positions is not None or f.rows != 1:
            return 0
        if self.request.prompt_logprobs is not None:
            return 0  # scoring reads the logits of every prompt position: the whole prompt is computed
        if isinstance(f.mask, QuadraticInit):
            prompt = f.mask.prompt_len
        elif _causal(f.mask) and f.cache == "append":
            prompt = f.tokens
        else:
            return 0
        found = self.cache.adopt_prefix(self.host_ids()[:prompt], prompt - 1)
        self.chunk_done = found
        self.commit_skip = found if f.cache == "read" else 0
        if self.preemptions == 0:
            self.cached_tokens = found
        return found

    def advance(self, reply: torch.Tensor | None) -> GenerationResult | None:
        """Send the machine its logits and run it to its next forward (cache commits and events on the way).
        Returns the result when the request is over."""
        self.last, self.pending, self.chunk_done, self.pieces = self.pending, None, 0, []
        self.last_ids, self.pending_ids = self.pending_ids, None
        if self.handle.request.max_new_tokens == 0 and (self.scorer is None or self.scorer.done):
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
                self.pending, self.pending_ids = op, op.host_ids
                return None
            if isinstance(op, Commit):
                self._commit(op)
                continue
            op = self._unseen(op)
            if op is None:
                continue
            for event in self.output.events(op):
                self.handle._put(event, wake=False)  # the engine wakes the client after the step
            if self.output.stop_hit:
                self.machine.close()
                return self.result()

    def _commit(self, op: Commit) -> None:
        """Keep K/V of the last pass, telling the cache which tokens they are and whether they are causal."""
        f, skip, self.commit_skip = self.last, self.commit_skip, 0
        known = self.cache.clean  # only a cache that may still publish pages needs the tokens
        if known and self.last_ids is None:
            self.last_ids = f.id_tensor()[0].tolist()
        if op.slots is not None:
            step = isinstance(f.mask, QuadraticStep)  # its leaders (slot 0 of each group) see only leaders
            causal = (step and all(s % (f.mask.block + 1) == 0 for s in op.slots)) or _causal(f.mask)
            ids = [self.last_ids[s] for s in op.slots] if known and causal else None
            self.cache.commit_slots(op.slots, ids, causal, f.lora)
            return
        init = isinstance(f.mask, QuadraticInit)  # its prompt part is causal
        causal = (init and op.n <= f.mask.prompt_len) or _causal(f.mask)
        ids = self.last_ids[skip : op.n] if known and causal else None
        self.cache.commit(op.n - skip, ids, causal, f.lora)

    def _unseen(self, op):
        """The part of a machine event the client has not seen: after a preemption the restarted machine
        replays its output (deterministic: keyed sampling), and what was sent before is dropped."""
        if isinstance(op, Committed) and self.sent < self.replay:
            new = op.tokens[0]
            seen = min(len(new), self.replay - self.sent)
            self.sent += len(new)
            return None if seen == len(new) else Committed([new[seen:]], op.stats)
        if isinstance(op, Committed):
            self.sent += len(op.tokens[0])
        elif isinstance(op, Provisional) and self.sent < self.replay:
            return None
        return op

    def preempt(self) -> None:
        """Back to waiting (the pool ran dry): the machine and the pages go, the output stays; it restarts from
        scratch when admitted again and replays up to what the client has."""
        if self.machine is not None:
            self.machine.close()
        if self.cache is not None:
            self.cache.free()
        self.machine = self.cache = self.pending = self.last = self.pending_ids = self.last_ids = None
        self.chunk_done = self.commit_skip = 0
        self.replay, self.sent = max(self.replay, self.sent), 0
        self.status = Status.WAITING
        self.preemptions += 1

    def next_row(self, prefill_chunk: int) -> Row:
        """The part of `pending` to run this step: all of it, or the next chunk of a long causal prompt pass (or
        what the prefix cache did not hold)."""
        f = self.pending
        t = f.tokens
        start, end = self.chunk_done, t
        if f.logits == "last" and not start and self.scorer is None and not self.chunkable(prefill_chunk):
            self.read = [t - 1]  # the common case (an AR step, a short prompt pass): the whole pass, its last logits
            positions = f.positions if f.positions is None or f.positions.dim() == 1 else f.positions.reshape(-1)
            ids = f.host_ids if f.ids is None else f.ids[0]  # an AR step's host list: batched by the runner
            return Row(self.cache, ids, positions, f.mask, f.lora, self.read)
        positions = f.positions  # None: right after the cache (a chunk's earlier chunks are committed by then)
        mask = f.mask
        if start and isinstance(mask, QuadraticInit):
            mask = QuadraticInit(mask.prompt_len - start)  # its cached prompt part is the row's prefix now
        if self.chunkable(prefill_chunk):
            end = min(t, start + prefill_chunk)
        read = list(range(t)) if f.logits == "all" else ([t - 1] if f.logits == "last" else list(f.logits))
        if self.scoring:  # the prompt's positions too, in order, each once
            read = sorted(set(read) | set(self.scorer.positions))
        self.read = [i for i in read if start <= i < end]  # a chunk reads only the logits it holds
        if positions is not None:
            positions = positions[start:end].reshape(-1)
        whole = f.logits == "all" and (start, end) == (0, t)
        return Row(self.cache, f.id_tensor()[0, start:end], positions, mask, f.lora,
                   None if whole else [i - start for i in self.read])

    @property
    def needs_ids(self) -> bool:
        """Whether the prefix cache needs the ids of `pending` on the host and they are not read yet."""
        return self.pending is not None and self.pending_ids is None and self.cache.clean

    def host_ids(self) -> list[int]:
        """The ids of `pending` as a list (read here when the engine's batched read did not include them)."""
        if self.pending_ids is None:
            self.pending_ids = self.pending.id_tensor()[0].tolist()
        return self.pending_ids

    @property
    def scoring(self) -> bool:
        """Whether the pending pass is the first one of a request that scores its prompt."""
        return self.scorer is not None and not self.scorer.done

    def chunkable(self, prefill_chunk: int) -> bool:
        f = self.pending
        return (f.tokens > prefill_chunk and _causal(f.mask) and f.cache == "append" and f.logits != "all")

    def ran(self, row: Row, logits: torch.Tensor) -> torch.Tensor | None:
        """A row of `pending` ran: the logits to send when the pass is complete, else None (more chunks)."""
        f = self.pending
        if f.cache == "append":
            causal = _causal(row.mask)
            ids = None
            if self.cache.clean and causal:
                ids = self.host_ids()[self.chunk_done : self.chunk_done + row.tokens]
            self.cache.commit(row.tokens, ids, causal, row.lora)
        self.chunk_done += row.tokens
        if self.scoring:
            wanted = None if f.logits == "all" else {f.tokens - 1} if f.logits == "last" else set(f.logits)
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
        result.stats.cached_tokens = self.cached_tokens
        if self.scorer is not None and self.scorer.done:
            result.prompt_logprobs = self.scorer.entries
        return result

    def scored(self) -> GenerationResult:
        """A request with max_new_tokens=0 is over: its prompt was scored (one pass), or nothing was asked."""
        self.machine.close()
        result = self.result("length")
        result.stats.forward_passes = int(self.scorer is not None)
        return result


def read_pending_ids(seqs: list[Sequence]) -> None:
    """The ids of every pending pass the prefix cache will need, read to the host in one transfer (not one per
    row: on a GPU each read waits for the device)."""
    need = [s for s in seqs if s.needs_ids]
    if not need:
        return
    parts = [s.pending.id_tensor() for s in need]  # [1, T] each
    if len({p.device for p in parts}) > 1:
        parts = [p.cpu() for p in parts]
    flat = (torch.cat(parts, 1) if len(parts) > 1 else parts[0])[0].tolist()
    at = 0
    for s in need:
        t = s.pending.tokens
        s.pending_ids, at = flat[at : at + t], at + t


def _causal(mask) -> bool:
    return isinstance(mask, str) and mask == "causal"
