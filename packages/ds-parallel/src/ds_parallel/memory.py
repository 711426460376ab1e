"""Measuring activation memory: peak bytes of tensors allocated inside a region, on any device.

On CUDA, ``torch.cuda.max_memory_allocated`` answers; on CPU PyTorch keeps no allocator statistics,
so :class:`PeakMemory` counts, through a ``TorchDispatchMode``, the storage of every tensor an
operator creates inside the region, and subtracts it when the last tensor using that storage is
freed (tensors autograd saves for backward stay alive, and counted, until backward releases them).
Tensors that existed before the region (weights, inputs) are not counted: the figure is what the
computation itself holds at its peak.
"""

from __future__ import annotations

import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

__all__ = ["PeakMemory", "saved_activation_bytes"]


class PeakMemory(TorchDispatchMode):
    """``with PeakMemory() as m: ...`` then ``m.peak`` (bytes) and ``m.current`` (still held)."""

    def __init__(self) -> None:
        super().__init__()
        self.current = 0
        self.peak = 0
        self._refs: dict[int, list] = {}  # storage pointer -> [bytes, live tensors]

    def _release(self, ptr: int) -> None:
        entry = self._refs.get(ptr)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] == 0:
            self.current -= entry[0]
            del self._refs[ptr]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor) or t.device.type == "meta":
                continue
            storage = t.untyped_storage()
            ptr = storage.data_ptr()
            if ptr == 0:
                continue
            entry = self._refs.get(ptr)
            if entry is None:
                entry = self._refs[ptr] = [storage.nbytes(), 0]
                self.current += entry[0]
                self.peak = max(self.peak, self.current)
            entry[1] += 1
            weakref.finalize(t, self._release, ptr)
        return out


def saved_activation_bytes(fn, *args, exclude=(), **kwargs) -> tuple[object, int]:
    """Run ``fn(*args, **kwargs)`` and return (its result, bytes of the distinct storages autograd saved
    for backward) — the activation memory a training step holds between forward and backward.
    Storages of the tensors in ``exclude`` (the parameters) are not counted."""
    skip = {t.untyped_storage().data_ptr() for t in exclude}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor):
        storage = t.untyped_storage()
        if storage.data_ptr() not in skip:
            seen.setdefault(storage.data_ptr(), storage.nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn(*args, **kwargs)
    return out, sum(seen.values())
