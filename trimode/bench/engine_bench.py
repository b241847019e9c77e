"""`trimode bench engine`: the engine's tokens per second against the bare batched forwards it runs.

For each mode and number of concurrent requests, one round is: submit the requests to an `Engine` (stepped in
this thread, so the measurement holds no client threads), time until all are done, and record every fused
forward it ran (`Engine.trace`); then replay exactly those forwards on the bare network over a contiguous KV
cache (`NLDTransformer` with a `KVCache`, no paging, no step machines, no streaming) and time them. The ratio
engine / bare is the share of the bare forwards' speed the engine delivers; everything else the engine does
(scheduling, paging, masks, sampling, stop rules, detokenization, events) is the difference. Both halves run
back to back in the same round, so load on the machine hits them alike; rounds alternate and the median ratio
is reported with its spread.

Served-style: the engine's own background loop (`Engine.start()`) with every request's events consumed, its
forwards replayed on the bare network the same way. Two kinds of clients (`served`): `asyncio`, every request read
through `handle.aiter()` on one event loop in another thread, as the HTTP server's handlers read (on the loop the
server runs on, `trimode.serve.event_loop`: uvloop where installed); `asyncio-std`, the same on Python's own asyncio
loop (the server's where uvloop is missing), to compare the two loops side by side in one run; `threads`, one
client thread per request iterating its handle (a Python program calling the engine from many threads); `process`,
the engine core in a process of its own as the HTTP server runs it by default, read by one event loop here through
the client's handles (the core writes its forwards to a file for the replay). Reader CPU
per step: the CPU time the clients' thread(s) spent per engine step (`time.thread_time`): in one process the
readers and the engine's loop share the interpreter lock, so this work lengthens a served step unless it overlaps
the forward (what an engine-core process spares the loop; for `process` it is this process's CPU, readers and the
client's I/O thread, which runs beside the core's loop). Syncs per step:
host reads of tensor values (`trimode.bench.syncs`) in the engine (runner, decision stage) and in the step
machines, counted over one short separate run (the counting slows the run, so it is not timed).
"""

from __future__ import annotations

import asyncio
import statistics
import threading
import time
from dataclasses import dataclass, field

import torch

from trimode.api import TriMode
from trimode.bench.timing import machine_name
from trimode.engine import Engine, EngineRequest
from trimode.engine.auto import CostModel
from trimode.engine.engine import ForwardShape
from trimode.serve import event_loop


@dataclass
class Cell:
    mode: str
    requests: int
    tokens: int
    engine_s: list[float]
    bare_s: list[float]
    forwards: int
    threads_alive: int
    # per kind of clients (`SERVED`): seconds served, seconds of the same forwards bare
    served_s: dict[str, list[float]] = field(default_factory=dict)
    served_bare_s: dict[str, list[float]] = field(default_factory=dict)
    reader_cpu_ms: dict[str, list[float]] = field(default_factory=dict)  # per kind: the readers' CPU ms per step
    syncs: tuple[float, float] = (0.0, 0.0)  # per engine step: (engine, machines)

    def served_ratios(self, clients: str) -> list[float]:
        return [b / e for e, b in zip(self.served_s.get(clients, []), self.served_bare_s.get(clients, []))]

    def served_ratio(self, clients: str) -> float:
        ratios = self.served_ratios(clients)
        return statistics.median(ratios) if ratios else 0.0

    @property
    def ratios(self) -> list[float]:
        return [b / e for e, b in zip(self.engine_s, self.bare_s)]

    @property
    def ratio(self) -> float:
        return statistics.median(self.ratios)


