"""What a client hands the engine (`EngineRequest`) and what it gets back (`RequestHandle`).

A handle is a thread-safe stream of events: `Delta` / `BlockState` (`trimode.decode.result`) while the request
runs, then exactly one `GenerationResult` (finish_reason "stop", "length" or "cancelled"), after which the
iteration ends. If the request fails inside the engine, iterating raises that error instead.

Text is decoded by the reader: for a continuation without stop strings the engine queues deltas whose text is
None, and the handle's reader (its thread, or its asyncio loop) fills it in as it takes each event
(`trimode.decode.text.DeferredText`), so the engine's loop thread does no detokenization for it. `drain` (a
relay to another process) passes them on as they are; the handle at the far end decodes them.
"""

from __future__ import annotations

import asyncio
import itertools
import threading
from collections import deque
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field

from trimode.decode.text import DeferredText

_ids = itertools.count(1)


class QueueFull(Exception):
    """The engine's waiting queue is full; retry later (a server answers 429/503)."""


class EngineStopped(RuntimeError):
    """The engine was stopped before this request finished."""


class RequestCancelled(Exception):
    """The client cancelled the request (it ends with finish_reason "cancelled")."""


@dataclass
class EngineRequest:
    prompt_ids: list[int]
    mode: str = "ar"
    max_new_tokens: int = 128
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: list[str] | None = None
    provisional: bool = False
    # The mode's knobs (`trimode.decode.modes`) and eos_token_id, max_thinking_tokens, end_think_token_id.
    knobs: dict = field(default_factory=dict)
    # An edit instead of a continuation (mode "edit"): ("infill", {"suffix": ids}) with prompt_ids the prefix and
    # max_new_tokens the hole; ("revise", {"draft": text or ids, "spans": None or [[start, end], ...]}); ("fill",
    # {"template": text}) with prompt_ids unused. See `TriMode.infill` / `revise` / `fill`.
    edit: tuple[str, dict] | None = None
    ignore_eos: bool = False  # generate exactly max_new_tokens: EOS does not end it (vLLM's ignore_eos)
    # Logit processors (trimode.decode.decide) and the log-probabilities to report (None: none).
    repetition_penalty: float = 1.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    logit_bias: dict[int, float] | None = None
    min_tokens: int = 0
    logprobs: int | None = None
    # Structured output: a `trimode.decode.grammar.Constraint` the output must match (None: free text).
    constraint: object = None
    # Score the prompt: the logprob of every prompt token as a continuation (and this many alternatives per
    # position), from the first pass (`trimode.engine.scoring`). With max_new_tokens=0 the request ends after that
    # pass (scoring without generating); max_new_tokens=0 without it runs nothing.
    prompt_logprobs: int | None = None
    request_id: int = field(default_factory=lambda: next(_ids))


_END = object()


class _Failure:
    def __init__(self, error: BaseException) -> None:
        self.error = error


class Waker:
    """An asyncio reader's wake-up: the future it awaits while its handle has nothing queued (a bare future, not
    an `asyncio.Event`: a reader wakes once per engine step, and the event's own bookkeeping would cost the
    loop's thread, which every request's reader shares, more Python per step than the reading itself)."""

    __slots__ = ("loop", "future")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.future: asyncio.Future | None = None

    def wake(self) -> None:  # on the reader's loop
        future, self.future = self.future, None
        if future is not None and not future.done():
            future.set_result(None)


class Wakeups:
    """Asyncio readers to wake, gathered while a batch of events is handed out (one engine-core message): one
    `call_soon_threadsafe` per event loop for the whole batch, not one per event."""

    def __init__(self) -> None:
        self.events: dict[asyncio.AbstractEventLoop, list[Waker]] = {}

    def add(self, wakers: list[Waker]) -> None:
        for waker in wakers:
            self.events.setdefault(waker.loop, []).append(waker)

    def fire(self) -> None:
        for loop, wakers in self.events.items():
            try:
                loop.call_soon_threadsafe(_wake_all, wakers)
            except RuntimeError:  # the client's event loop is closed: nobody is listening any more
                pass
        self.events = {}


def _wake_all(wakers: list[Waker]) -> None:
    for waker in wakers:
        waker.wake()


