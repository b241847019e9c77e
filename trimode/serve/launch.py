"""How `trimode serve` lays out its processes: the engine in-process, or engine cores and API servers apart.

    --no-engine-process               one process: the HTTP server and the engine loop thread share one GIL
    --engine-process (default)        the engine loop in a core process (trimode/engine/core_process.py); this
                                      process tokenizes, plans, streams (an `EngineClient` stands for the engine)
    --data-parallel-size N            N core processes, one model copy each; a request goes to the core with the
                                      fewest running + waiting requests
    --api-server-count M              M API server processes on one port (SO_REUSEPORT: the kernel spreads the
                                      connections), each a client of every core; this process only supervises

When a core dies, its requests fail with 503 / an SSE error event and /health answers 503; then `--on-engine-death`
restart: a fresh core process loads the model again (what the dead one held, its queue, KV cache and learned auto
state, is lost; /health is 503 until it is ready) or exit: the server shuts down with exit status 75
(EX_TEMPFAIL) for a supervisor (systemd, Kubernetes) to restart. A core that holds requests and sends nothing
for `--engine-stall-timeout` seconds (stuck in a forward, deadlocked, stopped) is killed and handled as dead.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import socket
import sys
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

ENGINE_DIED_EXIT = 75  # EX_TEMPFAIL: an engine process died under --on-engine-death exit; restart me
log = logging.getLogger("trimode.serve")


@dataclass
class Layout:
    """The process layout and what an engine core needs to build its own model and engine."""

    engine_process: bool = True
    data_parallel_size: int = 1
    api_server_count: int = 1
    on_engine_death: str = "restart"
    engine_stall_timeout: float = 120.0  # seconds of silence from a core with requests before it counts as dead
    model: str | None = None
    dtype: str | None = None
    device: str | None = None
    engine: dict = field(default_factory=dict)  # Engine's keyword arguments (max_queue, max_running, auto, ...)

    def check(self) -> str | None:
        if self.data_parallel_size < 1 or self.api_server_count < 1:
            return "--data-parallel-size and --api-server-count must be >= 1"
        if self.on_engine_death not in ("restart", "exit"):
            return f"--on-engine-death must be restart or exit, got {self.on_engine_death!r}"
        if not self.engine_stall_timeout >= 0:
            return "--engine-stall-timeout must be >= 0 (0 turns the check off)"
        if not self.engine_process and (self.data_parallel_size > 1 or self.api_server_count > 1):
            return "--data-parallel-size and --api-server-count > 1 need --engine-process"
        return None


class ExitFlag:
    """Set when an engine died under "exit": the uvicorn server shuts down gracefully (the other requests end with
    EngineStopped) and the command exits with ENGINE_DIED_EXIT."""

    def __init__(self) -> None:
        self.code = 0
        self.server = None  # the uvicorn.Server to stop

    def __call__(self, reason: str) -> None:
        log.error("%s; the server exits (--on-engine-death exit)", reason)
        self.code = ENGINE_DIED_EXIT
        if self.server is not None:
            self.server.should_exit = True  # read by uvicorn's main loop (a signal would be re-raised at its end)


def serve_layout(tm, config, layout: Layout, host: str, port: int, log_level: str) -> int:
    """Run the server in `layout` until it stops; its exit status."""
    import uvicorn

    from trimode.serve import event_loop
    from trimode.serve.app import create_app

    if layout.api_server_count > 1:
        return supervise(tm, config, layout, host, port, log_level)
    exit_flag = ExitFlag()
    if layout.engine_process:
        from trimode.engine.client import EngineClient
        from trimode.engine.core_process import CoreSet

        engine = EngineClient(tm, CoreSet(core_spec(layout), layout.data_parallel_size), layout.on_engine_death,
                              on_fatal=exit_flag, stall_timeout=layout.engine_stall_timeout)
    else:
        from trimode.engine import Engine

        engine = Engine(tm, **layout.engine)
    exit_flag.server = uvicorn.Server(uvicorn.Config(create_app(engine, config), host=host, port=port,
                                                     log_level=log_level, loop=event_loop.NAME))
    exit_flag.server.run()
    return exit_flag.code


def core_spec(layout: Layout):
    from trimode.engine.core_process import CoreSpec

    return CoreSpec(layout.model, layout.dtype, layout.device, True, dict(layout.engine))


# -- several API server processes -----------------------------------------------------------------------------
def reuseport_socket(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    sock.set_inheritable(True)
    return sock


def supervise(tm, config, layout: Layout, host: str, port: int, log_level: str) -> int:
    """Start the cores, then `api_server_count` API server processes; restart a core that dies (or stop all and
    return ENGINE_DIED_EXIT); stop everything on SIGINT / SIGTERM or when an API server exits."""
    from prometheus_client.multiprocess import mark_process_dead

    from trimode.engine.client import EngineClient
    from trimode.engine.core_process import CoreSet
    from trimode.serve.metrics import MULTIPROC_ENV

    probe = reuseport_socket(host, port)  # fail now, before any model loads, when the port is taken
    cores = CoreSet(core_spec(layout), layout.data_parallel_size).start()
    waiter = EngineClient(tm, cores, on_death="exit")  # a core that dies loading fails start() here
    try:
        waiter.start()  # every core ready: the API servers then start answering at once
    except RuntimeError:
        cores.stop()
        raise
    waiter.owned = None  # disconnect only: the cores stay for the API servers
    waiter.stop()
    audit_path = config.audit_log.path if config.audit_log is not None else None
    metrics_dir = tempfile.TemporaryDirectory(prefix="trimode-metrics-")
    os.environ[MULTIPROC_ENV] = metrics_dir.name  # read by each API server's prometheus_client at import (spawn)
    ctx = multiprocessing.get_context("spawn")
    worker_config = replace(config, audit_log=None)
    workers = [ctx.Process(target=api_worker, name=f"trimode-api{i}", daemon=False,
                           args=(layout, worker_config, audit_path, cores.addresses, host, port, log_level))
               for i in range(layout.api_server_count)]
    for w in workers:
        w.start()
    probe.close()
    stop = {"signal": 0}
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda s, f: stop.__setitem__("signal", s))
    code = 0
    while not stop["signal"]:
        time.sleep(0.1)
        if any(not w.is_alive() for w in workers):
            log.error("an API server process exited; stopping the server")
            code = 1
            break
        dead = [i for i in range(cores.count) if not cores.alive(i)]
        for i in dead:
            log.error("engine process %d died (exit code %s)", i, cores.exitcode(i))
            if layout.on_engine_death == "exit":
                code = ENGINE_DIED_EXIT
            else:
                cores.restart(i)
        if code:
            break
    for w in workers:
        if w.is_alive():
            os.kill(w.pid, signal.SIGTERM)  # uvicorn's graceful shutdown
    for w in workers:
        w.join(timeout=15)
        if w.is_alive():
            w.kill()
            w.join()
        mark_process_dead(w.pid, metrics_dir.name)  # its live gauges leave the sums
    cores.stop()
    metrics_dir.cleanup()
    return code


def api_worker(layout: Layout, config, audit_path: Path | None, addresses, host: str, port: int,
               log_level: str) -> None:
    """One API server process: its own model handle (tokenizer, logprobs), a client of every core."""
    import uvicorn

    import trimode
    from trimode.engine.client import EngineClient
    from trimode.serve import event_loop
    from trimode.serve.app import create_app
    from trimode.serve.policy import AuditLog

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the supervisor stops the API servers (SIGTERM)
    tm = trimode.load(layout.model, dtype=layout.dtype, device=layout.device)
    if audit_path is not None:
        config = replace(config, audit_log=AuditLog(audit_path))
    engine = EngineClient(tm, [tuple(a) for a in addresses], stall_timeout=layout.engine_stall_timeout)
    sock = reuseport_socket(host, port)
    server = uvicorn.Server(uvicorn.Config(create_app(engine, config), log_level=log_level, loop=event_loop.NAME))
    server.run(sockets=[sock])
    sys.exit(0)
