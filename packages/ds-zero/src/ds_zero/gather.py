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

Each gather goes through a :class:`~ds_zero.prefetch.Prefetcher`: from the second step on it gathers
the next modules' parameters ahead (asynchronously) and keeps parameters that are used again soon,
following the order recorded on the first step (``prefetch.py``). A step runs from the root module's
forward to the end of its backward (the gradient reducer ends it), or to the end of the forward when
gradients are off.

Gathering is a collective, so every rank must run the same modules in the same order (as for any
data-parallel model); a rank that does not fails with :class:`~ds_zero.fingerprint.ModulePathMismatchError`
naming the modules (``fingerprint.py``). Code that reads parameters outside their module
(``module.weight`` in another module's forward) must gather them with :class:`GatheredParameters`.
"""

from __future__ import annotations

import sys

import torch

from .fingerprint import key_of
from .prefetch import Prefetcher, Stage3Settings
from .stage3 import ShardedParameter, Stage3Partitions

__all__ = ["ParameterCoordinator"]


class _SavedRef:
    """What autograd keeps instead of a tensor saved from a gathered parameter's storage; ``key``: the
    backward fetch point (the module that saved it)."""

    __slots__ = ("shard", "size", "stride", "offset", "key")

    def __init__(self, shard: ShardedParameter, t: torch.Tensor, key: int) -> None:
        self.shard, self.key = shard, key
        self.size, self.stride = t.size(), t.stride()
        self.offset = t.storage_offset() - shard.param.data.storage_offset()


def _ptr(s: ShardedParameter) -> int:
    return s.param.data.untyped_storage().data_ptr()


class ParameterCoordinator:
    """Installs the gather/release hooks of a :class:`Stage3Partitions` on a module tree.

    ``settings``: the stage-3 knobs (:class:`~ds_zero.prefetch.Stage3Settings`; DeepSpeed's defaults
    when omitted; the gradient reducer passes the config's through :meth:`configure`).
    """

    def __init__(self, parts: Stage3Partitions, module: torch.nn.Module,
                 settings: Stage3Settings | None = None) -> None:
        self.parts = parts
        self.handles = []
        self.live: dict[int, ShardedParameter] = {}  # storage pointer -> gathered shard
        self._saved_hooks = None
        self._depth = 0
        self._outer_error = None
        self._running: list[int] = []  # backward keys of the modules in forward, innermost last
        self.prefetcher = Prefetcher([s for g in parts.groups for s in g.sharded], parts.group, self._release,
                                     settings)
        for name, m in module.named_modules():
            shards = parts.shards_of(m.parameters(recurse=False))
            if not shards:
                continue
            label = name or f"<root {type(m).__name__}>"
            keys = (key_of(f"{label} (forward)"), key_of(f"{label} (backward)"))
            self.handles.append(m.register_forward_pre_hook(lambda mod, args, s=shards, k=keys: self.acquire(s, k)))
            self.handles.append(m.register_forward_hook(lambda mod, args, out, s=shards: self.drop(s),
                                                        always_call=True))
        self.handles.append(module.register_forward_pre_hook(self._enter, prepend=True))
        self.handles.append(module.register_forward_hook(self._exit, always_call=True))

    def configure(self, settings: Stage3Settings) -> None:
        self.prefetcher.settings = settings

    # -- gather / release with use counts -------------------------------------------------------------
    def acquire(self, shards: list[ShardedParameter], keys: tuple[int, int]) -> None:
        """A module's forward starts: gather its shards not already whole, count one more user of each."""
        self._running.append(keys[1])
        for s in shards:
            s.users += 1
        self.prefetcher.fetch(keys[0], [s for s in shards if not s.persistent])
        for s in shards:
            self.live[_ptr(s)] = s

    def drop(self, shards: list[ShardedParameter]) -> None:
        if self._running:
            self._running.pop()
        for s in shards:
            s.users -= 1
            self.release_if_unused(s)

    def release_if_unused(self, s: ShardedParameter) -> None:
        """Release ``s`` when no module, context or backward holds it and no use comes soon."""
        if s.users == 0 and not s.held_for_backward and not self.prefetcher.keep(s):
            self._release(s)

    def _release(self, s: ShardedParameter) -> None:
        if not s.persistent and s.gathered:
            self.live.pop(_ptr(s), None)
            s.release()
            self.prefetcher.resident -= s.numel

    def backward_done(self, s: ShardedParameter) -> None:
        """Called by the gradient reducer once ``s``'s gradient is reduced: release it if unused."""
        if s.held_for_backward:
            s.held_for_backward = False
            self.release_if_unused(s)

    def check_path(self) -> None:
        """Before backward: compare the forward's module order across ranks (see ``prefetch.py``)."""
        self.prefetcher.check_path()

    def end_step(self) -> None:
        """After backward (or before the optimizer step): finish the step, release what is unused."""
        self.prefetcher.end()

    # -- saved tensors: keep references, not released storage -----------------------------------------
    def _pack(self, t: torch.Tensor):
        if not self.live or t.layout != torch.strided or t.device.type == "meta":
            return t
        ptr = t.untyped_storage().data_ptr()
        s = self.live.get(ptr)
        # the check against the parameter's current storage guards against a stale entry
        if s is None or s.persistent or not s.gathered or _ptr(s) != ptr:
            return t
        key = self._running[-1] if self._running else key_of(f"{s.name} (backward)")
        return _SavedRef(s, t, key)

    def _unpack(self, saved):
        if not isinstance(saved, _SavedRef):
            return saved
        s = saved.shard
        if not s.held_for_backward or not s.gathered:
            self.prefetcher.fetch(saved.key, [s])  # the first use of ``s`` in this backward
            self.live[_ptr(s)] = s
        s.held_for_backward = True
        data = s.param.data
        return data.as_strided(saved.size, saved.stride, data.storage_offset() + saved.offset)

    def _enter(self, module, args) -> None:
        self._depth += 1
        if self._depth == 1:
            self._outer_error = sys.exc_info()[1]  # a forward run inside an ``except`` block is not failing
            self.prefetcher.begin((torch.is_grad_enabled(), module.training))
            self._saved_hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)
            self._saved_hooks.__enter__()

    def _exit(self, module, args, out) -> None:
        self._depth -= 1
        if self._depth == 0:
            if self._saved_hooks is not None:
                self._saved_hooks.__exit__(None, None, None)
                self._saved_hooks = None
            if sys.exc_info()[1] not in (None, self._outer_error):
                self.prefetcher.abandon()  # the forward failed: no collective now, a peer may not be here
            elif not torch.is_grad_enabled():  # no backward follows: the step ends with the forward
                self.prefetcher.end()

    def remove(self) -> None:
        self.prefetcher.end(check=False)
        for h in self.handles:
            h.remove()
        self.handles = []
