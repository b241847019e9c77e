"""`trimode bench {quality,speed,gpu,soak}` and `trimode export`. Heavy imports happen inside the commands.

`bench_app` is the typer group; other layers may attach commands to it (`bench serve`).
"""

from __future__ import annotations

import os
from pathlib import Path

import typer

bench_app = typer.Typer(
    help="Benchmarks: accuracy against speed per mode, decode and pass speed, the GPU fast path, a server soak.",
    no_args_is_help=True,
)


def _fail(message: str) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code=2)


def _split(text: str | None, kind=str, name: str = "list") -> list | None:
    if text is None:
        return None
    try:
        return [kind(x.strip()) for x in text.split(",") if x.strip()]
    except ValueError:
        _fail(f"--{name}: cannot read {text!r} as a comma-separated list of {kind.__name__}")


def _command_line(ctx: typer.Context) -> str:
    """The command as typed (options that differ from their defaults), for the report header."""
    parts = ["trimode", *ctx.command_path.split()[1:]]  # the root's name is the console script's
    for param in ctx.command.params:
        value = ctx.params.get(param.name)
        if value is None or value == param.default or not param.opts:
            continue
        opt = max(param.opts, key=len)
        if isinstance(value, bool):
            flags = param.opts if value else param.secondary_opts
            if flags:
                parts.append(max(flags, key=len))
            continue
        parts.append(f"{opt} {value}")
    return " ".join(parts)


def _set_threads(threads: int | None) -> None:
    if threads is not None:
        if threads < 1:
            _fail(f"--threads must be >= 1, got {threads}")
        import torch

        torch.set_num_threads(threads)  # on a busy shared CPU one thread is often faster and steadier


def _emit(report: str, out: Path | None, ctx: typer.Context) -> None:
    typer.echo(report, nl=False)
    if out is not None:
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(f"Command: `{_command_line(ctx)}`\n\n{report}")
        except OSError as e:
            _fail(f"cannot write {out}: {e}")
        typer.echo(f"wrote {out}", err=True)


# typer.Exit is a RuntimeError: parse options before the try blocks that turn these into one-line errors.
ERRORS = (ValueError, OSError, RuntimeError)


@bench_app.command()
def sol(
    ctx: typer.Context,
    model: str | None = typer.Option(None, "--model", "-m", help="Checkpoint directory or Hub id (default: bundled)."),
    tasks: str | None = typer.Option(None, help="Comma-separated trimode.tasks names (default: all)."),
    items: int = typer.Option(8, "--items", help="Held-out items per task."),
    thresholds: str = typer.Option("0.5,0.7,0.9", help="Threshold rules to measure."),
    learned: str | None = typer.Option(None, help="Sampler thresholds of the learned rule (default 0.3,0.5,0.7 "
                                                  "when the model has a sampler/)."),
    block_length: int | None = typer.Option(None, "--block-length", help="Block length (default: the model's)."),
    cap: int = typer.Option(5000, help="Most forwards of the compaction search per block."),
    seed: int = typer.Option(0, help="Seed choosing the held-out items."),
    json_out: Path | None = typer.Option(None, "--json", help="Write the figures as JSON here."),
    plot: Path | None = typer.Option(None, help="PNG of tokens per forward: bounds and rules."),
    out: Path | None = typer.Option(None, help="Also write the markdown report here."),
    threads: int | None = typer.Option(None, help="CPU threads for torch (default: torch's choice)."),
) -> None:
    """Speed-of-light analysis (spec 2.6): serial target, greedy oracle and compaction bound per block, beside
    what the threshold and learned rules reach and linear_spec's acceptance (trimode/bench/sol.py)."""
    from trimode.bench import sol as s

    _set_threads(threads)
    try:
        report, _ = s.run(model, _split(tasks, name="tasks"), items, _split(thresholds, float, "thresholds"),
                          _split(learned, float, "learned"), block_length, cap, seed, json_out, plot,
                          lambda i, n: typer.echo(f"  item {i}/{n}", err=True))
    except ERRORS as e:
        _fail(str(e))
    _emit(report, out, ctx)


