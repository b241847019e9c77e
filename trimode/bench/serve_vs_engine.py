"""`trimode bench serve-vs-engine` (also `trimode bench serve --vs-engine LAYOUTS`): what the HTTP server costs,
per server layout, next to the engine alone.

The same requests (raw completion prompts, one mode, greedy, max_tokens each) run, per number of clients N:
- on the engine in this process (its own loop thread; N client threads submit back to back and consume every
  event): the speed the server would reach if HTTP cost nothing;
- through `trimode serve` started with each layout (`--no-engine-process`, `--engine-process`, ... with
  `--data-parallel-size`), N `openai` clients streaming and not.
Both sides run on the same machine with the same torch thread count, so the ratio server / engine is what the
server layout costs. TTFT and inter-token latency (the gap between streamed text chunks) come with it.
"""

from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import typer

from trimode.bench.serve_bench import bench_prompts, free_port, percentile, wait_until_healthy

LAYOUTS = {"thread": ["--no-engine-process"], "process": ["--engine-process"],
           "process-dp2": ["--engine-process", "--data-parallel-size", "2"]}


@dataclass
class Cell:
    side: str  # "engine" or a layout name
    clients: int
    stream: bool
    wall: float = 0.0
    done: int = 0
    errors: int = 0
    tokens: int = 0
    ttft: list[float] = field(default_factory=list)
    itl: list[float] = field(default_factory=list)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.wall if self.wall else 0.0


def engine_cell(engine, prompts: list[list[int]], mode: str, clients: int, per_client: int, max_tokens: int) -> Cell:
    from trimode.decode.result import Delta, GenerationResult
    from trimode.engine import EngineRequest

    cell, lock = Cell("engine", clients, True), threading.Lock()

    def client(i: int) -> None:
        for k in range(per_client):
            t0 = time.perf_counter()
            last, ttft, itl = None, None, []
            try:
                h = engine.submit(EngineRequest(prompts[(i * per_client + k) % len(prompts)], mode, max_tokens))
            except ValueError:  # counted, as the server side counts its 400s
                with lock:
                    cell.errors += 1
                continue
            for ev in h:
                if isinstance(ev, Delta) and ev.text:
                    now = time.perf_counter()
                    ttft = now - t0 if ttft is None else ttft
                    if last is not None:
                        itl.append(now - last)
                    last = now
                elif isinstance(ev, GenerationResult):
                    with lock:
                        cell.done += 1
                        cell.tokens += len(ev.token_ids)
                        cell.ttft += [] if ttft is None else [ttft]
                        cell.itl += itl

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    cell.wall = time.perf_counter() - t0
    return cell


async def server_cell(url: str, prompts: list[str], mode: str, clients: int, per_client: int, max_tokens: int,
                      stream: bool, side: str) -> Cell:
    """The server as its users reach it: the `openai` client (one AsyncOpenAI, a connection per client)."""
    import httpx
    from openai import AsyncOpenAI

    cell = Cell(side, clients, stream)
    limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=clients + 4)
    api = AsyncOpenAI(base_url=url, api_key="unused", max_retries=0,
                      http_client=httpx.AsyncClient(limits=limits, timeout=3600))
    async with api:
        async def client(i: int) -> None:
            for k in range(per_client):
                args = {"model": "bench", "prompt": prompts[(i * per_client + k) % len(prompts)],
                        "max_tokens": max_tokens, "temperature": 0, "extra_body": {"mode": mode}}
                t0 = time.perf_counter()
                try:
                    tokens = await (_streamed(api, args, cell, t0) if stream else _whole(api, args))
                except Exception:  # counted; the other clients go on
                    cell.errors += 1
                    continue
                cell.done += 1
                cell.tokens += tokens

        t0 = time.perf_counter()
        await asyncio.gather(*(client(i) for i in range(clients)))
        cell.wall = time.perf_counter() - t0
    return cell


async def _whole(api, args: dict) -> int:
    r = await api.completions.create(**args)
    return r.usage.completion_tokens


async def _streamed(api, args: dict, cell: Cell, t0: float) -> int:
    last, tokens = None, None
    stream = await api.completions.create(**args, stream=True, stream_options={"include_usage": True})
    async for chunk in stream:
        if chunk.usage:
            tokens = chunk.usage.completion_tokens
        if chunk.choices and chunk.choices[0].text:
            now = time.perf_counter()
            if last is None:
                cell.ttft.append(now - t0)
            else:
                cell.itl.append(now - last)
            last = now
    if tokens is None:
        raise RuntimeError("the stream ended without usage")
    return tokens


def start(model: str | None, layout: list[str], threads: int, port: int):
    import os
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "trimode.cli", "serve", "--port", str(port), "--log-level", "warning",
           "--max-queue", "256", "--served-model-name", "bench", *layout]
    if model is not None:
        cmd += ["--model", model]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    return wait_until_healthy(proc, port, 600, lambda: proc.stderr.read())


def run(model: str | None, layouts: list[str], clients: list[int], requests: int, max_tokens: int, mode: str,
        threads: int, rounds: int = 3, echo=print) -> list[Cell]:
    """Every server layout runs at once (idle while another side is measured); per client count and round, each
    side's cells run back to back in a rotating order, so a burst of load from elsewhere hits every side alike.
    Each cell reported is the median round (by output tokens/s) with the latencies of all rounds."""
    import torch

    import trimode
    from trimode.engine import Engine

    torch.set_num_threads(threads)
    texts = bench_prompts()
    servers = {}
    try:
        for name in layouts:
            port = free_port()
            echo(f"starting `trimode serve {' '.join(LAYOUTS[name])}` ...")
            t0 = time.perf_counter()
            servers[name] = (start(model, LAYOUTS[name], threads, port), f"http://127.0.0.1:{port}/v1")
            echo(f"  /health answered 200 after {time.perf_counter() - t0:.1f} s (process start, model load, "
                 "engine start-up measurements)")
        tm = trimode.load(model)
        tok = tm.tokenizer.tok
        prompts = [tok.encode_batch([t], add_special_tokens=False)[0].ids for t in texts]  # as the server does
        with Engine(tm, max_queue=256) as engine:
            sides = [("engine", True)] + [(name, stream) for name in layouts for stream in (True, False)]

            def measure(side: str, stream: bool, n: int, per: int) -> Cell:
                if side == "engine":
                    return engine_cell(engine, prompts, mode, n, per, max_tokens)
                return asyncio.run(server_cell(servers[side][1], texts, mode, n, per, max_tokens, stream, side))

            for side, stream in sides:
                measure(side, stream, 2, 2)  # warm-up
            cells = []
            for n in clients:
                runs: dict = {s: [] for s in sides}
                for r in range(rounds):
                    for side, stream in sides[r % len(sides):] + sides[:r % len(sides)]:
                        cell = measure(side, stream, n, -(-requests // n))
                        runs[(side, stream)].append(cell)
                        echo(f"{side:>12} x{n:<3} {'stream' if stream else 'json  '} round {r + 1}: "
                             f"{cell.tokens_per_s:7.1f} tok/s")
                cells += [median(runs[s]) for s in sides]
    finally:
        for proc, _ in servers.values():
            proc.terminate()
            proc.wait(timeout=60)
    return cells


def median(rounds: list[Cell]) -> Cell:
    mid = sorted(rounds, key=lambda c: c.tokens_per_s)[(len(rounds) - 1) // 2]
    out = Cell(mid.side, mid.clients, mid.stream, mid.wall, mid.done, sum(c.errors for c in rounds), mid.tokens)
    out.ttft = [x for c in rounds for x in c.ttft]
    out.itl = [x for c in rounds for x in c.itl]
    return out


def report(cells: list[Cell], header: str) -> str:
    engine = {c.clients: c for c in cells if c.side == "engine"}
    lines = [header, "", "| side | clients | stream | ok | errors | output tok/s | / engine | TTFT p50 / p90 ms | "
             "ITL p50 / p90 / p99 ms |", "|---|---:|---|---:|---:|---:|---:|---:|---:|"]

    def ms(xs, *qs):
        return " / ".join(f"{1e3 * percentile(xs, q):.1f}" for q in qs)

    for c in sorted(cells, key=lambda c: (c.clients, c.side != "engine", c.side, not c.stream)):
        ref = engine.get(c.clients)
        ratio = f"{c.tokens_per_s / ref.tokens_per_s:.2f}x" if ref and ref.tokens_per_s and c is not ref else ""
        lines.append(f"| {c.side} | {c.clients} | {'events' if c.side == 'engine' else ('yes' if c.stream else 'no')}"
                     f" | {c.done} | {c.errors} | {c.tokens_per_s:.1f} | {ratio} | {ms(c.ttft, 50, 90)} | "
                     f"{ms(c.itl, 50, 90, 99)} |")
    return "\n".join(lines) + "\n"


def command(
    model: str | None = typer.Option(None, "--model", "-m", help="Checkpoint directory (default: the bundled model)."),
    layouts: str = typer.Option("thread,process,process-dp2", help=f"Server layouts: {', '.join(LAYOUTS)}."),
    clients: str = typer.Option("1,64", help="Comma-separated numbers of concurrent clients."),
    requests: int = typer.Option(64, help="Requests per cell, at least (each client sends ceil(requests / N))."),
    max_tokens: int = typer.Option(64, "--max-tokens"),
    mode: str = typer.Option("ar", help="The mode of every request."),
    threads: int = typer.Option(1, help="torch threads of the server and of the in-process engine."),
    rounds: int = typer.Option(3, help="Rounds per client count (the median round is reported)."),
    out: Path | None = typer.Option(None, help="Also write the markdown report here."),
) -> None:
    """Server tokens/s per layout beside the same requests on the engine in-process, streaming and not."""
    names = layout_names(layouts, "--layouts")
    try:
        levels = [int(x) for x in clients.split(",") if x.strip()]
    except ValueError:
        raise typer.BadParameter("comma-separated whole numbers", param_hint="--clients") from None
    if not levels or min(levels) < 1 or requests < 1 or max_tokens < 1 or threads < 1:
        raise typer.BadParameter("--clients, --requests, --max-tokens and --threads must be >= 1")
    command = (f"trimode bench serve-vs-engine --layouts {','.join(names)} --clients {clients} --requests {requests} "
               f"--max-tokens {max_tokens} --mode {mode} --threads {threads} --rounds {rounds}")
    command += f" --model {model}" if model else ""
    text = compare(model, names, levels, requests, max_tokens, mode, threads, rounds, command,
                   echo=lambda s: typer.echo(s, err=True))
    typer.echo(text, nl=False)
    if out is not None:
        out.write_text(text)


def layout_names(text: str, option: str) -> list[str]:
    names = [x.strip() for x in text.split(",") if x.strip()]
    if not names or any(x not in LAYOUTS for x in names):
        raise typer.BadParameter(f"choose layouts from {', '.join(LAYOUTS)}", param_hint=option)
    return names


def compare(model: str | None, layouts: list[str], clients: list[int], requests: int, max_tokens: int, mode: str,
            threads: int, rounds: int, command: str, echo=print) -> str:
    """Run the comparison (`run`) and return its markdown report, headed by the command that made it."""
    import os
    import platform

    cells = run(model, layouts, clients, requests, max_tokens, mode, threads, rounds, echo=echo)
    header = (f"Command: `{command}`  \nMachine: {platform.machine()}, {os.cpu_count()} CPU cores; mode {mode}, raw "
              f"completion prompts, greedy; the load generator shares the CPU on both sides; every side's cells "
              f"interleaved, the median of {rounds} rounds shown.")
    return report(cells, header)
