"""The messages between API server processes and engine-core processes (`client.py`, `core_process.py`).

Every message is one msgpack frame (msgspec). API server -> core, on the core's PULL socket:

    ["hello", client]                      a client (its DEALER identity) asks for "ready" (also after a restart)
    ["submit", client, request]            an `EngineRequest` as a dict (`request_to_wire`)
    ["cancel", client, request_id]
    ["reset_prefix_cache", client]         the core forgets its cached KV pages (between two steps)
    ["stop"]                               the owner stops the core (running requests end with EngineStopped)

Core -> one API server, on the core's ROUTER socket (to that client's DEALER):

    ["ready", pid, stats]
    ["prefix_cache_reset", pages_dropped, stats]   the answer to "reset_prefix_cache"
    ["out", stats, items]                  ONE message per engine step and client: every row's events of the
                                           step, and the core's `Engine.stats()` after it
    ["beat", stats]                        the loop goes on (sent between two steps to a client that got nothing
                                           for a while and has requests on the core, or stale stats)
    item: ["ack", rid] | ["refused", rid, kind, message] | ["event", rid, kind, fields] | ["failed", rid, kind,
          message]; a "result" event ends its request, as does "failed".

Events travel as their dataclass fields, so a field added to `Delta`, `BlockState`, `GenerationResult` or
`DecodeStats` crosses without a change here.
"""

from __future__ import annotations

import dataclasses

import msgspec
import torch

from trimode.decode.grammar import Constraint
from trimode.decode.result import BlockState, Delta, GenerationResult
from trimode.decode.stats import DecodeStats
from trimode.engine.request import EngineRequest, EngineStopped, QueueFull, RequestCancelled
from trimode.engine.scoring import PromptLogprob

encode = msgspec.msgpack.Encoder().encode
decode = msgspec.msgpack.Decoder().decode

EVENT_KINDS = {Delta: "delta", BlockState: "block", GenerationResult: "result"}
_EVENT_TYPES = {v: k for k, v in EVENT_KINDS.items()}


class EngineDied(EngineStopped):
    """The engine process serving this request died; the request is lost (a server answers 503)."""


def request_to_wire(req: EngineRequest) -> dict:
    return {f.name: getattr(req, f.name) for f in dataclasses.fields(req)}


def request_from_wire(d: dict) -> EngineRequest:
    if d.get("edit") is not None:
        d["edit"] = tuple(d["edit"])
    if d.get("constraint") is not None:  # a dataclass travels as its fields
        d["constraint"] = Constraint(**d["constraint"])
    return EngineRequest(**d)


def event_to_wire(ev) -> tuple[str, dict]:
    fields = {f.name: getattr(ev, f.name) for f in dataclasses.fields(ev)}
    if isinstance(ev, GenerationResult):
        fields["stats"] = dataclasses.asdict(ev.stats)
    return EVENT_KINDS[type(ev)], fields


def event_from_wire(kind: str, fields: dict):
    if kind == "result":
        fields["stats"] = DecodeStats(**fields["stats"])
        fields["spans"] = [tuple(s) for s in fields.get("spans") or []]
        if fields.get("prompt_logprobs") is not None:  # the first entry is None, the rest dataclasses as dicts
            fields["prompt_logprobs"] = [None if e is None else PromptLogprob(
                e["token_id"], e["logprob"], e["rank"], [tuple(t) for t in e["top"]])
                for e in fields["prompt_logprobs"]]
    return _EVENT_TYPES[kind](**fields)


def error_to_wire(e: BaseException) -> tuple[str, str]:
    """(kind, message): the kinds a server answers differently; anything else is an internal error."""
    for kind, cls in (("queue_full", QueueFull), ("stopped", EngineStopped), ("cancelled", RequestCancelled),
                      ("invalid", ValueError)):
        if isinstance(e, cls):
            return kind, str(e)
    if isinstance(e, (MemoryError, torch.OutOfMemoryError)):
        return "out_of_memory", str(e)
    return "internal", f"{type(e).__name__}: {e}"


def error_from_wire(kind: str, message: str) -> BaseException:
    cls = {"queue_full": QueueFull, "stopped": EngineStopped, "cancelled": RequestCancelled, "invalid": ValueError,
           "out_of_memory": MemoryError}.get(kind, RuntimeError)
    return cls(message)
