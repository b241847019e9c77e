"""The engine core in its own process: the step loop with nothing else under its GIL.

    cores = CoreSet(CoreSpec(model=None, engine={"max_queue": 64}), count=2).start()   # data-parallel: 2 cores
    client = EngineClient(tm, cores)        # client.py: the server's side

A core process (`multiprocessing` spawn) loads the model itself from `CoreSpec` (the path and options the server
was given), builds an `Engine` and runs its loop in the main thread (`EngineCore.run`): take what arrived on the
PULL socket (submissions, cancellations, hellos), run one `Engine.step()`, then send each API server ONE message
with every event its requests produced in that step (the wire format: `wire.py`). The core never waits on a
client: the ROUTER socket never blocks (no high-water mark; a vanished client's messages are dropped).

Liveness: an API server with requests on this core hears from it at least every `BEAT_S` (a "beat" when no step
produced anything for it, e.g. its request waits in the queue behind others). The beat is sent by the loop
itself, between two steps, so a core stuck in a forward, deadlocked or stopped falls silent, and the client
(`client.py`, `stall_timeout`) treats a silence while it has work here as the core's death. A beat also carries
the engine's stats to an API server that has heard nothing since they changed (another API server's requests
ran), so every API server's /metrics is at most `BEAT_S` behind.

A core ignores SIGINT (Ctrl-C reaches the whole process group; the owner stops it with a "stop" message) and
exits when its parent goes away, so it never outlives the server.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import signal
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import zmq

from trimode.engine.wire import decode, encode, error_to_wire, event_to_wire, request_from_wire

log = logging.getLogger("trimode.engine.core")

IDLE_POLL_MS = 500  # an idle core still checks for its parent this often
WAIT_POLL_MS = 50  # requests wait for room and no step progressed: look again this often (as Engine's loop)
BEAT_S = 0.5  # an API server with requests here hears from the loop at least this often


@dataclass
class CoreSpec:
    """How a core process builds its engine: `trimode.load(model, dtype, device, lora)`, then `Engine(tm, **engine)`
    (its keyword arguments: max_queue, max_running, auto, cost, max_pass_bytes, ...; picklable values)."""

    model: str | None = None
    dtype: str | None = None
    device: str | None = None
    lora: bool | str = True
    engine: dict = field(default_factory=dict)
    threads: int | None = None  # torch CPU threads of the core (None: torch's choice)
    # Benchmarks (`trimode bench engine --served process`): record every fused forward's shapes and write them
    # to this file as JSON when the core stops, so they can be replayed on the bare network.
    trace_file: str | None = None


def core_addresses(run_dir: Path, index: int) -> tuple[str, str]:
    """(input, output) IPC addresses of core `index`: the same after a restart, so clients reconnect by themselves."""
    return f"ipc://{run_dir}/core{index}-in", f"ipc://{run_dir}/core{index}-out"


class CoreSet:
    """The engine-core processes of one server (data-parallel: one model copy each); the owner starts, restarts and
    stops them. Their addresses live in a private temporary directory (`run_dir`)."""

    def __init__(self, spec: CoreSpec, count: int = 1, run_dir: Path | None = None) -> None:
        if count < 1:
            raise ValueError("data-parallel size must be >= 1")
        self.spec, self.count = spec, count
        self._tmp = None if run_dir is not None else tempfile.TemporaryDirectory(prefix="trimode-")
        self.run_dir = Path(run_dir or self._tmp.name)
        self.addresses = [core_addresses(self.run_dir, i) for i in range(count)]
        self.procs: list[multiprocessing.Process | None] = [None] * count
        self._ctx = multiprocessing.get_context("spawn")

    def start(self) -> CoreSet:
        for i in range(self.count):
            if self.procs[i] is None:
                self.restart(i)
        return self

    def restart(self, index: int) -> None:
        """Start core `index` (again): a fresh process, a fresh model load; what the old one held is gone."""
        old = self.procs[index]
        if old is not None:
            old.join(timeout=0)
        p = self._ctx.Process(target=run_core, args=(self.spec, *self.addresses[index]), name=f"trimode-core{index}",
                              daemon=True)
        p.start()
        self.procs[index] = p

    def alive(self, index: int) -> bool:
        p = self.procs[index]
        return p is not None and p.is_alive()

    def exitcode(self, index: int) -> int | None:
        p = self.procs[index]
        return None if p is None else p.exitcode

    def pid(self, index: int) -> int | None:
        p = self.procs[index]
        return None if p is None else p.pid

    def kill(self, index: int) -> None:
        """End core `index` at once (SIGKILL: also a core that is stopped or stuck) and reap it."""
        p = self.procs[index]
        if p is not None and p.is_alive():
            p.kill()
            p.join(timeout=10)

    def stop(self, timeout: float = 10.0) -> None:
        """Ask every core to stop (requests end with EngineStopped), then make sure they are gone."""
        ctx = zmq.Context.instance()
        for i, p in enumerate(self.procs):
            if p is not None and p.is_alive():
                s = ctx.socket(zmq.PUSH)
                s.setsockopt(zmq.LINGER, 1000)
                s.connect(self.addresses[i][0])
                s.send(encode(["stop"]))
                s.close()
        deadline = time.monotonic() + timeout
        for p in self.procs:
            if p is not None:
                p.join(timeout=max(0.0, deadline - time.monotonic()))
                if p.is_alive():
                    p.kill()
                    p.join()
        self.procs = [None] * self.count
        if self._tmp is not None:
            self._tmp.cleanup()


def run_core(spec: CoreSpec, in_addr: str, out_addr: str) -> None:
    """The core process's main: load, build the engine, measure its policy, serve until stopped."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s[%(process)d] %(levelname)s %(message)s")
    import torch

    import trimode
    from trimode.engine.engine import Engine, shape_to_json

    if spec.threads is not None:
        torch.set_num_threads(spec.threads)
    tm = trimode.load(spec.model, dtype=spec.dtype, device=spec.device, lora=spec.lora)
    engine = Engine(tm, **spec.engine)
    engine.step()  # nothing queued: measures the auto policy's cost curve now, before "ready"
    if spec.trace_file:
        engine.trace = []
    try:
        EngineCore(engine, in_addr, out_addr).run()
    finally:
        if spec.trace_file:
            Path(spec.trace_file).write_text(json.dumps([[shape_to_json(s) for s in f] for f in engine.trace]))


