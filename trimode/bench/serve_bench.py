"""`trimode bench serve`: concurrent streaming clients against the OpenAI-compatible server, per mode.

For each mode and each concurrency N, N clients (the `openai` client, streaming completions) each send
ceil(requests / N) requests back to back; with `rounds` > 1 this repeats (modes in a new order) and the
median round's throughput is reported. Per cell it reports requests/s, output tokens/s, time to first
token (TTFT), inter-token latency (ITL: the gap between successive streamed text chunks), tokens per forward
pass (from the server's `trimode` statistics) and errors / lost requests; then, per concurrency, whether
`auto` reached the best fixed mode's output tokens/s; and it plots throughput against concurrency.

Without `--url` it starts `trimode serve` on the model in a child process (so the clients do not share the
server's interpreter) and stops it at the end.
"""

from __future__ import annotations

import asyncio
import os
import random
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from trimode.decode.modes import names

# The modes a request can name that decide nothing by themselves (auto does), from the registry.
FIXED_MODES = names(engine_only=False, editing=False)


@dataclass
class Cell:
    mode: str
    concurrency: int
    wall: float = 0.0
    sent: int = 0
    done: int = 0
    errors: list[str] = field(default_factory=list)
    tokens: int = 0
    forwards: int = 0
    ttft: list[float] = field(default_factory=list)
    itl: list[float] = field(default_factory=list)
    rounds_ok: int | None = None  # requests completed over all rounds (merged cells)
    round_tokens_per_s: list[float] = field(default_factory=list)  # each round's output tokens/s (merged cells)
    checked: int = 0  # structured prompts: answers checked against the item (all rounds, for merged cells)
    right: int = 0  # ... and right (the item's own checker on the streamed text, as the model card's evaluation)

    @property
    def ok(self) -> int:
        return self.done if self.rounds_ok is None else self.rounds_ok

    @property
    def requests_per_s(self) -> float:
        return self.done / self.wall if self.wall else 0.0

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.wall if self.wall else 0.0

    @property
    def tokens_per_forward(self) -> float:
        return self.tokens / self.forwards if self.forwards else 0.0


