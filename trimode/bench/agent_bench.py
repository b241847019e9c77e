"""`trimode bench agent`: the prefix cache and KV on demand, measured on an agent-like workload.

Workload: `conversations` concurrent conversations of `turns` turns each. Every prompt starts with the same system
prompt and tool descriptions (about 300 tokens); each turn's prompt is the previous one, its answer, a tool result
and the next user message, so a turn extends the conversation. Every mode runs it twice in one process, prefix
cache on and off (same engine settings otherwise), and the report compares: prompt tokens computed, prefix-cache
hit rate, time to first token per turn (median over conversations), throughput, and whether every answer's text is
identical with and without the cache.

Capacity: `capacity_requests` requests of `capacity_tokens` forced tokens (ignore_eos) on a pool of `pool_tokens`.
"Before" is what a worst-case reservation admits at once (the pool divided by each request's full KV); "after" is
measured: the most requests running at once with pages on demand, the preemptions, and whether every request got
its tokens, each equal to the same request run alone.
"""

from __future__ import annotations

import statistics
import threading
import time
from dataclasses import dataclass, field

from trimode.api import TriMode
from trimode.bench.timing import machine_name
from trimode.decode.result import Delta
from trimode.engine import Engine, EngineRequest
from trimode.engine.auto import CostModel

SYSTEM = ("You are a careful coding agent working in a repository. You read files, run tests and edit code with "
          "the tools below, and you explain each step in one short sentence before you take it. Never invent a "
          "file name or a function; look first. Prefer small changes that keep the tests green. When a test "
          "fails, read its output and the code it names before you change anything. ")
TOOLS = ("Tools: read_file(path) returns the text of a file. list_dir(path) returns the names in a directory. "
         "run_tests(pattern) runs the tests whose names match and returns their output. edit_file(path, old, new) "
         "replaces the text old with new in a file and returns the diff. search(query) returns the lines that "
         "match a query, with their files and line numbers. Answer with a tool call or with the final answer. "
         "A tool call is one line: the tool's name and its arguments in parentheses, strings in double quotes, "
         "nothing after. ")
USER = ["The test for the parser fails on empty input. Find out why.",
        "Show me the function that reads the header.",
        "Fix it so that an empty file gives an empty list.",
        "Run the tests again and tell me what changed."]
TOOL_RESULT = " Tool result: def read_header(lines): return lines[0].split(',') # fails when lines is empty. "


@dataclass
class ModeRun:
    mode: str
    cache: bool
    texts: list[list[str]]  # per conversation, per turn
    ttft: list[list[float]]  # seconds, per conversation, per turn
    prompt_tokens: int
    cached_tokens: int
    generated: int
    seconds: float
    stats: dict = field(default_factory=dict)

    def ttft_turn(self, turn: int) -> float:
        return statistics.median(t[turn] for t in self.ttft)


def next_turn(history: str | None, c: int, t: int) -> str:
    """Conversation c's prompt for turn t: the shared system prompt and tools (history None: the first turn) or
    the conversation so far with its answers, then a tool result (after the first turn) and the next user message."""
    base = SYSTEM + TOOLS if history is None else history
    return base + f"\nUser ({c}): {USER[t % len(USER)]}{TOOL_RESULT if t else ''}\nAgent:"


def _conversation(tm: TriMode, engine: Engine, mode: str, knobs: dict, c: int, turns: int, max_new: int,
                  run: ModeRun) -> None:
    history = None
    for t in range(turns):
        history = next_turn(history, c, t)
        ids = tm.encode(history)
        t0 = time.perf_counter()
        handle = engine.submit(EngineRequest(ids, mode=mode, max_new_tokens=max_new, knobs=dict(knobs)))
        first = None
        for ev in handle:
            if first is None and isinstance(ev, Delta) and ev.token_ids:
                first = time.perf_counter() - t0
        result = ev
        run.ttft[c][t] = first if first is not None else time.perf_counter() - t0
        run.texts[c][t] = result.text
        run.prompt_tokens += len(ids)
        run.cached_tokens += result.stats.cached_tokens
        run.generated += len(result.token_ids)
        history += result.text