class EngineCore:
    """The loop of a core process: receive, step, send one batch per client."""

    def __init__(self, engine, in_addr: str, out_addr: str) -> None:
        self.engine = engine
        ctx = zmq.Context.instance()
        self.pull = ctx.socket(zmq.PULL)
        self.pull.bind(in_addr)
        self.router = ctx.socket(zmq.ROUTER)
        self.router.setsockopt(zmq.SNDHWM, 0)  # the core never blocks on a slow API server
        self.router.bind(out_addr)
        self.live: dict[tuple[bytes, int], object] = {}  # (client, request id) -> RequestHandle
        self.outbox: dict[bytes, list] = {}
        self.last_sent: dict[bytes, float] = {}  # client -> when the loop last sent it anything
        self.version = 0  # bumped whenever the stats may have changed (a step sent something, a reset)
        self.seen: dict[bytes, int] = {}  # client -> the version of the stats it last got
        self.parent = os.getppid()
        self.stopping = False

    def run(self) -> None:
        progressed = False
        while not self.stopping:
            timeout = (0 if progressed else WAIT_POLL_MS) if self.live else IDLE_POLL_MS
            if self.pull.poll(timeout):
                self.receive()
                self.flush()  # acks and refusals now, not after the step
            if os.getppid() != self.parent:
                log.error("the server process is gone; the engine core exits")
                break
            progressed = self.step() if self.live else False
            self.flush()
            self.beat()
        self.engine.stop()  # requests still running end with EngineStopped
        self.flush()
        self.router.close(linger=2000)
        self.pull.close(linger=0)

    def receive(self) -> None:
        while True:
            try:
                msg = decode(self.pull.recv(zmq.NOBLOCK))
            except zmq.Again:
                return
            kind = msg[0]
            if kind == "submit":
                self.submit(msg[1], msg[2])
            elif kind == "cancel":
                handle = self.live.get((msg[1], msg[2]))
                if handle is not None:
                    handle.cancel()
            elif kind == "hello":
                self.send(msg[1], ["ready", os.getpid(), self.engine.stats()])
            elif kind == "reset_prefix_cache":
                dropped = self.engine.reset_prefix_cache()
                self.version += 1
                self.send(msg[1], ["prefix_cache_reset", dropped, self.engine.stats()])
            elif kind == "stop":
                self.stopping = True

    def submit(self, client: bytes, fields: dict) -> None:
        rid = fields["request_id"]
        out = self.outbox.setdefault(client, [])
        try:
            handle = self.engine.submit(request_from_wire(fields))
        except Exception as e:  # ValueError, QueueFull, EngineStopped: the client raises it from submit()
            out.append(["refused", rid, *error_to_wire(e)])
            return
        self.live[(client, rid)] = handle
        out.append(["ack", rid])

    def step(self) -> bool:
        try:
            return self.engine.step()
        except Exception as e:  # as Engine's own loop: a failing step fails the requests it held, not the core
            log.exception("engine step failed; failing the requests it held")
            for seq in list(self.engine.scheduler.running):
                self.engine._end(seq, error=e)
            return True

    def flush(self) -> None:
        """Every event the live requests produced since the last flush: one message per client."""
        for (client, rid), handle in list(self.live.items()):
            items = handle.drain()
            if not items:
                continue
            out = self.outbox.setdefault(client, [])
            for item in items:
                if handle.is_end(item):
                    continue
                error = handle.failure(item)
                if error is not None:
                    out.append(["failed", rid, *error_to_wire(error)])
                else:
                    out.append(["event", rid, *event_to_wire(item)])
            if handle.done:
                del self.live[(client, rid)]
        if not self.outbox:
            return
        stats = self.engine.stats()
        self.version += 1
        for client, items in self.outbox.items():
            self.send(client, ["out", stats, items])
        self.outbox = {}

    def send(self, client: bytes, msg: list) -> None:
        """Every message to a client carries the stats as of now: note that it has them."""
        self.router.send_multipart([client, encode(msg)])
        self.last_sent[client], self.seen[client] = time.monotonic(), self.version

    def beat(self) -> None:
        """A client silent for `BEAT_S` hears that the loop goes on, if it has requests here or stale stats."""
        now = time.monotonic()
        busy = {client for client, _ in self.live}
        due = [c for c, t in self.last_sent.items()
               if now - t >= BEAT_S and (c in busy or self.seen[c] != self.version)]
        if due:
            stats = self.engine.stats()
            for client in due:
                self.send(client, ["beat", stats])

