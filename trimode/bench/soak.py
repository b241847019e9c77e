"""`trimode bench soak`: N clients against the OpenAI-compatible server for a fixed time, every kind of traffic
mixed: all modes, streamed and not, clients that leave mid-stream or before a non-streamed answer, and hostile
requests (bad token ids, lone surrogates, deep nesting, NaN, strings for integers, prompts far beyond the
context). It reports what came back by status, the latency of the completed requests (p50 / p99), the server's
memory before and after, and whether the server is healthy and idle afterwards.

Every client draws its requests from its own seeded generator, so a run is reproducible up to timing.
Without `--url` it starts `trimode serve` on the model in a child process and reads that process's memory.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from trimode.bench.serve_bench import FIXED_MODES, bench_prompts, free_port, percentile, wait_until_healthy

MODES = (*FIXED_MODES, "auto")
# (kind, weight): how the traffic is mixed.
MIX = (("complete", 30), ("stream", 30), ("leave_stream", 10), ("leave_waiting", 5), ("hostile", 25))
MODEL = "bench"


def hostile_bodies() -> list[tuple[str, bytes]]:
    """(path, body) of requests that must be answered with a 4xx."""
    def completion(prompt: str, extra: str = "") -> bytes:
        return f'{{"model": "{MODEL}", "max_tokens": 4, "prompt": {prompt}{extra}}}'.encode()

    chat = f'{{"model": "{MODEL}", "max_tokens": 4, "messages": [{{"role": "user", "content": "a\\ud800b"}}]}}'
    return [
        ("/v1/completions", completion("[5, -1, 7]")),
        ("/v1/completions", completion(f"[5, {2**40}]")),
        ("/v1/completions", completion(f"[5, {2**70}]")),
        ("/v1/completions", completion('"a\\ud800b"')),
        ("/v1/chat/completions", chat.encode()),
        ("/v1/completions", b"[" * 100_000),
        ("/v1/completions", b'{"a": ' * 5_000 + b"1" + b"}" * 5_000),
        ("/v1/completions", completion('"hi"', ', "temperature": NaN')),
        ("/v1/completions", completion('"hi"', ', "max_tokens": "5"')),
        ("/v1/completions", completion('"hi"', ', "n": true')),
        ("/v1/completions", completion('"hi"', ', "mode": "turbo"')),
        ("/v1/completions", completion('"hi"', ', "block_length": 0')),
        ("/v1/completions", completion(json.dumps("hello world " * 170_000))),  # 2 MB: far beyond the context
        ("/v1/completions", completion(json.dumps(["x"] * 200), ', "n": 16')),  # more than the server takes
        ("/v1/completions", b"{not json"),
    ]


@dataclass
class Outcome:
    kind: str
    status: int | str  # HTTP status, or "left" (the client went away on purpose), or an exception name
    seconds: float
    ok: bool  # what this kind of request should get
    detail: str = ""  # the start of an unexpected answer


@dataclass
class Soak:
    clients: int
    seconds: float
    outcomes: list[Outcome] = field(default_factory=list)
    rss_before: int | None = None
    rss_after: int | None = None
    rss_peak: int | None = None
    rss_samples: list[tuple[float, int]] = field(default_factory=list)  # (seconds into the soak, resident bytes)
    health_after_s: float | None = None
    idle_after_s: float | None = None

    def errors(self) -> Counter:
        return Counter(f"{o.kind}: {o.status}" for o in self.outcomes if not o.ok)


async def one_client(i: int, base: str, deadline: float, prompts: list[str], max_tokens: int, api_key: str,
                     soak: Soak, seed: int) -> None:
    import httpx

    rng = random.Random(f"soak {seed} client {i}")
    kinds, weights = zip(*MIX)
    hostile = hostile_bodies()
    headers = {"Authorization": f"Bearer {api_key}"}
    async with httpx.AsyncClient(base_url=base, timeout=600, headers=headers) as http:
        while time.perf_counter() < deadline:
            kind = rng.choices(kinds, weights)[0]
            mode = rng.choice(MODES)
            prompt = rng.choice(prompts)
            t0 = time.perf_counter()
            try:
                status, ok, detail = await _request(http, kind, mode, prompt, max_tokens, rng, hostile)
            except (httpx.HTTPError, OSError, ValueError) as e:
                status, ok, detail = type(e).__name__, False, str(e)
            soak.outcomes.append(Outcome(kind, status, time.perf_counter() - t0, ok, "" if ok else detail[:200]))


async def _request(http, kind: str, mode: str, prompt: str, max_tokens: int, rng: random.Random,
                   hostile: list[tuple[str, bytes]]) -> tuple[int | str, bool, str]:
    """(status, whether it is the answer this kind should get, what came back when it is not)."""
    import httpx

    if kind == "hostile":
        path, body = rng.choice(hostile)
        r = await http.post(path, content=body, headers={"Content-Type": "application/json"})
        return r.status_code, 400 <= r.status_code < 500 and r.status_code != 429, r.text
    chat = {"model": MODEL, "max_tokens": max_tokens, "mode": mode, "messages": [{"role": "user", "content": prompt}]}
    if kind == "complete":
        r = await http.post("/v1/completions", json={"model": MODEL, "max_tokens": max_tokens, "mode": mode,
                                                     "prompt": prompt})
        return r.status_code, r.status_code == 200, r.text
    if kind == "leave_waiting":  # a non-streamed request whose client gives up before the answer
        try:
            r = await http.post("/v1/chat/completions", json=chat, timeout=httpx.Timeout(600, read=0.05))
        except httpx.ReadTimeout:
            return "left", True, ""
        return r.status_code, r.status_code == 200, r.text
    async with http.stream("POST", "/v1/chat/completions", json={**chat, "stream": True}) as r:
        if r.status_code != 200:
            await r.aread()
            return r.status_code, False, r.text
        lines = r.aiter_lines()
        async for line in lines:
            if line == "data: [DONE]":
                return 200, True, ""
            if not line.startswith("data: "):
                continue
            event = json.loads(line[6:])
            if "error" in event:
                return event["error"].get("code") or "stream error", False, line
            if kind == "leave_stream" and any(c.get("delta", {}).get("content") for c in event["choices"]):
                await lines.aclose()
                return "left", True, ""  # leaving the `async with` now drops the connection mid-stream
    return "stream ended without [DONE]", False, ""


def rss(pid: int) -> tuple[int | None, int | None]:
    """(resident, peak resident) bytes of a process, from /proc (None where there is no /proc)."""
    try:
        fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines())
    except OSError:
        return None, None

    def kib(name: str) -> int | None:
        return int(fields[name].split()[0]) * 1024 if name in fields else None

    return kib("VmRSS"), kib("VmHWM")


def start_server(model: str | None, port: int, threads: int | None, log: Path,
                 timeout: float = 300) -> subprocess.Popen:
    """`trimode serve` in a child process at default settings (its log to a file, so it never blocks on a pipe)."""

    cmd = [sys.executable, "-m", "trimode.cli", "serve", "--port", str(port), "--log-level", "warning",
           "--served-model-name", MODEL, *(["--model", model] if model else [])]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **({"OMP_NUM_THREADS": str(threads)} if threads else {})}
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=log.open("w"), env=env)
    return wait_until_healthy(proc, port, timeout, log.read_text)


def run(model: str | None, url: str | None, clients: int, seconds: float, max_tokens: int, api_key: str = "none",
        threads: int | None = None, seed: int = 0, echo=print) -> Soak:
    import httpx

    prompts = bench_prompts()
    proc = None
    log = Path(tempfile.mkdtemp(prefix="trimode-soak-")) / "server.log"
    if url is None:
        port = free_port()
        echo(f"starting `trimode serve` on port {port} (log: {log}) ...")
        proc = start_server(model, port, threads, log)
        url = f"http://127.0.0.1:{port}"
    base = url.removesuffix("/").removesuffix("/v1")
    soak = Soak(clients, seconds)
    try:
        for mode in MODES:  # warm every mode's code path before the memory baseline
            r = httpx.post(base + "/v1/completions", json={"model": MODEL, "prompt": prompts[0], "mode": mode,
                                                          "max_tokens": max_tokens},
                           headers={"Authorization": f"Bearer {api_key}"}, timeout=600)
            if r.status_code != 200:
                raise RuntimeError(f"warm-up request in mode {mode} failed: {r.status_code} {r.text[:200]}")
        if proc is not None:
            soak.rss_before = rss(proc.pid)[0]
        echo(f"{clients} clients for {seconds:.0f} s ...")
        start = time.perf_counter()
        deadline = start + seconds

        async def sample_memory():  # growth that levels off is warm-up (threads, allocator arenas); a leak does not
            while proc is not None and time.perf_counter() < deadline:
                await asyncio.sleep(seconds / 12)
                now = rss(proc.pid)[0]
                if now is not None:
                    soak.rss_samples.append((time.perf_counter() - start, now))

        async def all_clients():
            await asyncio.gather(sample_memory(), *(one_client(i, base, deadline, prompts, max_tokens, api_key, soak,
                                                                seed) for i in range(clients)))

        asyncio.run(all_clients())
        t0 = time.perf_counter()
        httpx.get(base + "/health", timeout=60).raise_for_status()
        soak.health_after_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < 60:  # cancelled work leaves the engine at its next step
            health = httpx.get(base + "/health", timeout=60).json()
            if health.get("running_requests") == 0 and health.get("queue_depth") == 0:
                soak.idle_after_s = time.perf_counter() - t0
                break
            time.sleep(0.1)
        if proc is not None:
            soak.rss_after, soak.rss_peak = rss(proc.pid)
    finally:
        if proc is not None:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
    return soak


def report(soak: Soak, header: str) -> str:
    by_kind: dict[str, Counter] = {}
    for o in soak.outcomes:
        by_kind.setdefault(o.kind, Counter())[o.status] += 1
    statuses = Counter(o.status for o in soak.outcomes)
    done = [o.seconds for o in soak.outcomes if o.status == 200]
    lines = [header, "", f"{len(soak.outcomes)} requests from {soak.clients} clients in {soak.seconds:.0f} s: "
             f"{len(done)} completed (200), {statuses.get('left', 0)} left by their client on purpose, "
             f"{sum(n for s, n in statuses.items() if isinstance(s, int) and 400 <= s < 500 and s != 429)} "
             f"answered 4xx, {statuses.get(429, 0)} answered 429, "
             f"{sum(n for s, n in statuses.items() if isinstance(s, int) and s >= 500)} answered 5xx.", "",
             "| kind | sent | outcomes (status: count) | p50 s | p99 s |", "|---|---:|---|---:|---:|"]
    for kind, _ in MIX:
        counts = by_kind.get(kind, Counter())
        seconds = [o.seconds for o in soak.outcomes if o.kind == kind and o.status == 200]
        shown = ", ".join(f"{s}: {n}" for s, n in sorted(counts.items(), key=lambda kv: str(kv[0])))
        lines.append(f"| {kind} | {sum(counts.values())} | {shown or '-'} | {_secs(percentile(seconds, 50))} | "
                     f"{_secs(percentile(seconds, 99))} |")
    errors = soak.errors()
    lines += ["", f"Latency of the completed requests: p50 {_secs(percentile(done, 50))} s, p99 "
                  f"{_secs(percentile(done, 99))} s.",
              f"Errors (an answer the request should not get): {sum(errors.values())}"
              + (f" ({', '.join(f'{k} x{n}' for k, n in errors.most_common())})" if errors else "") + ".",
              *[f"- e.g. {o.kind}: {o.status}: {o.detail}" for o in _examples(soak)],
              f"Server memory (resident): {_mib(soak.rss_before)} after the warm-up, {_mib(soak.rss_after)} after "
              f"the soak (peak {_mib(soak.rss_peak)})"
              + (f"; during the soak: {', '.join(f'{t:.0f} s {b / 2**20:.0f}' for t, b in soak.rss_samples)} MiB"
                 if soak.rss_samples else "") + ".",
              f"After the soak: /health answered in {_ms(soak.health_after_s)}; the engine was idle (nothing "
              f"running or waiting) after {'more than 60 s' if soak.idle_after_s is None else _ms(soak.idle_after_s)}.",
              ""]
    return "\n".join(lines)


def _examples(soak: Soak) -> list[Outcome]:
    """The first wrong answer of each kind and status."""
    seen: dict[tuple, Outcome] = {}
    for o in soak.outcomes:
        if not o.ok:
            seen.setdefault((o.kind, o.status), o)
    return list(seen.values())


def _secs(x: float) -> str:
    return "-" if x != x else f"{x:.2f}"


def _ms(x: float | None) -> str:
    return "n/a" if x is None else f"{1e3 * x:.0f} ms"


def _mib(x: int | None) -> str:
    return "n/a (not our process)" if x is None else f"{x / 2**20:.0f} MiB"
