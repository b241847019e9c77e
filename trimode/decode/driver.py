"""The batch-1 driver: runs one step machine against the network and a contiguous KV cache (gpt-fast style).

    out = drive(run(net, machine))          # DecodeOutput: tokens per row and the stats
    for event in run(net, machine): ...     # Committed / Provisional events as they happen

`decode(net, mode, prompt_ids, stop, ...)` builds the mode's machine from the registry and runs it.
"""

from __future__ import annotations

from collections.abc import Generator

import torch

from trimode.decode.decide import Decision, decide
from trimode.decode.modes import ModelDefaults, mode_spec, resolve_knobs
from trimode.decode.sampling import SamplingParams
from trimode.decode.step import Commit, DecodeOutput, Event, Forward, Machine
from trimode.decode.stopping import StopRule, ThinkingBudget
from trimode.model.cache import KVCache
from trimode.model.transformer import NLDTransformer

DecodeStream = Generator[Event, None, DecodeOutput]


def logits_index(forward: Forward, rows: int) -> torch.Tensor | None:
    """Indices into the flattened [rows * T] tokens of the positions whose logits `forward` reads."""
    t = forward.tokens
    if forward.logits == "all":
        return None
    cols = torch.tensor([t - 1] if forward.logits == "last" else forward.logits, dtype=torch.long)
    return (torch.arange(rows)[:, None] * t + cols[None, :]).flatten()


def shape_logits(forward: Forward, logits: torch.Tensor, rows: int) -> torch.Tensor:
    """The logits of a pass as its machine reads them (see `Forward`)."""
    if forward.logits == "all":
        return logits
    logits = logits.view(rows, -1, logits.shape[-1])
    return logits[:, 0] if forward.logits == "last" else logits


@torch.no_grad()
def run_forward(net: NLDTransformer, cache: KVCache, forward: Forward) -> torch.Tensor | Decision:
    """The pass's logits as its machine reads them, or with a pick, the decision stage's reply (the same
    `decide` the engine runs for many rows)."""
    rows = forward.rows
    index = logits_index(forward, rows)
    dev = net.device
    positions = forward.positions.to(dev) if forward.positions is not None else None
    logits = net(forward.id_tensor().to(dev), mask=forward.mask, cache=cache, positions=positions, lora=forward.lora,
                 logits_at=index)
    if forward.cache == "append":
        cache.commit(forward.tokens)
    if forward.pick is not None:
        return decide([logits.reshape(-1, logits.shape[-1])], [forward.pick])[0]
    return shape_logits(forward, logits, rows)


def run(net: NLDTransformer, machine: Machine, capacity: int = 256) -> DecodeStream:
    """Drive `machine` to its end; yields its events, returns its DecodeOutput. Closing this generator closes
    the machine (an abandoned stream stops the work)."""
    cache: KVCache | None = None
    reply = None
    try:
        while True:
            try:
                op = machine.send(reply)
            except StopIteration as done:
                return done.value
            reply = None
            if isinstance(op, Forward):
                if cache is None:
                    cache = net.new_cache(op.rows, capacity)
                reply = run_forward(net, cache, op)
            elif isinstance(op, Commit):
                if op.slots is not None:
                    cache.commit_slots(op.slots)
                else:
                    cache.commit(op.n)
            else:
                yield op
    finally:
        machine.close()


def drive(stream: DecodeStream) -> DecodeOutput:
    """Run a decode to the end, ignoring its events."""
    while True:
        try:
            next(stream)
        except StopIteration as stop:
            return stop.value


def decode(net: NLDTransformer, mode: str, prompt_ids: torch.Tensor, stop: StopRule,
           sampling: SamplingParams = SamplingParams(), thinking: ThinkingBudget | None = None,
           provisional: bool = False, steer=None, **knobs) -> DecodeStream:
    """The events of decoding `prompt_ids` [B, P] with `mode` and its knobs (defaults from the network)."""
    spec = mode_spec(mode)
    if prompt_ids.shape[0] != 1 and not spec.batch_rows:
        raise ValueError(f"{mode} decodes one sequence at a time (batch size 1)")
    has_drafter = net.encoder.layers[0].self_attn.o_proj.lora_A is not None
    k = resolve_knobs(mode, ModelDefaults(net.config.block_size, has_drafter, net.sampler), **knobs)
    machine = spec.machine(prompt_ids.cpu(), stop, sampling, net.config.mask_token_id, k, thinking, provisional, steer)
    capacity = spec.kv_slots(prompt_ids.shape[1], stop.max_new_tokens, k)
    return run(net, machine, capacity)