class RequestHandle:
    """The client's side of a running request: iterate (blocking) or `aiter()` (asyncio); `cancel()` any time."""

    def __init__(self, request: EngineRequest, decode=None) -> None:
        self.request = request
        self.decode = decode  # token ids -> text: the reader decodes deferred text with it (None: no tokenizer)
        self._text: DeferredText | None = None
        # The engine's side takes the plain lock (no Python-level frame per call: it does so twice per request per
        # step); a blocking reader waits on the condition over the same lock.
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._items: deque = deque()
        self._wakers: list[Waker] = []
        self._cancelled = threading.Event()
        self._closed = False
        self._unread = False  # items queued since the client was last woken

    @property
    def request_id(self) -> int:
        return self.request.request_id

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    @property
    def done(self) -> bool:
        return self._closed

    def cancel(self) -> None:
        """Ask the engine to drop this request; it leaves at the next step and its cache is freed."""
        self._cancelled.set()

    # -- engine side -------------------------------------------------------------------------------------
    def _put(self, item, wakeups: Wakeups | None = None, wake: bool = True) -> None:
        """Queue `item` for the reader. `wake=False` leaves the waking to a later `_wake` (the engine queues a
        step's events as it makes them and wakes each client once, after the step, so woken client threads do
        not contend with the loop's Python work mid-step); asyncio readers are woken now, or added to `wakeups`
        (fired by the caller: one wake-up per event loop for a whole message)."""
        with self._lock:
            if self._closed:
                return
            self._items.append(item)
            if item is _END or isinstance(item, _Failure):
                self._closed = True
            self._unread = True
        if wake:
            self._wake(wakeups)

    def _wake(self, wakeups: Wakeups | None = None) -> None:
        """Wake the client (a blocked iterator, an asyncio reader) if something was queued since the last wake."""
        with self._lock:
            if not self._unread:
                return
            self._unread = False
            self._cond.notify_all()
            if not self._wakers:
                return
            batch = wakeups if wakeups is not None else Wakeups()
            batch.add(self._wakers)
        if wakeups is None:
            batch.fire()

    def _finish(self, result, wakeups: Wakeups | None = None) -> None:
        batch = wakeups if wakeups is not None else Wakeups()
        self._put(result, batch)
        self._put(_END, batch)
        if wakeups is None:
            batch.fire()

    def _fail(self, error: BaseException, wakeups: Wakeups | None = None) -> None:
        self._put(_Failure(error), wakeups)

    # -- a relay (the engine-core process forwards a handle's events to an API server process) ----------------
    def drain(self) -> list:
        """Every item queued so far, without waiting: events, the result, then the end (or a failure)."""
        with self._lock:
            items = list(self._items)
            self._items.clear()
        return items

    @staticmethod
    def is_end(item) -> bool:
        return item is _END

    @staticmethod
    def failure(item) -> BaseException | None:
        return item.error if isinstance(item, _Failure) else None

    # -- client side -------------------------------------------------------------------------------------
    def _pop(self):
        item = self._items.popleft()
        if isinstance(item, _Failure):
            raise item.error
        return item

    def _settle(self, item):
        """The text of a deferred delta or result, decoded here, on the reader's side (outside the lock)."""
        if self.decode is None or getattr(item, "text", "") is not None:
            return item
        if self._text is None:
            self._text = DeferredText(self.decode)
        return self._text.settle(item)

    def __iter__(self) -> Iterator:
        while True:
            with self._cond:
                while not self._items:
                    self._cond.wait()
                item = self._pop()
            if item is _END:
                return
            yield self._settle(item)

    def result(self):
        """Wait for the end and return the GenerationResult (the events not read yet are consumed)."""
        last = None
        for item in self:
            last = item
        return last

    async def aiter(self) -> AsyncIterator:
        waker = Waker(asyncio.get_running_loop())
        with self._lock:
            self._wakers.append(waker)
        try:
            while True:
                with self._lock:
                    item = self._pop() if self._items else None
                    if item is None:  # set under the lock: a later _put's wake-up resolves this future
                        waker.future = waker.loop.create_future()
                if item is None:
                    await waker.future
                    continue
                if item is _END:
                    return
                yield self._settle(item)
        finally:
            with self._lock:
                self._wakers.remove(waker)
