"""Counting host syncs: the reads of tensor values into Python that, on a GPU, make the host wait for the device.

`SyncCounter` counts `aten._local_scalar_dense` dispatches (`int(t)`, `float(t)`, `bool(t)`, `t.item()`) and
`Tensor.tolist` / `Tensor.numpy` calls, in two buckets: inside the step machines (`Sequence.advance`) and
everywhere else (the engine, the runner, the decision stage). Since the decision stage hands the machines host
tensors, their reads touch no device memory: on a GPU only the `engine` bucket is device syncs. On a CPU both
buckets are mere reads; the split shows which would be syncs. Before the decision stage, a machine read its
logits on the device, so both buckets were syncs.
"""

from __future__ import annotations

from collections import Counter

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from trimode.engine.sequence import Sequence


class SyncCounter(TorchDispatchMode):
    """with SyncCounter() as c: ...; c.counts["engine"], c.counts["machines"]."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: Counter = Counter()
        self._in_machine = 0

    def _bucket(self) -> str:
        return "machines" if self._in_machine else "engine"

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            self.counts[self._bucket()] += 1
        return func(*args, **(kwargs or {}))

    def __enter__(self) -> SyncCounter:
        counter = self
        self._saved = (torch.Tensor.tolist, torch.Tensor.numpy, Sequence.advance)
        tolist, numpy, advance = self._saved

        def counted(fn):
            def wrapper(t, *a, **k):
                counter.counts[counter._bucket()] += 1
                return fn(t, *a, **k)
            return wrapper

        def machine_advance(seq, reply):
            counter._in_machine += 1
            try:
                return advance(seq, reply)
            finally:
                counter._in_machine -= 1

        torch.Tensor.tolist, torch.Tensor.numpy = counted(tolist), counted(numpy)
        Sequence.advance = machine_advance
        return super().__enter__()

    def __exit__(self, *exc) -> None:
        torch.Tensor.tolist, torch.Tensor.numpy, Sequence.advance = self._saved
        super().__exit__(*exc)
