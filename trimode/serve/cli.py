"""`trimode serve`: the OpenAI-compatible server (heavy imports stay inside the command)."""

from __future__ import annotations

from pathlib import Path

import typer

from trimode.decode.modes import names

SERVE_MODES = names(editing=False)  # a server's default mode


def register(app: typer.Typer) -> None:
    app.command(name="serve")(serve)


def serve(
    model: str | None = typer.Option(None, "--model", "-m", help="Checkpoint directory or Hub repo id (default: "
                                     "the bundled model)."),
    host: str = typer.Option("127.0.0.1", help="Address to bind. The default serves this machine only."),
    port: int = typer.Option(8000, help="TCP port."),
    api_key: str | None = typer.Option(None, "--api-key", envvar="TRIMODE_API_KEY",
                                       help="Require 'Authorization: Bearer KEY' on /v1 (also $TRIMODE_API_KEY)."),
    policy: Path | None = typer.Option(None, "--policy", help="Routing policy YAML: route -> mode, knobs, "
                                       "human_review (see docs/serving.md)."),
    audit_log: Path = typer.Option(Path("trimode-audit.jsonl"), "--audit-log",
                                   help="JSON-lines audit log of routed requests whose review is not optional."),
    served_model_name: str | None = typer.Option(None, "--served-model-name",
                                                 help="The model id clients send (default: the checkpoint's name)."),
    mode: str = typer.Option("ar", "--mode", help=f"Default mode: {', '.join(SERVE_MODES)}."),
    block_length: int | None = typer.Option(None, "--block-length", help="Default block length (diffusion / "
                                            "speculation; default: the model's)."),
    threshold: float | None = typer.Option(None, help="Default commit threshold (diffusion 0.9, linear_spec 0)."),
    max_tokens: int = typer.Option(256, "--max-tokens", help="Tokens generated when a request gives no max_tokens."),
    temperature: float = typer.Option(0.0, help="Temperature when a request gives none (0 = greedy)."),
    max_running: int = typer.Option(64, "--max-running", help="Requests decoding at once (engine rows)."),
    max_queue: int = typer.Option(64, "--max-queue", help="Requests that may wait beyond the running ones; more "
                                  "get 429 with Retry-After (0: no waiting room)."),
    prefix_cache: bool = typer.Option(True, "--prefix-cache/--no-prefix-cache", help="Keep the KV of full prompt "
                                      "pages for later requests that start with the same tokens (docs/serving.md)."),
    kv_cache_tokens: int | None = typer.Option(None, "--kv-cache-tokens", help="KV pool size in tokens, per engine "
                                               "(default: sized from free memory, as the engine does)."),
    max_body_mb: float = typer.Option(16, "--max-body-mb", help="Largest request body in MiB; larger gets 413."),
    max_block_length: int = typer.Option(64, "--max-block-length", help="Largest block_length a request may ask "
                                         "for (a quadratic pass is B(B+1) tokens per row); larger gets 400."),
    max_pass_mb: float | None = typer.Option(None, "--max-pass-mb", help="Most activation memory (MiB) one "
                                             "request's widest pass may need; more gets 400 (default: a quarter "
                                             "of free GPU memory, 2048 on CPU)."),
    auto_config: str | None = typer.Option(None, "--auto-config", help="`mode: auto` settings as a JSON object, "
                                           "e.g. '{\"spec_margin\": 0.05, \"smaller_blocks\": false}' (fields of "
                                           "AutoConfig, docs/engine.md)."),
    dtype: str | None = typer.Option(None, help="float32 / bfloat16 (default: float32 on CPU, bfloat16 on CUDA)."),
    device: str | None = typer.Option(None, help="cpu / cuda (default: cuda when available)."),
    log_level: str = typer.Option("info", "--log-level", help="uvicorn log level."),
    engine_process: bool = typer.Option(True, "--engine-process/--no-engine-process", help="Run the engine loop "
                                        "in its own process, apart from the HTTP server (docs/serving.md)."),
    data_parallel_size: int = typer.Option(1, "--data-parallel-size", help="Engine processes, one model copy "
                                           "each; requests go to the least loaded."),
    api_server_count: int = typer.Option(1, "--api-server-count", help="HTTP server processes sharing the port "
                                         "(SO_REUSEPORT), each a client of every engine process."),
    on_engine_death: str = typer.Option("restart", "--on-engine-death", help="When an engine process dies (its "
                                        "requests get 503): restart it, or exit (status 75) for a supervisor."),
    engine_stall_timeout: float = typer.Option(120, "--engine-stall-timeout", help="Seconds a busy engine process "
                                               "may stay silent (hung) before it is killed as dead (0: never)."),
    allowed_host: list[str] = typer.Option([], "--allowed-host", help="A Host name to answer besides localhost, "
                                           "127.0.0.1 and ::1 (repeatable; behind a proxy: its public name; '*': "
                                           "any). Bound to a non-loopback address, no Host check unless given."),
) -> None:
    """Serve a model over an OpenAI-compatible HTTP API (completions, chat, models, health, metrics)."""
    from trimode.cli import fail, load_or_fail

    max_body_bytes = check_options(mode, threshold, block_length, max_block_length, max_pass_mb, max_tokens,
                                   max_running, max_queue, port, max_body_mb, kv_cache_tokens)
    engine = dict(max_queue=max_queue, max_running=max_running, prefix_cache=prefix_cache,
                  kv_cache_tokens=kv_cache_tokens, auto=None if auto_config is None else parse_auto_config(auto_config),
                  max_pass_bytes=None if max_pass_mb is None else int(max_pass_mb * 2**20))
    routing, audit = load_routing(policy, audit_log)  # before the model: a bad policy fails in a second
    from trimode.serve.launch import Layout, serve_layout
    layout = Layout(engine_process, data_parallel_size, api_server_count, on_engine_death, engine_stall_timeout,
                    model, dtype, device, engine)
    if (problem := layout.check()) is not None:
        fail(problem)
    tm = load_or_fail(model, dtype, device)
    from trimode.serve.app import ServerConfig

    name = served_model_name or _model_name(model)
    knobs = {k: v for k, v in (("block_length", block_length), ("threshold", threshold)) if v is not None}
    try:
        config = ServerConfig(name, mode, knobs, max_tokens, temperature, api_key, routing, audit, max_body_bytes,
                              max_block_length, allowed_hosts(host, allowed_host))
        if mode != "auto":
            tm.knobs_for(mode, **knobs)  # reject bad defaults now rather than on every request
    except ValueError as e:
        fail(str(e))
    if host not in ("127.0.0.1", "localhost", "::1") and api_key is None:
        typer.echo(f"warning: serving on {host} without --api-key: anyone who can reach it can use it", err=True)
    extra = f", policy {policy} ({len(routing.routes)} routes), audit log {audit_log}" if routing else ""
    typer.echo(f"trimode: serving {name!r} on http://{host}:{port}/v1 (default mode {mode}{extra})", err=True)
    try:
        code = serve_layout(tm, config, layout, host, port, log_level)
    except OSError as e:
        fail(f"cannot serve on {host}:{port}: {e.strerror or e}")
    except RuntimeError as e:  # an engine process could not start
        fail(str(e))
    if code:
        raise typer.Exit(code)