def percentile(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    s = sorted(xs)
    return s[min(len(s) - 1, max(0, round(q / 100 * (len(s) - 1))))]


def bench_prompts(n: int = 40, seed: int = 0) -> list[str]:
    """Held-out prompts of the bundled tasks, interleaved (arithmetic, code, copy, reverse, sort)."""
    from trimode.tasks import load_tasks, plain_tasks

    per_task = [load_tasks(name, n=n, seed=seed, split="heldout") for name in plain_tasks()]
    return [items[i].prompt for i in range(n) for items in per_task if i < len(items)]


APIS = ("chat", "completions")
SCHEMA = " + schema"  # a cell whose requests carried their JSON schema (`--structured`)


@dataclass(frozen=True)
class StructuredPrompt:
    """A held-out `json_<task>` item as a chat request: its messages (the schema in the system turn), the
    schema its `response_format` carries (bounded as the model card's evaluation bounds it), and its checker
    (`check(text)`: whether the streamed answer is right)."""

    messages: tuple[dict, ...]
    schema: dict
    check: Callable[[str], bool] = field(compare=False, repr=False)


def structured_prompts(n: int = 20, seed: int = 0) -> list[StructuredPrompt]:
    """Held-out items of the JSON tasks, interleaved (arithmetic, copy, reverse, sort)."""
    from trimode.tasks import load_tasks
    from trimode.tasks.structured import BASE_TASKS, bounded, item_schema

    per_task = [load_tasks(f"json_{task}", n=n, seed=seed, split="heldout") for task in BASE_TASKS]
    return [StructuredPrompt(tuple(items[i].messages), bounded(item_schema(items[i])), items[i].check)
            for i in range(n) for items in per_task if i < len(items)]


async def run_cell(base_url: str, model: str, mode: str, concurrency: int, per_client: int,
                   prompts: list[str] | list[StructuredPrompt], max_tokens: int, api_key: str, api: str = "chat",
                   schema: bool = False) -> Cell:
    """`api` "chat": each prompt is one user message (the chat template applies, as for a chat client);
    "completions": the prompt is sent as raw text. A `StructuredPrompt` is sent as its messages, with
    `response_format` json_schema (strict) when `schema` (the cell is then labelled mode + SCHEMA)."""
    import httpx
    from openai import AsyncOpenAI

    cell = Cell(mode + (SCHEMA if schema else ""), concurrency)
    limits = httpx.Limits(max_connections=concurrency + 8, max_keepalive_connections=concurrency + 8)
    client = AsyncOpenAI(base_url=base_url, api_key=api_key, max_retries=0, timeout=3600,
                         http_client=httpx.AsyncClient(limits=limits, timeout=3600))

    async def one_client(i: int) -> None:
        for k in range(per_client):
            prompt = prompts[(i * per_client + k) % len(prompts)]
            cell.sent += 1
            t0 = time.perf_counter()
            first = last = None
            usage = None
            text = []
            try:
                common = dict(model=model, max_tokens=max_tokens, temperature=0.0, stream=True,
                              stream_options={"include_usage": True}, extra_body={"mode": mode})
                if isinstance(prompt, StructuredPrompt):
                    if schema:
                        common["response_format"] = {"type": "json_schema", "json_schema": {
                            "name": "answer", "schema": prompt.schema, "strict": True}}
                    stream = await client.chat.completions.create(messages=list(prompt.messages), **common)
                elif api == "chat":
                    stream = await client.chat.completions.create(
                        messages=[{"role": "user", "content": prompt}], **common)
                else:
                    stream = await client.completions.create(prompt=prompt, **common)
                async for chunk in stream:
                    piece = chunk.choices and (chunk.choices[0].delta.content if api == "chat"
                                               else chunk.choices[0].text)
                    if piece:
                        text.append(piece)
                        now = time.perf_counter()
                        if first is None:
                            first = now
                            cell.ttft.append(now - t0)
                        else:
                            cell.itl.append(now - last)
                        last = now
                    if chunk.usage is not None:
                        usage = chunk
            except Exception as e:  # counted and reported; the other clients go on
                cell.errors.append(f"{type(e).__name__}: {e}"[:200])
                continue
            if usage is None:
                cell.errors.append("the stream ended without its usage chunk")
                continue
            stats = (usage.model_extra or {}).get("trimode") or {}
            cell.done += 1
            cell.tokens += usage.usage.completion_tokens
            cell.forwards += int(stats.get("forward_passes", 0))
            if isinstance(prompt, StructuredPrompt):
                cell.checked += 1
                cell.right += bool(prompt.check("".join(text)))

    t0 = time.perf_counter()
    try:
        await asyncio.gather(*(one_client(i) for i in range(concurrency)))
    finally:
        cell.wall = time.perf_counter() - t0
        await client.close()
    return cell


def merge(rounds: list[Cell]) -> Cell:
    """One cell from repeated rounds: the throughput of the median round (by output tokens/s), latencies and
    request counts of all rounds."""
    ranked = sorted(rounds, key=lambda c: c.tokens_per_s)
    mid = ranked[(len(ranked) - 1) // 2]
    out = Cell(mid.mode, mid.concurrency, wall=mid.wall, done=mid.done, tokens=mid.tokens, forwards=mid.forwards)
    out.sent = sum(c.sent for c in rounds)
    out.errors = [e for c in rounds for e in c.errors]
    out.ttft = [x for c in rounds for x in c.ttft]
    out.itl = [x for c in rounds for x in c.itl]
    out.rounds_ok = sum(c.done for c in rounds)
    out.round_tokens_per_s = [c.tokens_per_s for c in rounds]
    out.checked = sum(c.checked for c in rounds)
    out.right = sum(c.right for c in rounds)
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model: str | None, port: int, block_length: int | None, dtype: str | None, device: str | None,
                 max_queue: int, threads: int | None = None, timeout: float = 300,
                 auto_config: str | None = None, extra: list[str] | tuple[str, ...] = ()) -> subprocess.Popen:
    """`trimode serve` on `model` in a child process (`extra`: more flags), once /health answers."""
    cmd = [sys.executable, "-m", "trimode.cli", "serve", "--port", str(port), "--log-level", "warning",
           "--max-queue", str(max_queue), "--served-model-name", "bench"]
    for flag, value in (("--model", model), ("--block-length", block_length), ("--dtype", dtype),
                        ("--device", device), ("--auto-config", auto_config)):
        if value is not None:
            cmd += [flag, str(value)]
    cmd += list(extra)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)  # torch's intra-op threads in the server
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    return wait_until_healthy(proc, port, timeout, lambda: proc.stderr.read())