def _prompts(n: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(4, vocab, (n, length), generator=g).tolist()  # ids 0-3: pad, bos, eos, mask


def run_engine(tm: TriMode, mode: str, prompts: list[list[int]], max_new_tokens: int,
               knobs: dict) -> tuple[float, int, list[ForwardShape], int]:
    """Seconds to serve every prompt, tokens generated, the forwards run, the most threads alive meanwhile."""
    engine = Engine(tm, max_queue=len(prompts), max_running=max(64, len(prompts)),
                    cost=CostModel([(1, 1e-3), (1 << 16, 1e-3)]))
    engine.trace = []
    requests = [EngineRequest(p, mode=mode, max_new_tokens=max_new_tokens, knobs={"eos_token_id": -1, **knobs})
                for p in prompts]
    threads = 0
    t0 = time.perf_counter()
    handles = [engine.submit(r) for r in requests]
    while engine.step():
        threads = max(threads, threading.active_count())
    results = [h.result() for h in handles]
    seconds = time.perf_counter() - t0
    return seconds, sum(len(r.token_ids) for r in results), engine.trace, threads


SERVED = ("asyncio", "asyncio-std", "threads", "process")


def run_served(tm: TriMode, mode: str, prompts: list[list[int]], max_new_tokens: int, knobs: dict,
               clients: str = "asyncio") -> tuple[float, int, list[ForwardShape], float]:
    """Seconds to serve every prompt with the engine's background loop, every event consumed by `clients`
    (`SERVED`: one asyncio loop reading every handle, or one thread per request), tokens generated, the forwards
    run, and the CPU milliseconds the readers' threads spent per engine step. The clients are waiting before the
    first request is submitted, as a server's are."""
    if clients not in SERVED:
        raise ValueError(f"served clients must be one of {', '.join(SERVED)}, got {clients!r}")
    if clients == "process":
        return run_served_process(tm, mode, prompts, max_new_tokens, knobs)
    engine = Engine(tm, max_queue=len(prompts), max_running=max(64, len(prompts)),
                    cost=CostModel([(1, 1e-3), (1 << 16, 1e-3)]))
    engine.trace = []
    results: list = [None] * len(prompts)
    requests = [EngineRequest(p, mode=mode, max_new_tokens=max_new_tokens, knobs={"eos_token_id": -1, **knobs})
                for p in prompts]
    reader_cpu: list[float] = []  # each reader thread's CPU seconds

    def client(i: int, handle) -> None:
        c0 = time.thread_time()
        for event in handle:
            results[i] = event
        reader_cpu.append(time.thread_time() - c0)

    def run_loop(box: list[float]) -> None:
        c0 = time.thread_time()
        box.append((asyncio.run if clients == "asyncio-std" else event_loop.run)(serve_all()))
        reader_cpu.append(time.thread_time() - c0)

    async def read(i: int, handle) -> None:
        async for event in handle.aiter():
            results[i] = event

    async def serve_all() -> float:
        t0 = time.perf_counter()
        await asyncio.gather(*(read(i, engine.submit(r)) for i, r in enumerate(requests)))
        return time.perf_counter() - t0

    engine.start()
    try:
        if clients in ("asyncio", "asyncio-std"):
            box: list[float] = []
            loop_thread = threading.Thread(target=run_loop, args=(box,))
            loop_thread.start()
            loop_thread.join()
            seconds = box[0]
        else:
            t0 = time.perf_counter()
            handles = [engine.submit(r) for r in requests]
            threads = [threading.Thread(target=client, args=(i, h)) for i, h in enumerate(handles)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            seconds = time.perf_counter() - t0
    finally:
        engine.stop()
    steps = max(1, engine.stats()["counters"].get("steps", 0))
    return seconds, sum(len(r.token_ids) for r in results), engine.trace, sum(reader_cpu) * 1e3 / steps


def run_served_process(tm: TriMode, mode: str, prompts: list[list[int]], max_new_tokens: int,
                       knobs: dict) -> tuple[float, int, list[ForwardShape], float]:
    """`run_served` with the engine core in a process of its own, as the HTTP server runs it by default
    (`trimode.engine.core_process`), and one asyncio loop in this process reading every request through the
    client's handles (their text decoded here, as the API server does). The core records its forwards and writes
    them to a file when it stops. The CPU per step is this process's (the readers and the client's I/O thread)."""
    import json
    import tempfile
    from pathlib import Path

    from trimode.engine.client import EngineClient
    from trimode.engine.core_process import CoreSet, CoreSpec
    from trimode.engine.engine import shape_from_json

    requests = [EngineRequest(p, mode=mode, max_new_tokens=max_new_tokens, knobs={"eos_token_id": -1, **knobs})
                for p in prompts]
    results: list = [None] * len(prompts)
    with tempfile.TemporaryDirectory(prefix="trimode-bench-") as tmp:
        trace_file = Path(tmp) / "trace.json"
        spec = CoreSpec(model=str(tm.path), dtype=str(tm.net.dtype).removeprefix("torch."),
                        device=str(tm.net.device), threads=torch.get_num_threads(), trace_file=str(trace_file),
                        engine={"max_queue": len(prompts), "max_running": max(64, len(prompts)),
                                "cost": CostModel([(1, 1e-3), (1 << 16, 1e-3)])})
        client = EngineClient(tm, CoreSet(spec), ready_timeout=120).start()
        try:
            async def read(i: int, handle) -> None:
                async for event in handle.aiter():
                    results[i] = event

            async def serve_all() -> float:
                t0 = time.perf_counter()
                handles = client.submit_all(requests)  # one round trip to the core, as a request's choices go
                await asyncio.gather(*(read(i, h) for i, h in enumerate(handles)))
                return time.perf_counter() - t0

            c0 = time.process_time()
            seconds = event_loop.run(serve_all())
            cpu = time.process_time() - c0
            steps = max(1, client.stats().get("counters", {}).get("steps", 0))
        finally:
            client.stop()
        trace = [[shape_from_json(d) for d in forward] for forward in json.loads(trace_file.read_text())]
    return seconds, sum(len(r.token_ids) for r in results), trace, cpu * 1e3 / steps


def count_syncs(tm: TriMode, mode: str, prompts: list[list[int]], knobs: dict, max_new_tokens: int = 8):
    """Host reads per engine step (engine, machines) over a short run of these prompts (prefill included)."""
    from trimode.bench.syncs import SyncCounter

    engine = Engine(tm, max_queue=len(prompts), max_running=max(64, len(prompts)),
                    cost=CostModel([(1, 1e-3), (1 << 16, 1e-3)]))
    for p in prompts:
        engine.submit(EngineRequest(p, mode=mode, max_new_tokens=max_new_tokens, knobs={"eos_token_id": -1, **knobs}))
    steps = 0
    with SyncCounter() as counter:
        while engine.step():
            steps += 1
    return counter.counts["engine"] / max(steps, 1), counter.counts["machines"] / max(steps, 1)


@torch.no_grad()
def replay(tm: TriMode, forwards: list[list[ForwardShape]]) -> float:
    """Seconds the bare network takes for the same forwards over contiguous caches (a forward that packed rows
    of several widths is one bare forward per width: the bare network cannot pack them)."""
    net = tm.net
    shapes = [s for groups in forwards for s in groups]
    widest = max(s.past + s.tokens for s in shapes)
    caches = {r: net.new_cache(r, widest) for r in {s.rows for s in shapes}}  # allocated outside the timing
    g = torch.Generator().manual_seed(0)
    inputs = []
    for s in shapes:
        ids = torch.randint(4, tm.config.vocab_size, (s.rows, s.tokens), generator=g).to(net.device)
        lora = torch.tensor(s.lora, device=net.device) if any(s.lora) else False
        read = torch.arange(s.logits, device=net.device) if s.logits < s.rows * s.tokens else None
        inputs.append((s, ids, lora, read))
    sync = torch.cuda.synchronize if net.device.type == "cuda" else (lambda: None)
    sync()
    t0 = time.perf_counter()
    for s, ids, lora, read in inputs:
        cache = caches[s.rows]
        cache.length = s.past
        net(ids, mask=s.masks[0] if s.masks[0] != "tensor" else "causal", cache=cache, lora=lora, logits_at=read)
    sync()
    return time.perf_counter() - t0


def run(tm: TriMode, modes: list[str], loads: list[int], prompt_tokens: int, max_new_tokens: int, rounds: int,
        block_length: int | None, progress=None, served: tuple[str, ...] = ("asyncio",)) -> tuple[str, list[Cell]]:
    knobs_of = {m: ({"block_length": block_length} if block_length and m != "ar" else {}) for m in modes}
    cells = []
    for mode in modes:
        for n in loads:
            prompts = _prompts(n, prompt_tokens, tm.config.vocab_size, seed=n)
            run_engine(tm, mode, prompts[:1], 4, knobs_of[mode])  # warm the shapes
            cell = Cell(mode, n, 0, [], [], 0, 0)
            cell.syncs = count_syncs(tm, mode, prompts, knobs_of[mode])
            for _ in range(rounds):
                seconds, tokens, shapes, threads = run_engine(tm, mode, prompts, max_new_tokens, knobs_of[mode])
                cell.engine_s.append(seconds)
                cell.bare_s.append(replay(tm, shapes))
                for clients in served:
                    seconds, _, served_shapes, cpu = run_served(tm, mode, prompts, max_new_tokens, knobs_of[mode],
                                                                clients)
                    cell.served_s.setdefault(clients, []).append(seconds)
                    cell.reader_cpu_ms.setdefault(clients, []).append(cpu)
                    cell.served_bare_s.setdefault(clients, []).append(replay(tm, served_shapes))
                cell.tokens, cell.forwards = tokens, len(shapes)
                cell.threads_alive = max(cell.threads_alive, threads)
            cells.append(cell)
            if progress:
                progress(cell)
    return report(tm, cells, prompt_tokens, max_new_tokens, rounds, served), cells


def report(tm: TriMode, cells: list[Cell], prompt_tokens: int, max_new_tokens: int, rounds: int,
           served: tuple[str, ...] = ("asyncio",)) -> str:
    lines = [
        f"Machine: {machine_name(tm.net.device)}; model {tm.path.name if tm.path else '?'} ({tm.net.dtype}).",
        f"Each request: a {prompt_tokens}-token random prompt, exactly {max_new_tokens} new tokens (EOS off); "
        f"{rounds} round(s) per cell, median ratio (min-max over rounds).",
        "",
        "Replay: the engine stepped in the caller's thread. Served: its background loop, every event consumed "
        f"(asyncio: one event loop ({event_loop.NAME}, the server's) reading every request through `handle.aiter()`, "
        "as the HTTP server does; "
        "threads: one client thread per request). Syncs / step: host reads of tensor values per engine step in "
        "the engine (runner, decision stage: device syncs on a GPU) + in the step machines (host tensors since "
        "the decision stage).",
        "",
        "| mode | requests | engine tok/s | bare forwards tok/s | engine / bare | "
        + "".join(f"served ({c}) / bare | " for c in served)
        + "".join(f"reader CPU ms / step ({c}) | " for c in served) + "syncs / step | fused forwards | threads alive |",
        "|---|---:|---:|---:|---:|" + "---:|" * (2 * len(served)) + "---:|---:|---:|",
    ]
    for c in cells:
        e = c.tokens / statistics.median(c.engine_s)
        b = c.tokens / statistics.median(c.bare_s)
        rs = c.ratios
        cols = ""
        for clients in served:
            sr = c.served_ratios(clients) or [0.0]
            cols += f"| {c.served_ratio(clients):.2f} ({min(sr):.2f}-{max(sr):.2f}) "
        for clients in served:
            cpu = c.reader_cpu_ms.get(clients) or [0.0]
            cols += f"| {statistics.median(cpu):.2f} "
        lines.append(f"| {c.mode} | {c.requests} | {e:,.0f} | {b:,.0f} | {c.ratio:.2f} ({min(rs):.2f}-{max(rs):.2f}) "
                     f"{cols}| {c.syncs[0]:.1f} + {c.syncs[1]:.1f} | {c.forwards} | {c.threads_alive} |")
    return "\n".join(lines) + "\n"
