"""The API server's side of engine-core processes: an object the server uses as it uses an in-process `Engine`.

    client = EngineClient(tm, CoreSet(CoreSpec(model_path), count=2)).start()
    handle = client.submit(EngineRequest(prompt_ids=[...]))      # the same RequestHandle events as Engine's
    client.stats(); client.stop()

`tm` stays in the API process: it tokenizes, plans and (serve/logprobs.py) recomputes logprobs there; the cores
each load their own copy. `submit` sends the request to the core with the fewest running + waiting requests and
waits for the core's answer, so a refusal (ValueError, QueueFull, EngineStopped) is raised right there, as by
`Engine.submit`. One I/O thread receives every core's per-step batches and puts each event into its request's
handle (a deque and a wake-up: it never waits on a client). A request whose reader falls `MAX_PENDING` events
behind is cancelled and fails, so a stuck client costs a bounded amount of memory.

A core that dies (checked every `CHECK_S`): its requests fail with `EngineDied` (a server answers 503 or an SSE
error event), `stats()["healthy"]` turns False, and then `on_death`: "restart" (the owner starts a fresh process on
the same addresses; its queue, cache and learned auto state are gone; /health is 503 until it is ready again) or
"exit" (`on_fatal(reason)` is called: the server shuts down and exits non-zero for a supervisor). A client that
does not own the cores (one of several API server processes) only fails the requests and waits for the owner's
restart.

A core that stops answering while its process lives (stuck in a forward, deadlocked, stopped by a signal) is
treated the same way: when this client has requests on a core and has heard nothing from it for `stall_timeout`
seconds (a core's loop sends at least a beat every `core_process.BEAT_S` while it holds our requests), the
client kills the process (SIGKILL) and follows the death path above, with a reason that says it stalled.
`stall_timeout` 0 turns the check off; it must exceed the longest single engine step (a first long prefill on a
slow CPU).
"""

from __future__ import annotations

import itertools
import logging
import os
import signal
import threading
import time
from collections.abc import Callable

import zmq

from trimode.engine.core_process import CoreSet
from trimode.engine.request import EngineRequest, EngineStopped, RequestHandle, Wakeups, _Failure
from trimode.engine.wire import EngineDied, decode, encode, error_from_wire, event_from_wire, request_to_wire

log = logging.getLogger("trimode.engine.client")

CHECK_S = 0.1  # how often the I/O thread checks that the cores are alive
HELLO_S = 0.3  # a core not ready yet is greeted this often (its answer may be lost before the link is up)
MAX_PENDING = 65536  # events a request's reader may leave unread before the request is dropped
SUMMED = ("queue_depth", "running_requests", "running_rows", "max_queue", "max_running", "kv_budget_tokens",
          "kv_free_tokens", "kv_pages_used", "kv_pages_cached", "kv_pages_free", "prefix_cache_queries",
          "prefix_cache_hits", "preemptions")
LIMITS = ("max_running", "max_queue")
RESET_TIMEOUT_S = 30.0  # a core answers a prefix-cache reset between two steps
STALL_TIMEOUT_S = 120.0  # default: silence from a core with our requests on it, before it counts as dead


class RemoteHandle(RequestHandle):
    """A request running in a core process; `cancel()` also tells the core."""

    def __init__(self, request: EngineRequest, link: CoreLink, decode=None) -> None:
        super().__init__(request, decode)
        self.link = link
        self.answered = threading.Event()  # the core accepted or refused it (or died)
        self.refusal: BaseException | None = None

    def cancel(self) -> None:
        if not self.cancelled and not self.done:
            self.link.send(["cancel", self.link.identity, self.request_id])
        super().cancel()

    def _put(self, item, wakeups: Wakeups | None = None, wake: bool = True) -> None:
        if len(self._items) >= MAX_PENDING and not self.done:  # the reader is stuck: drop the request
            super()._put(_Failure(RuntimeError(f"the client read too slowly ({MAX_PENDING} events unread)")),
                         wakeups)
            self.cancel()
            return
        super()._put(item, wakeups, wake)


class CoreLink:
    """One core as this client sees it: its sockets, whether it is ready, its latest stats, our requests on it."""

    def __init__(self, index: int, in_addr: str, out_addr: str, identity: bytes) -> None:
        self.index, self.in_addr, self.out_addr, self.identity = index, in_addr, out_addr, identity
        self.lock = threading.Lock()
        ctx = zmq.Context.instance()
        self.dealer = ctx.socket(zmq.DEALER)  # read by the I/O thread only
        self.dealer.setsockopt(zmq.ROUTING_ID, identity)
        self.dealer.setsockopt(zmq.RCVHWM, 0)
        self.dealer.connect(out_addr)
        self.push = self._new_push()
        self.ready = False
        self.pid: int | None = None
        self.stats: dict = {}
        self.inflight = 0
        self.down: str | None = None  # why it last stopped serving (it died), until it is ready again
        self.fatal = False  # it died starting up, or for good ("exit"): no more greetings
        self.started = time.monotonic()
        self.last_hello = 0.0
        self.heard = time.monotonic()  # when it last sent us anything, or we gave it work while it was idle
        self.pages_dropped: int | None = None  # its answer to the latest prefix-cache reset
        self.limits: dict = {}  # its max_running and max_queue, kept while it is down (what a request may ask)

    def _new_push(self) -> zmq.Socket:
        s = zmq.Context.instance().socket(zmq.PUSH)
        s.setsockopt(zmq.LINGER, 0)
        s.connect(self.in_addr)
        return s

    def send(self, msg: list) -> None:
        with self.lock:
            self.push.send(encode(msg))

    def reset(self) -> None:
        """Drop whatever was queued for a dead core (a restarted one must not run requests already failed)."""
        with self.lock:
            self.push.close()
            self.push = self._new_push()
        self.ready, self.inflight, self.stats, self.started = False, 0, {}, time.monotonic()

    def stalled(self, now: float, timeout: float) -> bool:
        """Work is pending here and the core has said nothing for `timeout` seconds."""
        return bool(timeout) and self.ready and self.inflight > 0 and now - self.heard > timeout

    @property
    def load(self) -> int:
        reported = self.stats.get("running_requests", 0) + self.stats.get("queue_depth", 0)
        return max(self.inflight, reported)

    def close(self) -> None:
        self.dealer.close(linger=0)
        self.push.close(linger=0)


class EngineClient:
    """Engine-core processes behind the interface of `Engine`: submit, stats, reset_prefix_cache, start, stop, tm.

    cores: a `CoreSet` this client owns (it starts, restarts and stops them) or the (input, output) addresses of
    cores another process owns. on_death: "restart" or "exit" (see the module docstring); on_fatal(reason) is
    called for "exit" (default: nothing more than the failed requests and an unhealthy /health). stall_timeout:
    seconds of silence from a core holding our requests before it is killed as hung (0: never).
    """

    def __init__(self, tm, cores: CoreSet | list[tuple[str, str]], on_death: str = "restart",
                 on_fatal: Callable[[str], None] | None = None, ready_timeout: float | None = None,
                 stall_timeout: float = STALL_TIMEOUT_S) -> None:
        if on_death not in ("restart", "exit"):
            raise ValueError("on_death must be 'restart' or 'exit'")
        if stall_timeout < 0:
            raise ValueError("stall_timeout must be >= 0 (0 turns the check off)")
        self.stall_timeout = stall_timeout
        self.tm = tm
        self.owned = cores if isinstance(cores, CoreSet) else None
        self.addresses = cores.addresses if isinstance(cores, CoreSet) else list(cores)
        self.on_death, self.on_fatal, self.ready_timeout = on_death, on_fatal, ready_timeout
        self.links: list[CoreLink] = []
        self._live: dict[int, RemoteHandle] = {}
        self._lock = threading.Condition()
        self._thread: threading.Thread | None = None
        self._closing = self._stopping = False
        self._turn = itertools.count()
        self._resetting = threading.Lock()  # one prefix-cache reset at a time

    # -- the Engine interface -------------------------------------------------------------------------------
    def start(self) -> EngineClient:
        """Start (or connect to) the cores and wait until every one has loaded its model and is ready."""
        if self._thread is not None:
            return self
        if self.owned is not None:
            self.owned.start()
        ident = f"api-{os.getpid()}-{id(self):x}".encode()
        self.links = [CoreLink(i, a, b, ident) for i, (a, b) in enumerate(self.addresses)]
        self._closing = self._stopping = False
        self._thread = threading.Thread(target=self._io_loop, name="trimode-engine-client", daemon=True)
        self._thread.start()
        deadline = None if self.ready_timeout is None else time.monotonic() + self.ready_timeout
        with self._lock:
            while not all(link.ready for link in self.links):
                failed = [link.down for link in self.links if link.fatal]
                if failed or (deadline is not None and time.monotonic() > deadline):
                    self._lock.release()
                    try:
                        self.stop()
                    finally:
                        self._lock.acquire()
                    raise RuntimeError(failed[0] if failed else "the engine processes did not start in time")
                self._lock.wait(0.2)
        return self

    def stop(self) -> None:
        """Stop the cores this client owns (their requests end with EngineStopped) and disconnect."""
        self._stopping = True  # cores going away now are not deaths
        if self.owned is not None:
            self.owned.stop()
        self._closing = True
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()
        self._thread = None
        self._fail_all(self.links, EngineStopped("the engine stopped"))
        for link in self.links:
            link.close()

    def __enter__(self) -> EngineClient:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def submit(self, request: EngineRequest) -> RemoteHandle:
        """Send to the least-loaded ready core and wait for its answer (raises as `Engine.submit` does)."""
        return self.submit_all([request])[0]

    def submit_all(self, requests: list[EngineRequest]) -> list[RemoteHandle]:
        """Several requests (a request's `n` choices, its prompts) sent at once, then their answers awaited: one
        round trip to the cores, not one per request. All or none: on a refusal the accepted ones are cancelled
        and the refusal is raised."""
        handles: list[RemoteHandle] = []
        try:
            for request in requests:
                link = self._pick()
                decode = self.tm.tokenizer.decode if self.tm.tokenizer is not None else None  # its reader decodes
                handle = RemoteHandle(request, link, decode)
                with self._lock:
                    self._live[request.request_id] = handle
                    if link.inflight == 0:  # the silence that counts starts now, not when it last spoke
                        link.heard = time.monotonic()
                    link.inflight += 1
                link.send(["submit", link.identity, request_to_wire(request)])
                handles.append(handle)
        except EngineStopped:  # no core is ready: withdraw what was sent
            for h in handles:
                h.cancel()
            raise
        for handle in handles:
            handle.answered.wait()
        refused = next((h.refusal for h in handles if h.refusal is not None), None)
        if refused is not None:
            for h in handles:
                if h.refusal is None:
                    h.cancel()
            raise refused
        return handles

    def _pick(self) -> CoreLink:
        with self._lock:
            ready = [link for link in self.links if link.ready]
            if not ready:
                why = next((link.down for link in self.links if link.down), None)
                raise EngineStopped(f"no engine process is ready ({why})" if why else "the engine is not started")
            turn = next(self._turn)
            return min(ready, key=lambda link: (link.load, (link.index - turn) % len(self.links)))

    def stats(self) -> dict:
        """The cores' `Engine.stats()` summed (the latest each sent), and each core's pid and state."""
        links = self.links
        snaps = [link.stats for link in links if link.stats]
        out: dict = {k: sum(s.get(k, 0) for s in snaps) for k in SUMMED}
        for link in links:  # a request's size is checked against every core's room, a restarting one's too
            if link.stats:
                link.limits = {k: link.stats.get(k, 0) for k in LIMITS}
        out.update({k: sum(link.limits.get(k, 0) for link in links) for k in LIMITS})
        counters: dict = {}
        for s in snaps:
            for k, v in s.get("counters", {}).items():
                counters[k] = counters.get(k, 0) + v
        out["counters"] = counters
        if snaps:
            out["max_pass_bytes"] = snaps[0].get("max_pass_bytes")
            out["kv_page_size"] = snaps[0].get("kv_page_size")
            out["prefix_cache"] = snaps[0].get("prefix_cache")
            if "auto" in snaps[0]:
                out["auto"] = snaps[0]["auto"]
        out["engines"] = [{"index": link.index, "pid": link.pid, "ready": link.ready, "error": link.down}
                          for link in links]
        out["healthy"] = bool(links) and all(link.ready for link in links)
        return out

    def reset_prefix_cache(self) -> int:
        """Every ready core forgets its cached KV pages (`Engine.reset_prefix_cache`); the pages dropped, summed.
        Raises EngineStopped when no core is ready or one stops before it answers."""
        with self._resetting:
            with self._lock:
                links = [link for link in self.links if link.ready]
                if not links:
                    raise EngineStopped("no engine process is ready")
                for link in links:
                    link.pages_dropped = None
            for link in links:
                link.send(["reset_prefix_cache", link.identity])
            deadline = time.monotonic() + RESET_TIMEOUT_S
            with self._lock:
                while any(link.pages_dropped is None for link in links):
                    if any(not link.ready for link in links) or time.monotonic() > deadline:
                        raise EngineStopped("an engine process did not answer the prefix-cache reset")
                    self._lock.wait(0.1)
                return sum(link.pages_dropped for link in links)

    # -- the I/O thread -------------------------------------------------------------------------------------
    def _io_loop(self) -> None:
        poller = zmq.Poller()
        by_socket = {link.dealer: link for link in self.links}
        for sock in by_socket:
            poller.register(sock, zmq.POLLIN)
        last_check = 0.0
        while not self._closing:
            for sock, _ in poller.poll(int(CHECK_S * 1000)):
                link = by_socket[sock]
                while True:
                    try:
                        msg = decode(sock.recv(zmq.NOBLOCK))
                    except zmq.Again:
                        break
                    self._on_message(link, msg)
            now = time.monotonic()
            if now - last_check >= CHECK_S:
                last_check = now
                for link in self.links:
                    self._check(link, now)

    def _on_message(self, link: CoreLink, msg: list) -> None:
        link.heard = time.monotonic()
        if msg[0] == "beat":
            link.stats = msg[1]
            return
        if msg[0] == "ready":
            with self._lock:
                link.ready, link.pid, link.stats, link.down = True, msg[1], msg[2], None
                self._lock.notify_all()
            log.info("engine core %d ready (pid %d)", link.index, link.pid)
            return
        if msg[0] == "prefix_cache_reset":
            with self._lock:
                link.pages_dropped, link.stats = msg[1], msg[2]
                self._lock.notify_all()
            return
        link.stats = msg[1]
        wakeups = Wakeups()  # the step's events reach their readers first, then one wake-up per event loop
        for item in msg[2]:
            handle = self._live.get(item[1])
            if handle is None:
                continue
            kind = item[0]
            if kind == "ack":
                handle.answered.set()
            elif kind == "event":
                ev = event_from_wire(item[2], item[3])
                if item[2] == "result":
                    self._forget(handle)
                    handle._finish(ev, wakeups)
                else:
                    handle._put(ev, wakeups)
            else:  # "refused" or "failed"
                self._forget(handle)
                error = error_from_wire(item[2], item[3])
                if kind == "refused":
                    handle.refusal = error
                    handle.answered.set()
                else:
                    handle._fail(error, wakeups)
        wakeups.fire()

    def _forget(self, handle: RemoteHandle) -> None:
        with self._lock:
            if self._live.pop(handle.request_id, None) is not None:
                handle.link.inflight -= 1

    def _check(self, link: CoreLink, now: float) -> None:
        """Greet a core that is not ready; notice a core that died or stalled."""
        if self._stopping:
            return
        stalled = link.stalled(now, self.stall_timeout)
        if not link.ready:
            if not link.fatal and now - link.last_hello >= HELLO_S:
                link.last_hello = now
                link.send(["hello", link.identity])
            if self.owned is None or link.fatal or self.owned.alive(link.index):
                return
        elif not stalled and self._alive(link):
            return
        pid = link.pid if link.pid is not None or self.owned is None else self.owned.pid(link.index)
        if stalled:
            reason = (f"the engine process {link.index} (pid {pid}) stopped answering (nothing from it for "
                      f"{now - link.heard:.1f} s with requests pending; --engine-stall-timeout "
                      f"{self.stall_timeout:g}) and was killed")
            self._kill(link)
        else:
            code = self.owned.exitcode(link.index) if self.owned is not None else None
            reason = f"the engine process {link.index} (pid {pid}) died" + ("" if code is None else
                                                                              f" (exit code {code})")
        log.error("%s; failing its requests", reason)
        was_ready = link.ready
        with self._lock:
            link.down = reason
            link.reset()
            self._lock.notify_all()
        self._fail_all([link], EngineDied(f"{reason}; the request was lost"))
        if self.owned is None:
            return  # another process owns the core: greet whatever it starts next
        if self.on_death == "restart" and was_ready:
            log.error("restarting engine process %d", link.index)
            self.owned.restart(link.index)
            return
        link.fatal = True
        if self.on_fatal is not None:
            self.on_fatal(reason)

    def _kill(self, link: CoreLink) -> None:
        """End a hung core for good (SIGKILL also ends a stopped process); its owner sees a death and restarts it."""
        if self.owned is not None:
            self.owned.kill(link.index)
            return
        try:
            os.kill(link.pid, signal.SIGKILL)
        except (OSError, TypeError):  # already gone
            pass

    def _alive(self, link: CoreLink) -> bool:
        if self.owned is not None:
            return self.owned.alive(link.index)
        try:
            with open(f"/proc/{link.pid}/stat") as f:
                return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
        except (OSError, IndexError):
            return False

    def _fail_all(self, links: list[CoreLink], error: BaseException) -> None:
        with self._lock:
            gone = [h for h in self._live.values() if h.link in links]
            for h in gone:
                del self._live[h.request_id]
        for h in gone:
            if not h.answered.is_set():
                h.refusal = error
                h.answered.set()
            else:
                h._fail(error)