@bench_app.command()
def quality(
    ctx: typer.Context,
    model: str | None = typer.Option(None, "--model", "-m", help="Checkpoint directory or Hub id (default: bundled)."),
    tasks: str | None = typer.Option(None, help="Comma-separated tasks: humaneval and the trimode.tasks names "
                                                "(default: all)."),
    n: int = typer.Option(20, "--n", help="Held-out items per task."),
    modes: str | None = typer.Option(None, help="Comma-separated modes (default: all four)."),
    block_lengths: str | None = typer.Option(None, "--block-lengths", help="Comma-separated block lengths "
                                                                           "(default: the model's)."),
    thresholds: str = typer.Option("0.5,0.7,0.9", help="Diffusion commit thresholds to sweep ('' for none)."),
    steps: str | None = typer.Option(None, help="Diffusion fixed-step schedules to sweep: steps per block, e.g. "
                                                "'8,16,32' (default: none)."),
    remask: str | None = typer.Option(None, help="Diffusion remask thresholds to sweep with each threshold, e.g. "
                                                 "'0.3,0.6' (default: none)."),
    edits: bool = typer.Option(True, "--edits/--no-edits", help="Infill and revision rows for the list tasks."),
    max_new_tokens: int | None = typer.Option(None, "--max-new-tokens", help="Token budget (default: per task)."),
    seed: int = typer.Option(0, help="Seed choosing the generated tasks' held-out items."),
    out: Path | None = typer.Option(None, help="Also write the markdown report here."),
    plot: Path | None = typer.Option(None, help="PNG of accuracy against TPF (default: next to --out)."),
    device: str | None = typer.Option(None, help="cpu / cuda (default: cuda when available)."),
    dtype: str | None = typer.Option(None, help="float32 / bfloat16 (default: float32 on CPU, bfloat16 on CUDA)."),
    threads: int | None = typer.Option(None, help="CPU threads for torch (default: torch's choice)."),
) -> None:
    """Held-out accuracy, TPF (prefill counted and not), acceptance and tok/s for each mode and knob setting."""
    from trimode.bench import quality as q

    _set_threads(threads)
    if plot is None and out is not None:
        plot = out.with_suffix(".png")

    def progress(o) -> None:
        typer.echo(f"  {o.task:>16} {o.config.label:<28} acc {o.accuracy:.3f}  TPF {o.tpf:.2f}", err=True)

    lists = (_split(tasks, name="tasks"), _split(modes, name="modes"), _split(block_lengths, int, "block-lengths"),
             _split(thresholds, float, "thresholds"), _split(steps, int, "steps"), _split(remask, float, "remask"))
    try:
        report, _ = q.run(model, lists[0], n, lists[1], lists[2], lists[3], max_new_tokens, seed, plot, device, dtype,
                          progress, lists[4], lists[5], edits)
    except ERRORS as e:
        _fail(str(e))
    _emit(report, out, ctx)


@bench_app.command()
def speed(
    ctx: typer.Context,
    model: str | None = typer.Option(None, "--model", "-m", help="Checkpoint directory or Hub id (default: bundled)."),
    prompt: str | None = typer.Option(None, help="Prompt text (default: a short code prompt)."),
    prompt_ids: str | None = typer.Option(None, "--prompt-ids", help="Prompt as comma-separated token ids."),
    modes: str | None = typer.Option(None, help="Comma-separated modes (default: all four)."),
    max_new_tokens: int = typer.Option(64, "--max-new-tokens", "-n", help="Tokens to generate per run."),
    token_counts: str = typer.Option("1,8,32,64,72", "--token-counts", help="Pass sizes to time."),
    context: int = typer.Option(64, help="KV prefix length for the pass timings."),
    repeats: int = typer.Option(3, help="Timed runs per mode (median reported)."),
    iters: int = typer.Option(5, help="Passes per timing sample."),
    hf: bool = typer.Option(True, "--hf/--no-hf", help="Compare with transformers on the exported weights."),
    static: bool | None = typer.Option(None, "--static/--eager", help="Static cache + CUDA graphs (default: on CUDA)."),
    respect_eos: bool = typer.Option(False, "--respect-eos", help="Stop at EOS (default: always max_new_tokens)."),
    out: Path | None = typer.Option(None, help="Also write the markdown report here."),
    device: str | None = typer.Option(None, help="cpu / cuda (default: cuda when available)."),
    dtype: str | None = typer.Option(None, help="float32 / bfloat16 (default: float32 on CPU, bfloat16 on CUDA)."),
    threads: int | None = typer.Option(None, help="CPU threads for torch (default: torch's choice)."),
) -> None:
    """Decode speed per mode at batch 1, pass cost against token count, and transformers side by side."""
    from trimode.bench import speed as s

    _set_threads(threads)
    ids, mode_list, counts = (_split(prompt_ids, int, "prompt-ids"), _split(modes, name="modes"),
                              _split(token_counts, int, "token-counts"))
    try:
        report = s.run(model, prompt, ids, mode_list, max_new_tokens, counts, context, repeats, iters, hf, static,
                       device, dtype, ignore_eos=not respect_eos)
    except ERRORS as e:
        _fail(str(e))
    _emit(report, out, ctx)