def load_routing(policy: Path | None, audit_log: Path):
    """The routing policy and, when a route is audited, the audit log (or a clear failure naming the line)."""
    from trimode.cli import fail
    from trimode.serve.policy import AuditLog, PolicyError, load_policy

    routing = audit = None
    if policy is not None:
        try:
            routing = load_policy(policy)
        except PolicyError as e:
            fail(str(e))
        if any(r.audited for r in routing.routes.values()):
            try:
                audit = AuditLog(audit_log)
            except OSError as e:
                fail(f"cannot open the audit log {audit_log}: {e.strerror}")
    return routing, audit


def check_options(mode, threshold, block_length, max_block_length, max_pass_mb, max_tokens, max_running, max_queue,
                  port, max_body_mb, kv_cache_tokens=None) -> int:
    """Refuse bad option values before anything loads; the body limit in bytes."""
    from trimode.cli import fail

    if mode not in SERVE_MODES:
        fail(f"unknown --mode {mode!r}; choose one of {', '.join(SERVE_MODES)}")
    if threshold is not None and not 0 <= threshold <= 1:
        fail(f"--threshold must be in [0, 1], got {threshold}")
    if block_length is not None and block_length < 1:
        fail(f"--block-length must be >= 1, got {block_length}")
    if max_block_length < 2:
        fail(f"--max-block-length must be >= 2, got {max_block_length}")
    if max_pass_mb is not None and max_pass_mb <= 0:
        fail(f"--max-pass-mb must be > 0, got {max_pass_mb}")
    if max_tokens < 1 or max_running < 1 or max_queue < 0 or not 0 < port < 65536:
        fail("--max-tokens and --max-running must be >= 1, --max-queue >= 0 and --port in 1..65535")
    if kv_cache_tokens is not None and kv_cache_tokens < 1:
        fail(f"--kv-cache-tokens must be >= 1, got {kv_cache_tokens}")
    max_body_bytes = int(max_body_mb * 2**20)
    if max_body_bytes < 1024:
        fail(f"--max-body-mb must allow at least 1 KiB, got {max_body_mb}")
    return max_body_bytes


def allowed_hosts(host: str, extra: list[str]) -> tuple[str, ...] | None:
    """The Host names answered: bound to loopback, its names plus `extra`; bound elsewhere, `extra` or any."""
    from trimode.serve.plan import LOOPBACK_HOSTS

    if host in LOOPBACK_HOSTS or host.startswith("127."):
        return LOOPBACK_HOSTS + tuple(extra)
    return tuple(extra) if extra else None


def parse_auto_config(text: str):
    """An AutoConfig from `--auto-config` JSON, or a one-line error naming what is wrong."""
    import dataclasses
    import json

    from trimode.cli import fail
    from trimode.engine import AutoConfig

    try:
        values = json.loads(text)
    except json.JSONDecodeError as e:
        fail(f"--auto-config is not valid JSON: {e.msg} (at character {e.pos})")
    if not isinstance(values, dict):
        fail("--auto-config must be a JSON object, e.g. '{\"spec_margin\": 0.05}'")
    known = sorted(f.name for f in dataclasses.fields(AutoConfig))
    unknown = sorted(set(values) - set(known))
    if unknown:
        fail(f"--auto-config: unknown setting(s) {', '.join(unknown)}; known: {', '.join(known)}")
    defaults = AutoConfig()
    for name, value in values.items():
        default = getattr(defaults, name)
        kind, ok = {bool: ("true or false", isinstance(value, bool)),
                    int: ("a whole number", isinstance(value, int) and not isinstance(value, bool)),
                    float: ("a number", isinstance(value, int | float) and not isinstance(value, bool)),
                    tuple: ("a list", isinstance(value, list))}[type(default)]
        if not ok:
            fail(f"--auto-config: {name} must be {kind}, got {json.dumps(value)}")
    try:
        return AutoConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})
    except ValueError as e:
        fail(f"--auto-config: {e}")


def _model_name(model: str | None) -> str:
    """The model id clients send: a directory's name, a Hub repo id as given, or 'trimode-default'."""
    if model is None:
        return "trimode-default"
    path = Path(model).expanduser()
    return path.resolve().name if path.is_dir() else model
