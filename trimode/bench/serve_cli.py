"""`trimode bench serve`: the engine's load benchmark, attached to the `bench` group (heavy imports stay inside)."""

from __future__ import annotations

import platform
from pathlib import Path

import typer

from trimode.decode.modes import names

MODES = names(editing=False)  # what a chat request may run


def register(app: typer.Typer) -> None:
    try:
        from trimode.bench.cli import bench_app
    except ModuleNotFoundError:  # no bench layer: a group of our own
        bench_app = typer.Typer(help="Benchmarks.", no_args_is_help=True)
        app.add_typer(bench_app, name="bench")
    bench_app.command(name="serve")(serve)
    from trimode.bench.serve_vs_engine import command as serve_vs_engine

    bench_app.command(name="serve-vs-engine")(serve_vs_engine)


def _fail(message: str) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code=2)


def _ints(text: str, name: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        _fail(f"--{name}: cannot read {text!r} as comma-separated integers")
    if not values or min(values) < 1:
        _fail(f"--{name}: give positive integers")
    return values


def serve(
    model: str | None = typer.Option(None, "--model", "-m", help="Checkpoint directory (default: the bundled "
                                     "model); a `trimode serve` is started on it in a child process."),
    url: str | None = typer.Option(None, help="Bench a running server instead, e.g. http://127.0.0.1:8000/v1 "
                                   "(its model must be served as 'bench': --served-model-name bench)."),
    modes: str = typer.Option(",".join(MODES), help="Comma-separated modes to run."),
    concurrency: str = typer.Option("1,4,16,64", help="Comma-separated numbers of concurrent clients."),
    requests: int = typer.Option(32, "--requests", help="Requests per mode and concurrency N, at least: each client "
                                 "sends ceil(requests / N) in turn."),
    max_tokens: int = typer.Option(32, "--max-tokens", help="max_tokens of every request."),
    api: str = typer.Option("chat", help="chat: each prompt is a user message of /v1/chat/completions (the chat "
                            "template applies); completions: raw text to /v1/completions."),
    rounds: int = typer.Option(1, help="Repeat each concurrency level this often (modes reordered); report the "
                               "median round's throughput."),
    block_length: int | None = typer.Option(None, "--block-length", help="Server default block length "
                                            "(diffusion / speculation / auto; default: the model's)."),
    dtype: str | None = typer.Option(None, help="float32 / bfloat16 for the started server."),
    device: str | None = typer.Option(None, help="cpu / cuda for the started server."),
    threads: int | None = typer.Option(None, help="torch intra-op threads of the started server (OMP_NUM_THREADS; "
                                       "1 is much faster for small models on a busy CPU)."),
    auto_config: str | None = typer.Option(None, "--auto-config", help="`mode: auto` settings (JSON) of the "
                                           "started server, as `trimode serve --auto-config`."),
    api_key: str = typer.Option("none", "--api-key", envvar="TRIMODE_API_KEY", help="Bearer key, if the server "
                                "needs one."),
    workload: str = typer.Option("load", help="load: the prompts above at each concurrency; agent: multi-turn "
                                 "conversations on a long shared system prompt, against two servers (prefix cache "
                                 "on and off) side by side (default mode: ar)."),
    conversations: int = typer.Option(4, help="agent workload: concurrent conversations (HTTP clients)."),
    turns: int = typer.Option(4, help="agent workload: turns per conversation."),
    vs_engine: str | None = typer.Option(None, "--vs-engine", help="Server layouts (thread,process,process-dp2) "
                                         "to run beside the engine in-process, streaming and not, per mode and N "
                                         "(raw completions; as `bench serve-vs-engine`)."),
    structured: bool = typer.Option(False, "--structured", help="load workload: the prompts are held-out JSON-task "
                                    "chats, each mode run on them free and under each prompt's JSON schema "
                                    "(response_format json_schema, strict), side by side: tokens/forward and speed "
                                    "with and without a schema, as the server counts them."),
    out: Path | None = typer.Option(None, help="Also write the markdown report here."),
    plot: Path | None = typer.Option(None, help="PNG of output tokens/s against concurrency (default: next to "
                                     "--out)."),
) -> None:
    """Drive the server with N concurrent streaming clients per mode: req/s, tok/s, TTFT, ITL, tokens/forward."""
    mode_list = [m.strip() for m in modes.split(",") if m.strip()]
    bad = [m for m in mode_list if m not in MODES]
    if bad or not mode_list:
        _fail(f"--modes: unknown {', '.join(bad) or '(none given)'}; choose from {', '.join(MODES)}")
    levels = _ints(concurrency, "concurrency")
    if requests < 1 or max_tokens < 1 or rounds < 1:
        _fail("--requests, --max-tokens and --rounds must be >= 1")
    from trimode.bench import serve_bench as sb

    if api not in sb.APIS:
        _fail(f"--api: choose one of {', '.join(sb.APIS)}, got {api!r}")
    if model is not None and url is not None:
        _fail("give --model or --url, not both")
    if model is not None and not Path(model).is_dir():
        _fail(f"no checkpoint directory {model}")
    if auto_config is not None:
        if url is not None:
            _fail("--auto-config sets up the server bench serve starts; it cannot change the one at --url")
        from trimode.serve.cli import parse_auto_config

        parse_auto_config(auto_config)  # a bad setting fails here, not in the child server
    if structured and (api != "chat" or workload != "load" or vs_engine is not None):
        _fail("--structured runs chats on the load workload: no --api completions, --workload or --vs-engine")
    if vs_engine is not None:
        if url is not None or workload != "load":
            _fail("--vs-engine starts its own servers on the load workload; it cannot use --url or --workload")
        vs_modes = ["ar"] if modes == ",".join(MODES) else mode_list  # a short default run
        return _vs_engine(vs_engine, model, vs_modes, levels, requests, max_tokens, threads, rounds, out)
    if workload != "load":
        agent_modes = ["ar"] if modes == ",".join(MODES) else mode_list  # a short default run
        return _agent(workload, url, model, agent_modes, conversations, turns, max_tokens, dtype, device, threads,
                      api_key, auto_config, out)
    if plot is None and out is not None:
        plot = out.with_suffix(".png")

    def echo(line: str) -> None:
        typer.echo(line, err=True)

    try:
        cells, auto = sb.run(model, url, mode_list, levels, requests, max_tokens, block_length, dtype, device,
                             api_key, threads, rounds, echo=echo, api=api, auto_config=auto_config,
                             structured=structured)
    except ImportError as e:
        _fail(f"bench serve needs the `openai` client ({e.name} is missing): pip install openai")
    except (RuntimeError, OSError, ValueError) as e:
        _fail(str(e))
    header = _load_header(model, url, modes, concurrency, requests, max_tokens, rounds, api, block_length, dtype,
                          device, threads, auto_config, structured)
    _emit(sb.report(cells, header, auto), out)
    if plot is not None:
        sb.plot(cells, plot, f"trimode bench serve ({model or url or 'bundled model'}, max_tokens {max_tokens})")
        echo(f"wrote {plot}")
    lost = sum(c.sent - c.ok for c in cells)
    if lost:
        _fail(f"{lost} request(s) failed or were lost (see the report)")


def _load_header(model, url, modes, concurrency, requests, max_tokens, rounds, api, block_length, dtype, device,
                 threads, auto_config, structured: bool = False) -> str:
    """The load report's first lines: the command (options left at their defaults left out) and the machine."""
    given = [("--model", model), ("--url", url), ("--modes", None if modes == ",".join(MODES) else modes),
             ("--concurrency", None if concurrency == "1,4,16,64" else concurrency),
             ("--requests", None if requests == 32 else requests),
             ("--max-tokens", None if max_tokens == 32 else max_tokens), ("--rounds", None if rounds == 1 else rounds),
             ("--api", None if api == "chat" else api), ("--block-length", block_length), ("--dtype", dtype),
             ("--device", device), ("--threads", threads), ("--auto-config", auto_config and f"'{auto_config}'"),
             ("--structured", "" if structured else None)]
    command = " ".join(["trimode bench serve"] + [f"{k} {v}".rstrip() for k, v in given if v is not None])
    return (f"Command: `{command}`  \nMachine: {platform.machine()}, {_cores()} CPU cores, torch "
            f"{_torch_version()}; {'a running server' if url else 'a `trimode serve` child process'}; at least "
            f"{requests} requests per cell, {rounds} round(s) (median round shown), max_tokens {max_tokens}, "
            f"temperature 0, streaming, "
            + ("held-out JSON-task chats, each mode free and under the prompt's schema." if structured
               else f"{'chat messages' if api == 'chat' else 'raw completions'}."))


def _emit(text: str, out: Path | None) -> None:
    """The report on stdout, and in `out` when given."""
    typer.echo(text, nl=False)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text)
        typer.echo(f"wrote {out}", err=True)


