"""Stage 3's gather/release schedule: full parameters exist only around the code that uses them.

ZeRO stage 3 (Rajbhandari et al. 2020, section 5.3) all-gathers a layer's parameters right before
its forward, frees them after, and gathers them again for its backward. Here:

- **forward**: a forward pre-hook on every module gathers the module's own (non-recursive)
  parameters in one all-gather and a forward hook releases them; a use count makes nesting, a module
  called twice and tied parameters (an embedding shared with the output head) safe.
- **backward**: while the model runs, ``torch.autograd.graph.saved_tensors_hooks`` replaces every
  tensor autograd saves that lives in a gathered parameter's storage (the parameter, or a view such
  as ``weight.t()``) by a small reference. When backward unpacks it, the parameter is gathered again
  (if released) and the same view is rebuilt on the fresh storage. So no released parameter is kept
  alive by the graph, and backward gathers exactly what it needs, in the order it needs it — the
  same on every rank. The gradient reducer releases it again once its gradient is reduced.

Gathering is a collective, so every rank must run the same modules in the same order (as for any
data-parallel model). Code that reads parameters outside their module (``module.weight`` in another
module's forward) must gather them with :class:`GatheredParameters`.
"""

from __future__ import annotations

import torch

from .stage3 import ShardedParameter, Stage3Partitions, gather_shards

__all__ = ["ParameterCoordinator"]


class _SavedRef:
    """What autograd keeps instead of a tensor saved from a gathered parameter's storage."""

    __slots__ = ("shard", "size", "stride", "offset")

    def __init__(self, shard: ShardedParameter, t: torch.Tensor) -> None:
        self.shard = shard
        self.size, self.stride = t.size(), t.stride()
        self.offset = t.storage_offset() - shard.param.data.storage_offset()


class ParameterCoordinator:
    """Installs the gather/release hooks of a :class:`Stage3Partitions` on a module tree."""

    def __init__(self, parts: Stage3Partitions, module: torch.nn.Module) -> None:
        self.parts = parts
        self.handles = []
        self.live: dict[int, ShardedParameter] = {}  # storage pointer -> gathered shard
        self._saved_hooks = None
        self._depth = 0
        for m in module.modules():
            shards = parts.shards_of(m.parameters(recurse=False))
            if not shards:
                continue
            self.handles.append(m.register_forward_pre_hook(lambda mod, args, s=shards: self.acquire(s)))
            self.handles.append(m.register_forward_hook(lambda mod, args, out, s=shards: self.drop(s),
                                                        always_call=True))
        self.handles.append(module.register_forward_pre_hook(self._enter, prepend=True))
        self.handles.append(module.register_forward_hook(self._exit, always_call=True))

    # -- gather / release with use counts -------------------------------------------------------------
    def acquire(self, shards: list[ShardedParameter]) -> None:
        """Gather every shard not already whole (one collective), and count one more user of each."""
        gather_shards([s for s in shards if not s.gathered], self.parts.group)
        for s in shards:
            s.users += 1
            self.live[s.param.data.untyped_storage().data_ptr()] = s

    def drop(self, shards: list[ShardedParameter]) -> None:
        for s in shards:
            s.users -= 1
            if s.users == 0 and not s.held_for_backward:
                self._release(s)

    def _release(self, s: ShardedParameter) -> None:
        if not s.persistent and s.gathered:
            self.live.pop(s.param.data.untyped_storage().data_ptr(), None)
            s.release()

    def backward_done(self, s: ShardedParameter) -> None:
        """Called by the gradient reducer once ``s``'s gradient is reduced: release it if unused."""
        if s.held_for_backward:
            s.held_for_backward = False
            if s.users == 0:
                self._release(s)

    # -- saved tensors: keep references, not released storage -----------------------------------------
    def _pack(self, t: torch.Tensor):
        if not self.live or t.layout != torch.strided or t.device.type == "meta":
            return t
        ptr = t.untyped_storage().data_ptr()
        s = self.live.get(ptr)
        # the check against the parameter's current storage guards against a stale entry
        if s is None or s.persistent or not s.gathered or s.param.data.untyped_storage().data_ptr() != ptr:
            return t
        return _SavedRef(s, t)

    def _unpack(self, saved):
        if not isinstance(saved, _SavedRef):
            return saved
        s = saved.shard
        if not s.gathered:
            gather_shards([s], self.parts.group)
            self.live[s.param.data.untyped_storage().data_ptr()] = s
        s.held_for_backward = True
        data = s.param.data
        return data.as_strided(saved.size, saved.stride, data.storage_offset() + saved.offset)

    def _enter(self, module, args) -> None:
        self._depth += 1
        if self._depth == 1:
            self._saved_hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)
            self._saved_hooks.__enter__()

    def _exit(self, module, args, out) -> None:
        self._depth -= 1
        if self._depth == 0 and self._saved_hooks is not None:
            self._saved_hooks.__exit__(None, None, None)
            self._saved_hooks = None

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []
