"""`trimode bench serve --workload agent`: the prefix cache measured over HTTP, cache on vs off, side by side.

The workload of `trimode bench agent` (agent_bench.py: a long shared system prompt with tools, conversations whose
every turn extends the last), sent by `conversations` concurrent HTTP clients (streaming /v1/completions, the
conversation as raw text) to two `trimode serve` child processes started on the same model, one with
`--no-prefix-cache`. Per server and mode: prompt tokens sent and computed (the answers' usage
`prompt_tokens_details.cached_tokens`), time to first token per turn (median over conversations), output tokens/s,
and whether every answer's text matches the other server's.
"""

from __future__ import annotations

import asyncio
import subprocess
import time

from trimode.bench.agent_bench import SYSTEM, TOOLS, ModeRun, next_turn
from trimode.bench.serve_bench import free_port, start_server


async def _conversations(base_url: str, mode: str, cache: bool, conversations: int, turns: int, max_tokens: int,
                         api_key: str) -> ModeRun:
    import httpx
    from openai import AsyncOpenAI

    run = ModeRun(mode, cache, [[""] * turns for _ in range(conversations)],
                  [[0.0] * turns for _ in range(conversations)], 0, 0, 0, 0.0)
    limits = httpx.Limits(max_connections=conversations + 4)
    client = AsyncOpenAI(base_url=base_url, api_key=api_key, max_retries=0, timeout=3600,
                         http_client=httpx.AsyncClient(limits=limits, timeout=3600))

    async def conversation(c: int) -> None:
        history = None
        for t in range(turns):
            history = next_turn(history, c, t)
            t0, text, usage = time.perf_counter(), "", None
            stream = await client.completions.create(model="bench", prompt=history, max_tokens=max_tokens,
                                                     temperature=0.0, stream=True, extra_body={"mode": mode},
                                                     stream_options={"include_usage": True})
            async for chunk in stream:
                if chunk.choices and chunk.choices[0].text:
                    if not text:
                        run.ttft[c][t] = time.perf_counter() - t0
                    text += chunk.choices[0].text
                if chunk.usage is not None:
                    usage = chunk.usage
            if usage is None:
                raise RuntimeError("the server sent no usage chunk")
            if not text:
                run.ttft[c][t] = time.perf_counter() - t0
            run.texts[c][t] = text
            run.prompt_tokens += usage.prompt_tokens
            run.cached_tokens += usage.prompt_tokens_details.cached_tokens if usage.prompt_tokens_details else 0
            run.generated += usage.completion_tokens
            history += text

    t0 = time.perf_counter()
    try:
        await asyncio.gather(*(conversation(c) for c in range(conversations)))
    finally:
        await client.close()
    run.seconds = time.perf_counter() - t0
    return run


def _reset(base_url: str, api_key: str) -> None:
    """Empty the server's prefix cache (its warm-up filled it): every run starts cold."""
    import httpx

    r = httpx.post(base_url.removesuffix("/v1") + "/admin/reset_prefix_cache", json={}, timeout=60,
                   headers={"Authorization": f"Bearer {api_key}"})
    r.raise_for_status()


def run(model: str | None, modes: list[str], conversations: int, turns: int, max_tokens: int, dtype: str | None,
        device: str | None, threads: int | None, api_key: str = "none", echo=print,
        auto_config: str | None = None) -> list[tuple[ModeRun, ModeRun]]:
    """(cache off, cache on) per mode: two servers started side by side, each mode's workload sent to one, then
    the other."""
    servers: list[tuple[bool, subprocess.Popen, str]] = []
    try:
        for cache in (False, True):
            port = free_port()
            echo(f"starting `trimode serve` ({'--prefix-cache' if cache else '--no-prefix-cache'}) on port {port} ...")
            proc = start_server(model, port, None, dtype, device, 2 * conversations + 8, threads,
                                auto_config=auto_config, extra=["--prefix-cache" if cache else "--no-prefix-cache"])
            servers.append((cache, proc, f"http://127.0.0.1:{port}/v1"))
        pairs = []
        for mode in modes:
            pair = []
            for cache, _, url in servers:
                asyncio.run(_conversations(url, mode, cache, 1, 1, 2, api_key))  # warm the mode's code path
                _reset(url, api_key)
                r = asyncio.run(_conversations(url, mode, cache, conversations, turns, max_tokens, api_key))
                echo(f"{mode:>15} cache {'on ' if cache else 'off'}: {r.prompt_tokens - r.cached_tokens}/"
                     f"{r.prompt_tokens} prompt tokens computed, {r.generated / r.seconds:.1f} tok/s")
                pair.append(r)
            pairs.append(tuple(pair))
        return pairs
    finally:
        for _, proc, _ in servers:
            proc.terminate()
        for _, proc, _ in servers:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()


def report(pairs: list[tuple[ModeRun, ModeRun]], conversations: int, turns: int, max_tokens: int,
           header: str) -> str:
    last = turns - 1
    lines = ["## Prefix cache over HTTP: agent workload, cache off vs on", "", header, "",
             f"{conversations} concurrent HTTP clients x {turns} turns, a {len(SYSTEM + TOOLS)}-character system "
             f"prompt with tools, up to {max_tokens} new tokens per turn; two `trimode serve` processes.", "",
             f"| mode | cache | prompt tokens | computed | from cache | TTFT turn 1 | TTFT turn {turns} | tokens/s | "
             "same text |", "|---|---|---:|---:|---:|---:|---:|---:|---|"]
    for off, on in pairs:
        same = "yes" if off.texts == on.texts else "NO"
        for r in (off, on):
            share = 100 * r.cached_tokens / r.prompt_tokens if r.prompt_tokens else 0.0
            lines.append(f"| {r.mode} | {'on' if r.cache else 'off'} | {r.prompt_tokens} | "
                         f"{r.prompt_tokens - r.cached_tokens} | {share:.0f}% | {1000 * r.ttft_turn(0):.0f} ms | "
                         f"{1000 * r.ttft_turn(last):.0f} ms | {r.generated / r.seconds:.1f} | {same} |")
        speed = (on.generated / on.seconds) / (off.generated / off.seconds) if off.generated and on.seconds else 0
        lines.append(f"| {off.mode} | on / off | | | | | {off.ttft_turn(last) / on.ttft_turn(last):.1f}x faster | "
                     f"{speed:.2f}x | |")
    return "\n".join(lines) + "\n"