@bench_app.command()
def engine(
    ctx: typer.Context,
    model: str | None = typer.Option(None, "--model", "-m", help="Checkpoint directory or Hub id (default: bundled)."),
    modes: str = typer.Option("ar,linear_spec,quadratic_spec", help="Comma-separated modes."),
    requests: str = typer.Option("1,16,64", help="Comma-separated numbers of concurrent requests."),
    prompt_tokens: int = typer.Option(32, "--prompt-tokens", help="Prompt length of every request."),
    max_new_tokens: int = typer.Option(64, "--max-new-tokens", "-n", help="Tokens every request generates."),
    block_length: int | None = typer.Option(None, "--block-length", help="Block length of the speculative modes "
                                            "(default: the model's)."),
    rounds: int = typer.Option(3, help="Engine / bare pairs per cell (median ratio reported)."),
    out: Path | None = typer.Option(None, help="Also write the markdown report here."),
    device: str | None = typer.Option(None, help="cpu / cuda (default: cuda when available)."),
    dtype: str | None = typer.Option(None, help="float32 / bfloat16 (default: float32 on CPU, bfloat16 on CUDA)."),
    threads: int | None = typer.Option(None, help="CPU threads for torch (default: torch's choice)."),
    served: str = typer.Option("asyncio", help="Clients of the served measurement, comma-separated: asyncio (one "
                               "event loop reads every request, as the HTTP server's handlers, on the server's "
                               "loop: uvloop where installed), asyncio-std (the same on Python's own asyncio "
                               "loop), threads (one "
                               "thread per request) and/or process (the engine core in its own process, the HTTP "
                               "server's default layout, read by one event loop here)."),
) -> None:
    """Engine tokens/s against the bare batched forwards it runs, per mode and number of requests."""
    from trimode.bench import engine_bench
    from trimode.cli import load_or_fail
    from trimode.decode.modes import MODES

    _set_threads(threads)
    mode_list, loads = _split(modes, name="modes"), _split(requests, int, "requests")
    bad = [m for m in mode_list if m not in MODES]
    if bad or not mode_list:
        _fail(f"--modes: unknown {', '.join(bad) or '(none given)'}; choose from {', '.join(MODES)}")
    if not loads or min(loads) < 1 or rounds < 1 or max_new_tokens < 1 or prompt_tokens < 1:
        _fail("--requests, --rounds, --max-new-tokens and --prompt-tokens must be positive")
    clients = tuple(_split(served, name="served"))
    if not clients or any(c not in engine_bench.SERVED for c in clients):
        _fail(f"--served: choose from {', '.join(engine_bench.SERVED)}, got {served!r}")
    tm = load_or_fail(model, dtype, device)

    def progress(c) -> None:
        ratios = " ".join(f"served({k})/bare {c.served_ratio(k):.2f}" for k in clients)
        typer.echo(f"  {c.mode:>15} x{c.requests:<3} engine/bare {c.ratio:.2f} {ratios} "
                   f"syncs/step {c.syncs[0]:.1f} + {c.syncs[1]:.1f}", err=True)

    try:
        report, _ = engine_bench.run(tm, mode_list, loads, prompt_tokens, max_new_tokens, rounds, block_length,
                                     progress, clients)
    except ERRORS as e:
        _fail(str(e))
    _emit(report, out, ctx)


