"""The engine: many requests at once on one model, their step machines driven by one loop.

    engine = Engine(tm, max_queue=64, kv_cache_tokens=None, prefix_cache=True).start()
    handle = engine.submit(EngineRequest(prompt_ids=[...], mode="ar", max_new_tokens=32))
    for ev in handle: ...            # Delta / BlockState events, then the GenerationResult
    engine.stop()

One step of the loop (`step`), as nano-vllm's engine: admit waiting requests and run each new machine to its
first forward, its prompt's longest cached prefix taken from the prefix cache; group every running request's
pending pass by width, each cache grown page by page to hold its pass (the newest requests preempted when the
pool runs dry); run one fused forward per group over the shared KV pool; send each machine its logits and run it
to its next forward (cache commits, which publish full causal pages in the prefix cache, and events on the way);
finished and cancelled requests leave and their pages go back. No thread
per request: the loop runs in one background thread (`start`), or in the caller's (`step`, for tests that
control arrival times). Because a row's logits do not depend on the other rows of its forward, a request's output
is the same as when it runs alone (exactly so in float64; see docs/engine.md for float32).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from dataclasses import asdict, astuple, dataclass, replace

import torch

from trimode.decode.decide import decide
from trimode.decode.modes import mode_spec
from trimode.decode.result import GenerationResult
from trimode.decode.stats import DecodeStats
from trimode.engine.auto import AutoConfig, AutoPolicy, AutoSteer, CostModel, measure_slowdowns
from trimode.engine.kv_pool import KVPool
from trimode.engine.request import EngineRequest, EngineStopped, QueueFull, RequestCancelled, RequestHandle, Wakeups
from trimode.engine.runner import run_step
from trimode.engine.scheduler import Scheduler
from trimode.engine.sequence import Sequence, Status, read_pending_ids
from trimode.model.handle import ModelHandle
from trimode.model.masks import QuadraticInit, QuadraticStep
from trimode.request import Prepared, fill_request, infill_request, prepare, revise_request

log = logging.getLogger("trimode.engine")


@dataclass(frozen=True)
class ForwardShape:
    """One width group of a fused forward: rows, tokens per row, the longest prefix, its mask kinds, the adapter,
    and how many positions went through the LM head (a benchmark replays these on the bare network)."""

    rows: int
    tokens: int
    past: int
    masks: tuple
    lora: tuple[bool, ...]
    logits: int

    @classmethod
    def of(cls, rows) -> list[ForwardShape]:
        widths: dict[int, list] = {}
        for r in rows:
            widths.setdefault(r.tokens, []).append(r)
        return [cls(len(g), t, max(r.cache.length for r in g),
                    tuple(["tensor" if isinstance(r.mask, torch.Tensor) else r.mask for r in g]),
                    tuple([r.lora for r in g]), sum([t if r.read is None else len(r.read) for r in g]))
                for t, g in widths.items()]


def shape_to_json(shape: ForwardShape) -> dict:
    """A ForwardShape as JSON (a benchmark's trace crossing a process boundary); `shape_from_json` reverses it."""
    masks = [m if isinstance(m, str) else {type(m).__name__: astuple(m)[0]} for m in shape.masks]
    return {**asdict(shape), "masks": masks}


def shape_from_json(d: dict) -> ForwardShape:
    kinds = {"QuadraticInit": QuadraticInit, "QuadraticStep": QuadraticStep}
    masks = tuple(m if isinstance(m, str) else kinds[next(iter(m))](next(iter(m.values()))) for m in d["masks"])
    return ForwardShape(d["rows"], d["tokens"], d["past"], masks, tuple(d["lora"]), d["logits"])
DEFAULT_KV_BYTES = {"cuda": 0.5, "cpu": 1 << 30}  # CUDA: half the free memory; CPU: 1 GiB
DEFAULT_PASS_BYTES = {"cuda": 0.25, "cpu": 2 << 30}  # the widest pass's activations: CUDA a quarter of free memory


class Engine:
    """Runs submitted requests concurrently on `tm` (a model handle: `trimode.load()`'s `TriMode` is one); forwards
    of different requests share batches.

    max_queue: requests waiting beyond the running ones (more are rejected with QueueFull). kv_cache_tokens: KV
    pool size in tokens (None: half the free GPU memory, 1 GiB on CPU; `kv_budget_tokens` is its former name).
    prefix_cache: keep full causal pages for later requests that start with the same tokens (every mode and edit
    shares them; `reset_prefix_cache` forgets them). max_running: rows decoding at once.
    max_batch_tokens: most tokens in one forward. prefill_chunk: a causal prompt pass longer than this runs in
    chunks, one per step. max_pass_bytes: a request whose widest pass needs more activation memory than this is
    rejected (None: a quarter of the free GPU memory, 2 GiB on CPU). auto: the `mode: auto` settings (the cost
    curve and each choice's slowdown are measured at `start()`; pass `cost` to skip both).
    """

    def __init__(self, tm: ModelHandle, max_queue: int = 64, kv_budget_tokens: int | None = None, max_running: int = 64,
                 max_batch_tokens: int = 8192, prefill_chunk: int = 512, page_size: int = 16,
                 auto: AutoConfig | None = None, cost: CostModel | None = None,
                 max_pass_bytes: int | None = None, prefix_cache: bool = True,
                 kv_cache_tokens: int | None = None) -> None:
        if max_queue < 0 or max_running < 1 or max_batch_tokens < 1 or prefill_chunk < 1 or page_size < 1:
            raise ValueError("max_queue >= 0; max_running, max_batch_tokens, prefill_chunk, page_size >= 1")
        self.tm = tm
        net = tm.net
        cuda = net.device.type == "cuda"
        free = torch.cuda.mem_get_info(net.device)[0] if cuda else 0
        kv_budget_tokens = kv_cache_tokens if kv_cache_tokens is not None else kv_budget_tokens
        if kv_budget_tokens is None:
            per_token = KVPool.bytes_per_token(tm.config, net.dtype)
            kv_budget_tokens = (int(free * DEFAULT_KV_BYTES["cuda"]) if cuda else DEFAULT_KV_BYTES["cpu"]) // per_token
        if max_pass_bytes is None:
            max_pass_bytes = int(free * DEFAULT_PASS_BYTES["cuda"]) if cuda else DEFAULT_PASS_BYTES["cpu"]
        self.kv_budget_tokens = kv_budget_tokens
        self.max_pass_bytes = max_pass_bytes
        salt = f"{type(net).__name__}:{id(net)}:{net.dtype}"  # one network: the cache is this engine's
        self.pool = KVPool(tm.config, net.dtype, net.device, kv_budget_tokens, page_size, prefix_cache, salt)
        self.scheduler = Scheduler(self.pool, max_queue, max_running, max_batch_tokens, prefill_chunk)
        self.auto_config = auto or AutoConfig()
        self._cost = cost
        self.policy: AutoPolicy | None = None
        self._lock = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._counters: Counter = Counter()
        self._advanced: list[Sequence] = []  # the step's advanced requests: their clients are woken after it
        self.trace: list[ForwardShape] | None = None  # set to a list to record every fused forward (benchmarks)

    # -- public API --------------------------------------------------------------------------------------
    def start(self) -> Engine:
        """Measure the cost curve (once) and start the step loop in a background thread."""
        self._ensure_policy()
        if self._thread is None:
            self._stopping = False
            self._thread = threading.Thread(target=self._loop, name="trimode-engine", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        """Stop the loop; requests not finished yet end with EngineStopped."""
        with self._lock:
            self._stopping = True
            self._lock.notify_all()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        with self._lock:
            for seq in list(self.scheduler.running):
                self._end(seq, error=EngineStopped("the engine stopped"))
            for seq in self.scheduler.waiting:
                seq.handle._fail(EngineStopped("the engine stopped before this request started"))
            self.scheduler.waiting.clear()

    def __enter__(self) -> Engine:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def validate(self, request: EngineRequest) -> Prepared:
        """The request as it will run; ValueError naming the problem when it can never run here."""
        if not isinstance(request.prompt_ids, list):
            raise ValueError("prompt_ids must be a list of token ids")
        scoring = request.prompt_logprobs
        if scoring is not None and (isinstance(scoring, bool) or not isinstance(scoring, int)
                                    or not 0 <= scoring <= self.tm.config.vocab_size):
            raise ValueError(f"prompt_logprobs must be an integer in [0, {self.tm.config.vocab_size}], got {scoring!r}")
        if isinstance(request.max_new_tokens, int) and request.max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0 (0: only the prompt's pass), got {request.max_new_tokens}")
        editing = request.edit is not None or mode_spec(request.mode).editing
        if editing:
            if scoring is not None:
                raise ValueError("prompt_logprobs does not apply to an edit")
            req = self._prepare_edit(request)
        else:
            # max_new_tokens=0: the prompt alone (scored when asked); it runs as a request of one token that ends
            # after its first pass (`Sequence.advance`).
            new = 1 if request.max_new_tokens == 0 else request.max_new_tokens
            req = prepare(self.tm, request.prompt_ids, request.mode, new, request.temperature,
                          request.top_p, request.top_k, request.seed, request.stop, constraint=request.constraint,
                          repetition_penalty=request.repetition_penalty, frequency_penalty=request.frequency_penalty,
                          presence_penalty=request.presence_penalty, logit_bias=request.logit_bias,
                          min_tokens=request.min_tokens, logprobs=request.logprobs, **request.knobs)
            if request.ignore_eos:  # a forced length: no token ends it early
                if request.constraint is not None:
                    raise ValueError("ignore_eos cannot be used with structured output (the grammar ends it)")
                req.rule = replace(req.rule, eos_token_ids=frozenset())
        spec = mode_spec(req.mode)
        needed = req.kv_slots()
        if self.pool.pages_for(needed) > self.pool.num_pages:
            raise ValueError(f"the request needs {needed} KV cache slots; the engine's budget is "
                             f"{self.pool.capacity_tokens} (kv_cache_tokens)")
        item = torch.empty((), dtype=self.tm.net.dtype).element_size()
        peak = spec.peak_activation_bytes(self.tm.config, len(req.prompt_ids), req.rule.max_new_tokens, req.knobs,
                                          item, self.scheduler.prefill_chunk)
        if peak > self.max_pass_bytes:
            what = "block_length" if "block_length" in spec.knob_names else "the prompt length"
            raise ValueError(f"{req.mode} with block_length {getattr(req.knobs, 'block_length', '-')} and a "
                             f"{len(req.prompt_ids)}-token prompt needs about {peak / 2**20:.0f} MiB for its widest "
                             f"pass; this engine allows {self.max_pass_bytes / 2**20:.0f} MiB (max_pass_bytes): "
                             f"lower {what}")
        return req

    def _prepare_edit(self, request: EngineRequest) -> Prepared:
        if request.mode != "edit" or not (isinstance(request.edit, tuple) and len(request.edit) == 2):
            raise ValueError('an edit runs in mode "edit" with edit=(kind, arguments)')
        kind, args = request.edit
        sampling = dict(temperature=request.temperature, top_p=request.top_p, top_k=request.top_k,
                        seed=request.seed, **request.knobs)
        if kind == "infill":
            return infill_request(self.tm, request.prompt_ids, args.get("suffix", []), request.max_new_tokens,
                                  heal=bool(args.get("heal", False)), stop=request.stop, **sampling)
        if kind == "revise":
            return revise_request(self.tm, request.prompt_ids, args.get("draft", []), args.get("spans"), **sampling)
        if kind == "fill":
            return fill_request(self.tm, args.get("template"), args.get("hole_tokens", 8), **sampling)
        raise ValueError(f"unknown edit {kind!r}; use infill, revise or fill")

    def submit(self, request: EngineRequest) -> RequestHandle:
        """Queue a request (ValueError when invalid, QueueFull when at capacity, EngineStopped when stopped)."""
        prepared = self.validate(request)
        handle = RequestHandle(request, self.tm.tokenizer.decode if self.tm.tokenizer is not None else None)
        with self._lock:
            if self._stopping:
                raise EngineStopped("the engine is stopped")
            try:
                self.scheduler.add(Sequence(handle, prepared, prepared.kv_slots(), _first_pass_slots(prepared)))
            except QueueFull:
                self._counters["rejected"] += 1
                raise
            self._counters["submitted"] += 1
            self._counters[f"submitted_{request.mode}"] += 1
            self._lock.notify_all()
        return handle

    def stats(self) -> dict:
        with self._lock:
            s = self.scheduler
            out = {
                "queue_depth": len(s.waiting),
                "running_requests": len(s.running),
                "running_rows": len(s.running),
                "max_queue": s.max_queue,
                "max_running": s.max_running,
                "kv_budget_tokens": self.pool.capacity_tokens,
                "kv_free_tokens": self.pool.available_pages * self.pool.page_size,  # free or idle in the cache
                "kv_page_size": self.pool.page_size,
                "kv_pages_used": self.pool.used_pages,
                "kv_pages_cached": self.pool.cached_pages,
                "kv_pages_free": self.pool.free_pages,
                "prefix_cache": self.pool.cache is not None,
                "prefix_cache_queries": self.pool.cache.queries if self.pool.cache is not None else 0,
                "prefix_cache_hits": self.pool.cache.hits if self.pool.cache is not None else 0,
                "preemptions": s.preempted,
                "max_pass_bytes": self.max_pass_bytes,
                "counters": dict(self._counters),
            }
        if self.policy is not None:
            out["auto"] = self.policy.as_dict()
        return out

    def reset_prefix_cache(self) -> int:
        """Forget every cached KV page (tests, and after changing the weights); returns how many there were.
        Pages running requests hold stay theirs."""
        with self._lock:
            return self.pool.reset_prefix_cache()

    # -- benchmark hooks (trimode bench gpu) -----------------------------------------------------------------
    def fill_kv_random(self) -> None:
        """Fill the K/V pool with random values (torch's global RNG; the null slot stays zero): a benchmark that
        skips the prompt passes gets a cache as costly to read as a computed one."""
        with torch.no_grad():
            for buf in (self.pool.k, self.pool.v):
                buf.normal_()
                buf[:, 0] = 0

    def prompts_pending(self) -> int:
        """Requests waiting, or running with part of their prompt not in the cache yet."""
        with self._lock:
            s = self.scheduler
            return len(s.waiting) + sum(q.cache.length < len(q.prepared.prompt_ids) for q in s.running)

    def traced_step(self) -> list[list[ForwardShape]]:
        """`step`, and the width groups of every fused forward it ran (one list per forward; none: nothing ran)."""
        self.trace = []
        try:
            self.step()
            return self.trace
        finally:
            self.trace = None

    # -- the step loop -----------------------------------------------------------------------------------
    def step(self) -> bool:
        """Admit, run one fused forward per group of pending passes, advance the machines, free the finished.

        Returns False when there was nothing to do. The background loop calls this; tests may call it directly
        (without `start()`) to control arrival times exactly. The clients whose requests made events are woken
        once, at the end of the step: one call into each asyncio reader's event loop for all its requests (a
        server's handlers share one loop: one wake-up per step, not one per request)."""
        try:
            return self._step()
        finally:
            advanced, self._advanced = self._advanced, []
            wakeups = Wakeups()
            for seq in advanced:
                seq.handle._wake(wakeups)
            wakeups.fire()

    def _step(self) -> bool:
        self._ensure_policy()
        t_begin = time.perf_counter()
        with self._lock:
            admitted, dropped = self.scheduler.admit()
            for seq in dropped:  # a preempted request keeps what it had output
                seq.handle._finish(seq.result("cancelled") if seq.output is not None
                                   else _cancelled(seq.request, self.tm))
                self._counters["cancelled"] += 1
        for seq in admitted:
            steer = None
            if mode_spec(seq.prepared.mode).engine_only:
                steer = AutoSteer(self.policy, seq.prepared.knobs.block_length)
            seq.start(self.tm, seq.cache, steer, time.perf_counter())
            self._advance(seq, None)
        read_pending_ids(self.scheduler.running)  # one host read of every row's ids the prefix cache needs
        for seq in admitted:
            if seq.status is Status.RUNNING:
                seq.adopt_prefix()
        for seq in list(self.scheduler.running):
            if seq.handle.cancelled:
                self._end(seq, error=RequestCancelled())
        batches = self.scheduler.plan()
        if not batches:
            return bool(admitted or dropped)
        timings = []
        ready: list[tuple[Sequence, torch.Tensor, object]] = []  # passes complete: (request, its logits, reply)
        for batch in batches:
            t1 = time.perf_counter()
            rows = [row for _, row in batch]
            try:
                logits = run_step(self.tm.net, self.pool, rows)
                if logits[0].device.type == "cuda":
                    torch.cuda.synchronize(logits[0].device)  # so the forward's time is measured, not its launch
            except Exception as e:  # a failed forward fails its rows' requests, not the engine
                log.exception("a forward failed; failing its %d requests", len(batch))
                for seq, _ in batch:
                    self._end(seq, error=e)
                continue
            tokens = sum(r.tokens for r in rows)
            timings.append((tokens, time.perf_counter() - t1))
            if self.trace is not None:
                self.trace.append(ForwardShape.of(rows))  # one list per fused forward
            self._counters["forwards"] += 1
            self._counters["forward_rows"] += len(rows)
            self._counters["forward_tokens"] += tokens
            for (seq, row), out in zip(batch, logits):
                reply = seq.ran(row, out)
                if reply is not None:  # the pass is complete: its logits (every chunk's, scores taken out)
                    ready.append((seq, reply if reply.dim() == 2 else reply.reshape(-1, reply.shape[-1]), reply))
        for seq, reply in self._decide(ready):
            self._advance(seq, reply)
        self._counters["steps"] += 1
        if self.policy is not None:
            self.policy.observe_step(time.perf_counter() - t_begin, timings, len(self.scheduler.running) or 1)
        return True

    def _decide(self, ready: list[tuple[Sequence, torch.Tensor, object]]) -> list[tuple[Sequence, object]]:
        """The decision stage for every complete pass of the step at once (one host transfer): a machine whose
        Forward carries a pick gets its Decision, the others their logits."""
        picked = [(seq, out) for seq, out, _ in ready if seq.pending.pick is not None]
        decisions: dict[int, object] = {}
        if picked:
            try:
                made = decide([out for _, out in picked], [seq.pending.pick for seq, _ in picked])
                decisions = {id(seq): d for (seq, _), d in zip(picked, made)}
            except Exception as e:  # a failed decision fails its requests, not the engine
                log.exception("the decision stage failed; failing its %d requests", len(picked))
                for seq, _ in picked:
                    self._end(seq, error=e)
                return [(seq, reply) for seq, _, reply in ready if seq.pending.pick is None]
        return [(seq, decisions.get(id(seq), reply)) for seq, _, reply in ready]

    def _advance(self, seq: Sequence, reply) -> None:
        self._advanced.append(seq)
        try:
            result = seq.advance(reply)
        except Exception as e:  # a failing machine fails its request, not the engine
            log.exception("request %s failed", seq.request.request_id)
            self._end(seq, error=e)
            return
        if result is not None:
            self._end(seq, result=result)

    def _end(self, seq: Sequence, result: GenerationResult | None = None, error: BaseException | None = None) -> None:
        """The request leaves: pages freed, the handle told, counters kept."""
        mode = seq.request.mode
        with self._lock:
            if seq in self.scheduler.running:
                self.scheduler.finish(seq)
        if seq.machine is not None:
            seq.machine.close()
        if isinstance(error, RequestCancelled):
            result, error = (seq.result("cancelled") if seq.output is not None
                             else _cancelled(seq.request, self.tm)), None
        outcome = "failed" if error is not None else ("cancelled" if result.finish_reason == "cancelled"
                                                       else "finished")
        with self._lock:
            self._counters[outcome] += 1
            self._counters[f"{outcome}_{mode}"] += 1
            if outcome == "finished":
                self._counters[f"tokens_{mode}"] += len(result.token_ids)
        if error is not None:
            seq.handle._fail(error)
        else:
            result.mode = result.stats.mode = mode
            seq.handle._finish(result)

    def _loop(self) -> None:
        while True:
            with self._lock:
                while not self._stopping and not self.scheduler.waiting and not self.scheduler.running:
                    self._lock.wait()
                if self._stopping:
                    return
            try:
                progressed = self.step()
            except Exception as e:  # a failing step must not leave every client waiting forever
                log.exception("engine step failed; failing the requests it held")
                for seq in list(self.scheduler.running):
                    self._end(seq, error=e)
                continue
            if not progressed:
                with self._lock:  # only waiting requests that do not fit yet: wait for a change
                    if not self._stopping:
                        self._lock.wait(timeout=0.05)

    def _ensure_policy(self) -> None:
        if self.policy is None:
            cost = self._cost or CostModel.measure(self.tm.net, self.auto_config.cost_sizes)
            self.policy = AutoPolicy(self.auto_config, cost, lambda: len(self.scheduler.running))
            if self._cost is None:  # tests that pass a cost curve skip the start-up measurements
                self.policy.slowdowns = measure_slowdowns(self.tm.net, cost, self.tm.config.block_size,
                                                          self.auto_config)


def _first_pass_slots(req: Prepared) -> int:
    """KV slots a request's first pass needs: its prompt and the widest pass after it (an edit: its whole block)."""
    spec = mode_spec(req.mode)
    if spec.pass_tokens is None:
        return req.kv_slots()
    return min(req.kv_slots(), len(req.prompt_ids) + spec.widest_pass(len(req.prompt_ids), req.knobs))


def _cancelled(req: EngineRequest, tm: ModelHandle) -> GenerationResult:
    """The result of a request cancelled before it started."""
    stats = DecodeStats(req.mode, prompt_tokens=len(req.prompt_ids))
    return GenerationResult([], "" if tm.tokenizer else None, stats, "cancelled", req.mode, dict(req.knobs))
