"""The engine: many requests at once on one model, their forward passes fused step by step.

    engine = Engine(tm, max_queue=64, kv_budget_tokens=None).start()
    handle = engine.submit(EngineRequest(prompt_ids=[...], mode="ar", max_new_tokens=32))
    for ev in handle: ...            # Delta / BlockState events, then the GenerationResult
    engine.stop()

How it runs. Each admitted request runs `TriMode.stream` in its own thread against a `ForwardProxy` (see
`runner.py`), so the four decode modes run unchanged; their forward calls park the thread. One step of the
loop waits until every running request is parked on a forward (or finished), groups the calls (`Scheduler.plan`)
and runs each group as one batched forward over the shared KV pool, then wakes the requests with their logits.
Finished and cancelled requests leave (their pages go back to the pool) and waiting ones are admitted between
steps. Because a row's logits do not depend on the other rows of its forward, a request's output is the same
as when it runs alone (exactly so in float64; see docs/engine.md for float32).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter

import torch

from trimode.api import Delta, GenerationResult, TriMode
from trimode.decode.sampling import SamplingParams
from trimode.decode.stats import DecodeStats
from trimode.engine.auto import AutoConfig, AutoPolicy, AutoSteer, CostModel, auto_decode, measure_slowdowns
from trimode.engine.kv_pool import KVPool
from trimode.engine.request import MODES, EngineRequest, EngineStopped, QueueFull, RequestHandle
from trimode.engine.runner import ForwardCall, ForwardProxy, RequestCancelled, run_batched
from trimode.engine.scheduler import Scheduler, Sequence, kv_tokens_needed

STREAM_KNOBS = ("block_length", "threshold", "causal_context", "use_drafter", "ar_mix_weight", "eos_token_id",
                "max_thinking_tokens", "end_think_token_id")
MODE_KNOBS = ("block_length", "threshold", "causal_context", "use_drafter", "ar_mix_weight")
log = logging.getLogger("trimode.engine")
DEFAULT_KV_BYTES = {"cuda": 0.5, "cpu": 1 << 30}  # CUDA: half the free memory; CPU: 1 GiB


def validate(tm: TriMode, req: EngineRequest) -> dict:
    """Raise ValueError for a request `TriMode.stream` would reject; return its effective mode knobs."""
    if req.mode not in MODES:
        raise ValueError(f"unknown mode {req.mode!r}; choose one of {', '.join(MODES)}")
    unknown = set(req.knobs) - set(STREAM_KNOBS)
    if unknown:
        raise ValueError(f"unknown knob(s) {', '.join(sorted(unknown))}; known: {', '.join(STREAM_KNOBS)}")
    if not isinstance(req.prompt_ids, list) or not all(isinstance(t, int) for t in req.prompt_ids):
        raise ValueError("prompt_ids must be a list of token ids")
    if not req.prompt_ids:
        raise ValueError("the prompt is empty")
    vocab = tm.config.vocab_size
    if any(not 0 <= t < vocab for t in req.prompt_ids):
        raise ValueError(f"prompt token ids must be in [0, {vocab})")
    if not isinstance(req.max_new_tokens, int) or req.max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {req.max_new_tokens}")
    if len(req.prompt_ids) + req.max_new_tokens > tm.max_context:
        raise ValueError(
            f"prompt ({len(req.prompt_ids)} tokens) + max_new_tokens ({req.max_new_tokens}) exceeds the context "
            f"length {tm.max_context}"
        )
    SamplingParams(req.temperature, req.top_p, req.top_k, req.seed)
    if req.stop is not None and not (isinstance(req.stop, list) and all(isinstance(s, str) for s in req.stop)):
        raise ValueError("stop must be a list of strings")
    if req.knobs.get("max_thinking_tokens") is not None and req.knobs.get("end_think_token_id") is None:
        if tm.tokenizer is None or tm.tokenizer.token_id("</think>") is None:
            raise ValueError("max_thinking_tokens needs end_think_token_id (no </think> token in the vocabulary)")
    given = {k: req.knobs.get(k) for k in MODE_KNOBS}
    if req.mode != "auto":
        return tm.knobs_for(req.mode, **given)
    # auto switches between lossless modes: only the speculation knobs apply.
    ignored = [k for k in ("threshold", "causal_context", "ar_mix_weight") if given[k] is not None]
    if ignored:
        raise ValueError(f"mode auto does not take {', '.join(ignored)} (it only uses block_length, use_drafter)")
    knobs = tm.knobs_for("linear_spec", block_length=given["block_length"], use_drafter=given["use_drafter"])
    return {"block_length": knobs["block_length"], "use_drafter": knobs["use_drafter"]}


class _RequestModel(TriMode):
    """A TriMode whose network is one request's ForwardProxy; an auto request decodes with `auto_decode`."""

    def __init__(self, tm: TriMode, proxy: ForwardProxy, steer: AutoSteer | None) -> None:
        super().__init__(proxy, tm.tokenizer, tm.path)  # type: ignore[arg-type]
        self.steer = steer

    def _decoder(self, mode, ids, stop, sampling, thinking, knobs, provisional):
        if self.steer is not None:  # streamed as "ar" (TriMode.stream knows no "auto"), decoded by auto
            return auto_decode(self.net, ids, stop, sampling, self.steer, thinking)
        return super()._decoder(mode, ids, stop, sampling, thinking, knobs, provisional)