@bench_app.command()
def agent(
    ctx: typer.Context,
    model: str | None = typer.Option(None, "--model", "-m", help="Checkpoint directory or Hub id (default: bundled)."),
    modes: str = typer.Option("ar,linear_spec,quadratic_spec,diffusion", help="Comma-separated modes."),
    conversations: int = typer.Option(4, help="Conversations running at once."),
    turns: int = typer.Option(4, help="Turns per conversation (each extends the one before)."),
    max_new_tokens: int = typer.Option(24, "--max-new-tokens", "-n", help="Most tokens per answer."),
    block_length: int | None = typer.Option(None, "--block-length", help="Block length of the block modes "
                                            "(default: the model's)."),
    out: Path | None = typer.Option(None, help="Also write the markdown report here."),
    device: str | None = typer.Option(None, help="cpu / cuda (default: cuda when available)."),
    dtype: str | None = typer.Option(None, help="float32 / bfloat16 (default: float32 on CPU, bfloat16 on CUDA)."),
    threads: int | None = typer.Option(None, help="CPU threads for torch (default: torch's choice)."),
) -> None:
    """Prefix cache on vs off on an agent-like workload (shared system prompt, growing conversations): prompt
    tokens computed, time to first token, throughput, identical text; and requests at once on a fixed KV pool with
    worst-case reservation vs pages on demand."""
    from trimode.bench import agent_bench
    from trimode.cli import load_or_fail
    from trimode.decode.modes import MODES

    _set_threads(threads)
    mode_list = _split(modes, name="modes")
    bad = [m for m in mode_list if m not in MODES or MODES[m].editing or MODES[m].engine_only]
    if bad or not mode_list:
        _fail(f"--modes: not a continuation mode: {', '.join(bad) or '(none given)'}")
    if min(conversations, turns, max_new_tokens) < 1:
        _fail("--conversations, --turns and --max-new-tokens must be positive")
    tm = load_or_fail(model, dtype, device)
    knobs = {} if block_length is None else {"block_length": block_length}

    def progress(pair) -> None:
        off, on = pair
        typer.echo(f"  {off.mode:>15} TTFT turn {turns}: {1000 * off.ttft_turn(turns - 1):.0f} ms without the "
                   f"cache, {1000 * on.ttft_turn(turns - 1):.0f} ms with it", err=True)

    try:
        report, _ = agent_bench.run(tm, mode_list, conversations, turns, max_new_tokens, knobs,
                                    _command_line(ctx), progress)
    except ERRORS as e:
        _fail(str(e))
    _emit(report, out, ctx)


@bench_app.command()
def gpu(
    ctx: typer.Context,
    shapes: str = typer.Option("8b", help="Comma-separated model shapes: 3b, 8b, 14b (CUDA), tiny (any device)."),
    contexts: str = typer.Option("2048,8192", help="Comma-separated context lengths (tokens in each request's "
                                                  "KV cache when the timed steps start)."),
    requests: str = typer.Option("1,16,64", help="Comma-separated numbers of concurrent requests."),
    modes: str = typer.Option(",".join(("ar", "diffusion", "linear_spec", "quadratic_spec")),
                              help="Comma-separated modes."),
    block: int = typer.Option(32, help="Block length of diffusion and speculation (quadratic pass = B(B+1))."),
    lora_rank: int = typer.Option(128, "--lora-rank", help="Drafter adapter rank for linear_spec drafts (0: none)."),
    steps: int = typer.Option(8, help="Decode steps timed per cell (rounded up to whole cycles of the mode)."),
    model: str | None = typer.Option(None, "--model", "-m", help="A trained checkpoint (dir or Hub id) to measure "
                                     "TPF on (default: the paper's TPF, stated as assumed)."),
    tpf: str | None = typer.Option(None, help="TPF per mode, e.g. 'linear_spec=4.5' (overrides --model / paper)."),
    peak_tflops: float | None = typer.Option(None, "--peak-tflops", help="Peak FLOP/s of the device for the "
                                             "compute floor (default: datasheet for known GPUs, else measured)."),
    max_batch_tokens: int = typer.Option(8192, "--max-batch-tokens", help="The engine's most tokens per forward."),
    loading: bool = typer.Option(True, "--loading/--no-loading", help="Also write a random checkpoint (3b shape "
                                 "with the real shapes, else tiny) and report the memory load_model takes for it."),
    device: str | None = typer.Option(None, help="cuda / cpu (default: cuda when available)."),
    out: Path | None = typer.Option(None, help="Also write the markdown report here."),
    threads: int | None = typer.Option(None, help="CPU threads for torch (default: torch's choice)."),
) -> None:
    """Engine decode steps at the released 3B/8B/14B shapes (random weights) per mode, context and load, against
    a weight + KV bandwidth / compute floor; tok/s from measured (--model) or assumed TPF."""
    from trimode.bench import gpu as g

    _set_threads(threads)
    given = {}
    for item in _split(tpf, name="tpf") or []:
        mode, _, value = item.partition("=")
        try:
            given[mode.strip()] = float(value)
        except ValueError:
            _fail(f"--tpf: expected mode=value pairs, got {item!r}")
    lists = (_split(shapes, name="shapes") or [], _split(contexts, int, "contexts") or [],
             _split(requests, int, "requests") or [], _split(modes, name="modes") or [])

    def progress(c) -> None:
        what = c.error or f"{c.seconds * 1e3:.2f} ms/step, {c.over_floor:.2f}x floor, {c.attention}"
        typer.echo(f"  {c.shape} ctx {c.context} x{c.requests:<3} {c.mode:>15}: {what}", err=True)

    def partial(report: str) -> None:  # a run cut short (a GPU session's time limit) keeps what it measured
        if out is not None:
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(f"Command: `{_command_line(ctx)}` (incomplete: still running)\n\n{report}")

    try:
        report = g.run(lists[0], lists[1], lists[2], lists[3], block, lora_rank, steps, given, model, device,
                       peak_tflops, max_batch_tokens, loading, progress, partial)
    except ERRORS as e:
        _fail(str(e))
    _emit(report, out, ctx)