def run_mode(tm: TriMode, mode: str, cache: bool, conversations: int, turns: int, max_new: int,
             knobs: dict) -> ModeRun:
    run = ModeRun(mode, cache, [[""] * turns for _ in range(conversations)],
                  [[0.0] * turns for _ in range(conversations)], 0, 0, 0, 0.0)
    engine = Engine(tm, prefix_cache=cache, cost=CostModel([(1, 1e-3), (1 << 16, 1e-3)])).start()
    try:
        t0 = time.perf_counter()
        threads = [threading.Thread(target=_conversation, args=(tm, engine, mode, knobs, c, turns, max_new, run))
                   for c in range(conversations)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        run.seconds = time.perf_counter() - t0
        run.stats = engine.stats()
    finally:
        engine.stop()
    return run


@dataclass
class Capacity:
    pool_tokens: int
    requests: int
    tokens: int
    before: int  # at once with a worst-case reservation
    after: int  # measured at once with pages on demand
    preemptions: int
    complete: int  # requests that got all their tokens
    equal: int  # requests equal to their run alone
    seconds: float


def capacity(tm: TriMode, pool_tokens: int = 1024, requests: int = 10, tokens: int = 200, prompt: int = 12,
             page_size: int = 16) -> Capacity:
    vocab = tm.config.vocab_size
    prompts = [[(37 * i + 11 * j) % (vocab - 8) + 6 for j in range(prompt)] for i in range(requests)]
    reqs = [EngineRequest(p, max_new_tokens=tokens, ignore_eos=True) for p in prompts]
    engine = Engine(tm, kv_cache_tokens=pool_tokens, page_size=page_size, cost=CostModel([(1, 1e-3), (1 << 16, 1e-3)]))
    handles = [engine.submit(r) for r in reqs]
    most, t0 = 0, time.perf_counter()
    while engine.step():
        most = max(most, engine.stats()["running_requests"])
    seconds = time.perf_counter() - t0
    results = [h.result() for h in handles]
    alone = Engine(tm, kv_cache_tokens=pool_tokens, page_size=page_size, prefix_cache=False,
                   cost=CostModel([(1, 1e-3), (1 << 16, 1e-3)]))
    equal = 0
    for r, res in zip(reqs, results):
        h = alone.submit(r)
        while alone.step():
            pass
        equal += h.result().token_ids == res.token_ids
    per_request = engine.pool.pages_for(prompt + tokens)
    return Capacity(pool_tokens, requests, tokens, engine.pool.num_pages // per_request, most,
                    engine.stats()["preemptions"], sum(len(r.token_ids) == tokens for r in results), equal, seconds)


def report(runs: list[tuple[ModeRun, ModeRun]], cap: Capacity, conversations: int, turns: int, max_new: int, device,
           command: str) -> str:
    lines = [f"## Prefix cache and KV on demand: agent workload ({machine_name(device)})", "", f"    {command}", "",
             f"{conversations} conversations x {turns} turns at once, a {len(SYSTEM + TOOLS)}-character system "
             f"prompt with tools, up to {max_new} new tokens per turn.", "",
             "| mode | cache | prompt tokens | computed | from cache | TTFT turn 1 | TTFT turn 4 | tokens/s | "
             "same text |", "|---|---|---:|---:|---:|---:|---:|---:|---|"]
    last = turns - 1
    for off, on in runs:
        same = off.texts == on.texts
        for r in (off, on):
            lines.append(f"| {r.mode} | {'on' if r.cache else 'off'} | {r.prompt_tokens} | "
                         f"{r.prompt_tokens - r.cached_tokens} | {100 * r.cached_tokens / r.prompt_tokens:.0f}% | "
                         f"{1000 * r.ttft_turn(0):.0f} ms | {1000 * r.ttft_turn(last):.0f} ms | "
                         f"{r.generated / r.seconds:.1f} | {'yes' if same else 'NO'} |")
        lines.append(f"| {off.mode} | ratio | | | | | {off.ttft_turn(last) / on.ttft_turn(last):.1f}x faster | "
                     f"{(on.generated / on.seconds) / (off.generated / off.seconds):.2f}x | |")
    lines += ["", f"Capacity: a {cap.pool_tokens}-token pool, {cap.requests} requests of {cap.tokens} forced tokens "
              "(ignore_eos).", "", "| KV memory | requests at once | preemptions | complete | equal to alone | "
              "seconds |", "|---|---:|---:|---:|---:|---:|",
              f"| worst case reserved at admission (before) | {cap.before} | - | - | - | - |",
              f"| pages on demand, preemption (after) | {cap.after} | {cap.preemptions} | {cap.complete}/"
              f"{cap.requests} | {cap.equal}/{cap.requests} | {cap.seconds:.1f} |"]
    return "\n".join(lines) + "\n"


def run(tm: TriMode, modes: list[str], conversations: int = 4, turns: int = 4, max_new: int = 24,
        knobs: dict | None = None, command: str = "trimode bench agent", progress=None) -> tuple[str, list]:
    runs = []
    for mode in modes:
        pair = tuple(run_mode(tm, mode, cache, conversations, turns, max_new, knobs or {}) for cache in (False, True))
        runs.append(pair)
        if progress:
            progress(pair)
    cap = capacity(tm)
    return report(runs, cap, conversations, turns, max_new, tm.net.device, command), runs