class Engine:
    """Runs submitted requests concurrently on `tm`; forwards of different requests share batches.

    max_queue: waiting requests beyond this raise QueueFull. kv_budget_tokens: KV pool size in tokens (None:
    half the free GPU memory, 1 GiB on CPU). max_running: rows decoding at once. max_batch_tokens: most tokens
    in one forward. prefill_chunk: a causal pass longer than this runs in chunks, one per step. auto: the
    `mode: auto` settings (the cost curve and each mode's slowdown are measured at `start()`; pass `cost` to skip
    both).
    """

    def __init__(self, tm: TriMode, max_queue: int = 64, kv_budget_tokens: int | None = None, max_running: int = 64,
                 max_batch_tokens: int = 8192, prefill_chunk: int = 512, page_size: int = 16,
                 auto: AutoConfig | None = None, cost: CostModel | None = None) -> None:
        if max_queue < 0 or max_running < 1 or max_batch_tokens < 1 or prefill_chunk < 1 or page_size < 1:
            raise ValueError("max_queue >= 0; max_running, max_batch_tokens, prefill_chunk, page_size >= 1")
        self.tm = tm
        net = tm.net
        if kv_budget_tokens is None:
            per_token = KVPool.bytes_per_token(tm.config, net.dtype)
            if net.device.type == "cuda":
                free, _ = torch.cuda.mem_get_info(net.device)
                kv_budget_tokens = int(free * DEFAULT_KV_BYTES["cuda"]) // per_token
            else:
                kv_budget_tokens = DEFAULT_KV_BYTES["cpu"] // per_token
        self.kv_budget_tokens = kv_budget_tokens
        self.pool = KVPool(tm.config, net.dtype, net.device, kv_budget_tokens, page_size)
        self.scheduler = Scheduler(self.pool, max_queue, max_running, max_batch_tokens, prefill_chunk)
        self.auto_config = auto or AutoConfig()
        self._cost = cost
        self.policy: AutoPolicy | None = None
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._counters: Counter = Counter()

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
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        self._shutdown()

    def __enter__(self) -> Engine:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def submit(self, request: EngineRequest) -> RequestHandle:
        """Queue a request (ValueError when invalid, QueueFull when the queue is full)."""
        knobs = validate(self.tm, request)
        block = knobs.get("block_length", self.tm.config.block_size)
        needed = kv_tokens_needed(request, block)
        if self.pool.pages_for(needed) > self.pool.num_pages:
            raise ValueError(f"the request needs {needed} KV cache slots; the engine's budget is "
                             f"{self.pool.capacity_tokens} (kv_budget_tokens)")
        handle = RequestHandle(request)
        with self._cond:
            if self._stopping:
                raise EngineStopped("the engine is stopped")
            try:
                self.scheduler.add(Sequence(handle, needed, knobs))
            except QueueFull:
                self._counters["rejected"] += 1
                raise
            self._counters["submitted"] += 1
            self._counters[f"submitted_{request.mode}"] += 1
            self._cond.notify_all()
        return handle

    def stats(self) -> dict:
        with self._cond:
            s = self.scheduler
            out = {
                "queue_depth": len(s.waiting),
                "running_requests": len(s.running),
                "running_rows": len(s.running),
                "max_queue": s.max_queue,
                "max_running": s.max_running,
                "kv_budget_tokens": self.pool.capacity_tokens,
                "kv_free_tokens": self.pool.free_pages * self.pool.page_size,
                "counters": dict(self._counters),
            }
        if self.policy is not None:
            out["auto"] = self.policy.as_dict()
        return out

    # -- the step loop -----------------------------------------------------------------------------------
    def step(self) -> bool:
        """Admit, wait for every running request to park on a forward, run the fused forwards.

        Returns False when there was nothing to do. The background loop calls this; tests may call it directly
        (without `start()`) to control arrival times exactly.
        """
        self._ensure_policy()
        t_begin = time.perf_counter()
        with self._cond:
            admitted, dropped = self.scheduler.admit()
            for seq in admitted:
                self._launch(seq)
            for seq in dropped:
                seq.handle._finish(_cancelled_result(seq.request, [], ""))
                self._counters["cancelled"] += 1
            while any(seq.call is None and not seq.finished for seq in self.scheduler.running):
                self._cond.wait()
            self.scheduler.running = [seq for seq in self.scheduler.running if not seq.finished]
            calls = []
            for seq in self.scheduler.running:
                if seq.handle.cancelled or self._stopping:
                    error = RequestCancelled() if seq.handle.cancelled else EngineStopped("the engine stopped")
                    self._release(seq).finish(error=error)
                else:
                    calls.append(seq.call)
            by_call = {id(seq.call): seq for seq in self.scheduler.running if seq.call is not None}
        if not calls:
            return bool(admitted or dropped)
        timings = []
        for batch in self.scheduler.plan(calls):
            t1 = time.perf_counter()
            if self._run(batch, by_call):
                timings.append((sum(e - s for _, s, e in batch), time.perf_counter() - t1))
        with self._cond:
            self._counters["steps"] += 1
        if self.policy is not None:
            self.policy.observe_step(time.perf_counter() - t_begin, timings, len(calls))
        return True

    def _run(self, batch, by_call) -> bool:
        try:
            logits = run_batched(self.tm.net, self.pool, batch)
            if logits.device.type == "cuda":
                torch.cuda.synchronize(logits.device)  # so the forward's time is measured, not its launch
        except Exception as e:  # a failed forward fails its rows' requests, not the engine
            for call, _, _ in batch:
                with self._cond:
                    self._release(by_call[id(call)])
                call.finish(error=e)
            return False
        with self._cond:
            self._counters["forwards"] += 1
            self._counters["forward_rows"] += len(batch)
            self._counters["forward_tokens"] += sum(e - s for _, s, e in batch)
        for i, (call, _, end) in enumerate(batch):
            call.chunk_logits.append(logits[i : i + 1])
            call.chunks_done = end
            if end == call.tokens:
                out = call.chunk_logits[0] if len(call.chunk_logits) == 1 else torch.cat(call.chunk_logits, 1)
                with self._cond:
                    self._release(by_call[id(call)])
                call.finish(out)
        return True

    @staticmethod
    def _release(seq: Sequence) -> ForwardCall:
        """Mark the request as running Python again (its thread will park on its next forward or finish)."""
        call, seq.call = seq.call, None
        return call

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._stopping and not self.scheduler.waiting and not self.scheduler.running:
                    self._cond.wait()
                if self._stopping:
                    break
            try:
                progressed = self.step()
            except Exception as e:  # a failing step must not leave every client waiting forever
                log.exception("engine step failed; failing the requests it held")
                with self._cond:
                    for seq in self.scheduler.running:
                        if seq.call is not None:
                            self._release(seq).finish(error=e)
                continue
            if not progressed:
                with self._cond:  # only waiting requests that do not fit yet: wait for a change
                    if not self._stopping:
                        self._cond.wait(timeout=0.05)

    def _shutdown(self) -> None:
        while True:
            with self._cond:
                running = [s for s in self.scheduler.running if not s.finished]
                waiting = list(self.scheduler.waiting)
                self.scheduler.waiting.clear()
            for seq in waiting:
                seq.handle._fail(EngineStopped("the engine stopped before this request started"))
            if not running:
                return
            self._stopping = True
            self.step()  # fails every parked call with EngineStopped; the threads unwind and finish

    def _ensure_policy(self) -> None:
        if self.policy is None:
            cost = self._cost or CostModel.measure(self.tm.net, self.auto_config.cost_sizes)
            self.policy = AutoPolicy(self.auto_config, cost, lambda: len(self.scheduler.running))
            if self._cost is None:  # tests that pass a cost curve skip the start-up measurements
                self.policy.slowdowns = measure_slowdowns(self.tm.net, cost, self.tm.config.block_size,
                                                          self.auto_config)

    # -- one request's thread ----------------------------------------------------------------------------
    def _launch(self, seq: Sequence) -> None:
        def submit(call: ForwardCall) -> None:
            with self._cond:
                seq.call = call
                self._cond.notify_all()

        proxy = ForwardProxy(self.tm.net, self.pool, seq.pages, submit)
        seq.pages = []
        thread = threading.Thread(target=self._serve, args=(seq, proxy), name=f"trimode-req-{seq.request.request_id}",
                                  daemon=True)
        thread.start()

    def _serve(self, seq: Sequence, proxy: ForwardProxy) -> None:
        req, handle = seq.request, seq.handle
        knobs = dict(seq.knobs)
        steer = None
        if req.mode == "auto":
            steer = AutoSteer(self.policy, knobs["block_length"], knobs["use_drafter"])
        model = _RequestModel(self.tm, proxy, steer)
        extra = {k: v for k, v in req.knobs.items() if k not in MODE_KNOBS and v is not None}
        tokens: list[int] = []
        text = ""
        outcome = "failed"
        try:
            stream = model.stream(req.prompt_ids, mode="ar" if steer else req.mode, max_new_tokens=req.max_new_tokens,
                                  temperature=req.temperature, top_p=req.top_p, top_k=req.top_k, seed=req.seed,
                                  stop=req.stop, provisional=req.provisional, **({} if steer else knobs), **extra)
            while True:
                try:
                    event = next(stream)
                except StopIteration as done:
                    result: GenerationResult = done.value
                    break
                if isinstance(event, Delta):
                    tokens += event.token_ids
                    text += event.text
                handle._put(event)
            result.mode = req.mode
            result.stats.mode = req.mode
            result.knobs = knobs
            outcome = "finished"
        except RequestCancelled:
            outcome = "cancelled"
            result = _cancelled_result(req, tokens, text if self.tm.tokenizer else None)
        except Exception as e:
            error = e
        finally:
            proxy.free()
            with self._cond:
                seq.finished = True
                seq.call = None
                self._counters[outcome] += 1
                self._counters[f"{outcome}_{req.mode}"] += 1
                if outcome == "finished":
                    self._counters[f"tokens_{req.mode}"] += len(result.token_ids)
                self._cond.notify_all()
        if outcome == "failed":
            handle._fail(error)
        else:
            handle._finish(result)


def _cancelled_result(req: EngineRequest, tokens: list[int], text: str | None) -> GenerationResult:
    stats = DecodeStats(req.mode, prompt_tokens=len(req.prompt_ids), generated_tokens=len(tokens))
    return GenerationResult(list(tokens), text, stats, "cancelled", req.mode, dict(req.knobs))