def wait_until_healthy(proc: subprocess.Popen, port: int, timeout: float, stderr) -> subprocess.Popen:
    """Poll a started `trimode serve` until /health answers; RuntimeError with its last words if it exits or
    does not answer within `timeout` seconds (`stderr()` returns what it wrote)."""
    import httpx

    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited: {stderr().strip()[-500:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    proc.terminate()
    raise RuntimeError(f"the server did not answer /health within {timeout:.0f} s")


def auto_state(base_url: str, api_key: str) -> dict | None:
    """What the server's auto policy has learned (its /health `auto` field), or None."""
    import httpx

    try:
        health = httpx.get(base_url.removesuffix("/v1") + "/health", timeout=30,
                           headers={"Authorization": f"Bearer {api_key}"}).json()
    except (httpx.HTTPError, ValueError):
        return None
    return health.get("auto") if isinstance(health, dict) else None


def answers(c: Cell) -> str:
    return f"{c.right}/{c.checked} ({100 * c.right / c.checked:.1f}%)" if c.checked else "-"


def report(cells: list[Cell], header: str, auto: dict | None = None) -> str:
    lines = [header, "",
             "| mode | clients | requests ok/sent | errors | req/s | output tok/s | TTFT p50 / p90 ms "
             "| ITL p50 / p90 / p99 ms | tokens/forward | tok/s per round |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for c in cells:
        lines.append(
            f"| {c.mode} | {c.concurrency} | {c.ok}/{c.sent} | {len(c.errors)} | {c.requests_per_s:.2f} "
            f"| {c.tokens_per_s:.1f} | {1e3 * percentile(c.ttft, 50):.0f} / {1e3 * percentile(c.ttft, 90):.0f} "
            f"| {1e3 * percentile(c.itl, 50):.1f} / {1e3 * percentile(c.itl, 90):.1f} / "
            f"{1e3 * percentile(c.itl, 99):.1f} | {c.tokens_per_forward:.2f} "
            f"| {', '.join(f'{x:.0f}' for x in c.round_tokens_per_s) or '-'} |")
    paired = [(c, s) for c in cells for s in cells
              if s.mode == c.mode + SCHEMA and s.concurrency == c.concurrency]
    if paired:
        lines += ["", "Tokens per forward on the same JSON-task prompts, free / under their schemas (the server's "
                  "own count, from each response's `trimode` usage statistics), and the answers right (each item's "
                  "checker on the streamed text; a free answer must be the JSON object too):", ""]
        lines += [f"- {c.mode} x{c.concurrency}: {c.tokens_per_forward:.2f} free, {s.tokens_per_forward:.2f} under "
                  f"the schema ({s.tokens_per_forward / c.tokens_per_forward if c.tokens_per_forward else 0:.2f}x); "
                  f"right {answers(c)} free, {answers(s)} under the schema"
                  for c, s in paired]
    verdicts = auto_verdicts(cells)
    if verdicts:
        lines += ["", "auto against the best fixed mode (output tokens/s):", ""]
        lines += [f"- {v}" for v in verdicts]
    if auto:
        lines += ["", "auto's learned state at the end of the run (the server's GET /health): tokens per cycle "
                  f"{auto.get('tokens_per_cycle')}, slowdown (measured at start-up) {auto.get('slowdown')}, step "
                  f"overhead per row {auto.get('step_overhead_per_row_s')} s, picks {auto.get('picks')}"]
    errors = [(c, e) for c in cells for e in c.errors[:3]]
    if errors:
        lines += ["", "first errors:"] + [f"- {c.mode} x{c.concurrency}: {e}" for c, e in errors]
    return "\n".join(lines) + "\n"


LOSSLESS_MODES = names(lossless=True, engine_only=False, editing=False)  # auto's candidates: output is AR's


def auto_verdicts(cells: list[Cell]) -> list[str]:
    """Per concurrency: auto against the best fixed mode, and against the best lossless one (diffusion's output
    differs from AR's, so auto, which must give the same output at any load, never picks it), with the spread of
    the rounds so a difference can be told from noise."""

    def spread(c: Cell) -> list[float]:
        return c.round_tokens_per_s or [c.tokens_per_s]

    def rounds(c: Cell) -> str:
        return f"{min(spread(c)):.0f}-{max(spread(c)):.0f}"

    out = []
    for n in sorted({c.concurrency for c in cells}):
        auto = [c for c in cells if c.mode == "auto" and c.concurrency == n]
        fixed = [c for c in cells if c.mode in FIXED_MODES and c.concurrency == n]
        if not auto or not fixed:
            continue
        a = auto[0]
        line = f"{n} clients: auto {a.tokens_per_s:.1f} (rounds {rounds(a)})"
        lossless = [c for c in fixed if c.mode in LOSSLESS_MODES]
        for label, group in (("best fixed", fixed), ("best lossless", lossless)):
            if not group or (label == "best lossless" and len(lossless) == len(fixed)):
                continue
            best = max(group, key=lambda c: c.tokens_per_s)
            ratio = a.tokens_per_s / best.tokens_per_s if best.tokens_per_s else float("inf")
            verdict = "at or above" if ratio >= 1 else "BELOW"
            if ratio < 1 and max(spread(a)) >= min(spread(best)):  # a round of auto beat a round of the best
                verdict += " (the rounds overlap)"
            line += (f"; vs {label} {best.mode} {best.tokens_per_s:.1f} (rounds {rounds(best)}): {ratio:.2f}x "
                     f"{verdict}")
            if len(spread(a)) > 1 and len(spread(a)) == len(spread(best)):
                # Both ran in every round, minutes apart at most: the ratio within a round is the paired one.
                paired = ", ".join(f"{x / y:.2f}" for x, y in zip(spread(a), spread(best), strict=True))
                line += f" (per round: {paired})"
        out.append(line)
    return out


def plot(cells: list[Cell], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for mode in dict.fromkeys(c.mode for c in cells):
        pts = sorted((c.concurrency, c.tokens_per_s) for c in cells if c.mode == mode)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=mode,
                linewidth=2.5 if mode == "auto" else 1.5, linestyle="-" if mode == "auto" else "--")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("concurrent streaming clients")
    ax.set_ylabel("output tokens / s")
    ax.set_title(title, fontsize=9)
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def round_order(modes: list[str], r: int) -> list[str]:
    """The order of the modes in round r: the given one first, then seeded shuffles, so that no mode always runs
    first or always follows the same mode (a slow cell can leave the machine warm or its memory fragmented)."""
    order = list(modes)
    if r:
        random.Random(f"bench serve round {r}").shuffle(order)
    return order


def run(model: str | None, url: str | None, modes: list[str], concurrency: list[int], requests: int,
        max_tokens: int, block_length: int | None, dtype: str | None, device: str | None, api_key: str,
        threads: int | None = None, rounds: int = 1, warmup: int = 4, echo=print, api: str = "chat",
        auto_config: str | None = None, structured: bool = False) -> tuple[list[Cell], dict | None]:
    """The cells, and the server's auto state at the end (None when it has none). `structured`: the prompts are
    held-out JSON-task chats (`structured_prompts`), each mode run on them free and under their schemas (cells
    `mode` and `mode + schema`, side by side in every round)."""
    if api not in APIS:
        raise ValueError(f"api must be one of {', '.join(APIS)}, got {api!r}")
    if structured and api != "chat":
        raise ValueError("structured prompts are chats: use api chat")
    prompts = structured_prompts() if structured else bench_prompts()
    variants = (False, True) if structured else (False,)
    proc = None
    if url is None:
        port = free_port()
        echo(f"starting `trimode serve` on port {port} ...")
        proc = start_server(model, port, block_length, dtype, device, max(64, 2 * max(concurrency)), threads,
                            auto_config=auto_config)
        url = f"http://127.0.0.1:{port}/v1"
    cells = []
    try:
        for mode in modes:  # warm every mode's code path before anything is timed
            for schema in variants:
                asyncio.run(run_cell(url, "bench", mode, 1, warmup, prompts, max_tokens, api_key, api, schema))
        for n in concurrency:
            per_client = -(-requests // n)
            runs: dict[str, list[Cell]] = {}
            for r in range(rounds):
                for mode in round_order(modes, r):
                    for schema in variants:
                        cell = asyncio.run(run_cell(url, "bench", mode, n, per_client, prompts, max_tokens, api_key,
                                                    api, schema))
                        echo(f"{cell.mode:>24} x{n:<3} round {r + 1}: {cell.done}/{cell.sent} ok, "
                             f"{cell.tokens_per_s:8.1f} tok/s, TTFT p50 {1e3 * percentile(cell.ttft, 50):.0f} ms, "
                             f"TPF {cell.tokens_per_forward:.2f}")
                        runs.setdefault(cell.mode, []).append(cell)
            cells += [merge(runs[m]) for m in sorted(runs, key=lambda m: (modes.index(m.removesuffix(SCHEMA)), m))]
        auto = auto_state(url, api_key) if "auto" in modes else None
    finally:
        if proc is not None:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
    return cells, auto
