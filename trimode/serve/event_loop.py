"""The event loop the HTTP server runs on: uvloop where it is installed (a dependency on Linux and macOS), as
uvicorn's "auto" picks and as vLLM runs its API server; asyncio's own loop elsewhere.

Why it matters here: every engine step wakes the loop that reads its events (`call_soon_threadsafe`, once per step
and loop), and in one process that loop's Python shares the interpreter lock with the engine's step. uvloop's wake-up
and scheduling run in C, so each step's reading takes less of the lock. Benchmarks that read the engine as the
server does run their readers on the same loop (`run`)."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine

try:
    import uvloop
except ImportError:  # Windows, or a minimal install
    uvloop = None

NAME = "uvloop" if uvloop is not None else "asyncio"  # uvicorn's `loop` setting


def run(coro: Coroutine):
    """`asyncio.run(coro)` on the server's kind of event loop."""
    return uvloop.run(coro) if uvloop is not None else asyncio.run(coro)