def _vs_engine(layouts: str, model, modes: list[str], levels: list[int], requests: int, max_tokens: int,
               threads: int | None, rounds: int, out: Path | None) -> None:
    """`--vs-engine`: the server in each layout beside the engine in-process, one table per mode
    (serve_vs_engine.py)."""
    from trimode.bench import serve_vs_engine as sve

    try:
        names = sve.layout_names(layouts, "--vs-engine")
    except typer.BadParameter as e:
        _fail(f"--vs-engine: {e.message}")
    threads = threads or 1
    reports = []
    for mode in modes:
        command = (f"trimode bench serve --vs-engine {','.join(names)} --modes {mode} --concurrency "
                   f"{','.join(map(str, levels))} --requests {requests} --max-tokens {max_tokens} --threads "
                   f"{threads} --rounds {rounds}")
        command += f" --model {model}" if model else ""
        try:
            reports.append(sve.compare(model, names, levels, requests, max_tokens, mode, threads, rounds, command,
                                       echo=lambda line: typer.echo(line, err=True)))
        except ImportError as e:
            _fail(f"bench serve needs the `openai` client ({e.name} is missing): pip install openai")
        except (RuntimeError, OSError, ValueError) as e:
            _fail(str(e))
    _emit("\n".join(reports), out)


def _agent(workload, url, model, modes, conversations, turns, max_tokens, dtype, device, threads, api_key,
           auto_config, out) -> None:
    """`--workload agent`: cache off vs on over HTTP (serve_agent.py); prints the table."""
    if workload != "agent":
        _fail(f"--workload: choose load or agent, got {workload!r}")
    if url is not None:
        _fail("--workload agent starts its own two servers (cache on and off); it cannot use --url")
    if conversations < 1 or turns < 1:
        _fail("--conversations and --turns must be >= 1")
    from trimode.bench import serve_agent

    def echo(line: str) -> None:
        typer.echo(line, err=True)

    try:
        pairs = serve_agent.run(model, modes, conversations, turns, max_tokens, dtype, device, threads, api_key,
                                echo, auto_config)
    except ImportError as e:
        _fail(f"bench serve needs the `openai` client ({e.name} is missing): pip install openai")
    except (RuntimeError, OSError, ValueError) as e:
        _fail(str(e))
    header = (f"Machine: {platform.machine()}, {_cores()} CPU cores, torch {_torch_version()}; model "
              f"{model or 'bundled'}; temperature 0, streaming completions.")
    text = serve_agent.report(pairs, conversations, turns, max_tokens, header)
    _emit(text, out)


def _torch_version() -> str:
    import torch

    return torch.__version__


def _cores() -> int:
    import os

    return os.cpu_count() or 1