@bench_app.command()
def soak(
    ctx: typer.Context,
    model: str | None = typer.Option(None, "--model", "-m", help="Checkpoint directory (default: the bundled model); "
                                     "a `trimode serve` at default settings is started on it in a child process."),
    url: str | None = typer.Option(None, help="Soak a running server instead, e.g. http://127.0.0.1:8000 (its model "
                                   "must be served as 'bench': --served-model-name bench)."),
    clients: int = typer.Option(64, help="Concurrent clients."),
    duration: float = typer.Option(60, help="Seconds the clients keep sending."),
    max_tokens: int = typer.Option(16, "--max-tokens", help="max_tokens of the generation requests."),
    seed: int = typer.Option(0, help="Seed of the clients' request mix."),
    threads: int | None = typer.Option(None, help="torch intra-op threads of the started server (OMP_NUM_THREADS)."),
    api_key: str = typer.Option("none", "--api-key", envvar="TRIMODE_API_KEY", help="Bearer key, if needed."),
    out: Path | None = typer.Option(None, help="Also write the markdown report here."),
) -> None:
    """Clients for a fixed time, every kind of traffic mixed (all modes, streams, disconnects, hostile requests):
    outcomes by status, p50 / p99 latency, server memory before and after, health afterwards."""
    import platform

    from trimode.bench import soak as sk

    if clients < 1 or duration <= 0 or max_tokens < 1:
        _fail("--clients and --max-tokens must be >= 1 and --duration > 0")
    if model is not None and url is not None:
        _fail("give --model or --url, not both")
    if model is not None and not Path(model).is_dir():
        _fail(f"no checkpoint directory {model}")
    try:
        result = sk.run(model, url, clients, duration, max_tokens, api_key, threads, seed,
                        echo=lambda line: typer.echo(line, err=True))
    except ERRORS as e:
        _fail(str(e))
    mix = ", ".join(f"{kind} {weight}%" for kind, weight in sk.MIX)
    header = (f"Machine: {platform.machine()}, {os.cpu_count()} CPU cores; "
              f"{'a running server' if url else 'a `trimode serve` child process at default settings'} "
              f"({model or url or 'bundled model'}); max_tokens {max_tokens}, modes {', '.join(sk.MODES)} at random; "
              f"mix: {mix}.")
    _emit(sk.report(result, header), out, ctx)
    if result.errors():
        _fail(f"{sum(result.errors().values())} request(s) got an answer they should not (see the report)")


def export(
    output: Path = typer.Option(..., "--output", "-o", help="Directory to write."),
    format: str = typer.Option("hf-causal-lm", "--format", help="Export format: hf-causal-lm."),
    model: str | None = typer.Option(None, "--model", "-m", help="Checkpoint directory or Hub id (default: bundled)."),
    dtype: str | None = typer.Option(None, help="float32 / bfloat16 / float16 (default: the checkpoint's)."),
    max_shard_gb: float | None = typer.Option(None, "--max-shard-gb", help="Split the weights into shards."),
    overwrite: bool = typer.Option(False, help="Write into a non-empty output directory."),
) -> None:
    """Export the checkpoint as a transformers causal LM (Ministral3ForCausalLM / MistralForCausalLM)."""
    from trimode.api import default_model_path
    from trimode.export import FORMATS, export_hf_causal_lm

    if format not in FORMATS:
        _fail(f"unknown format {format!r}; choose from {', '.join(FORMATS)}")
    source = model if model is not None else default_model_path()
    if model is None and not (Path(source) / "config.json").is_file():
        _fail(f"the bundled default model is missing from {source}; name a model with --model")
    shard = int(max_shard_gb * 2**30) if max_shard_gb else None
    try:
        path = export_hf_causal_lm(source, output, dtype, shard, overwrite)
    except ERRORS as e:
        _fail(str(e))
    typer.echo(f"wrote {path} (load with transformers.AutoModelForCausalLM.from_pretrained)")


def register(app: typer.Typer) -> None:
    app.add_typer(bench_app, name="bench")
    app.command("export")(export)
