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
naming the modules (``fingerprint.py``).

**External parameters.** A forward may use a parameter its module does not own: ``nn.MultiheadAttention``
reads ``out_proj.weight`` without calling ``out_proj``, a parent reads a child's weight, a module gets
another's weight as an argument. Every partitioned parameter is a
:class:`~ds_zero.released.ZeroParameter`; when an operation touches one that is released while a step
runs, :meth:`ParameterCoordinator.on_access` gathers it on the spot and registers it with the innermost
module running, whose forward gathers it with its own parameters from then on (and counts as its user,
so it stays whole until that forward ends; backward regathers it through the saved-tensor references
like any other). Outside a step such a touch raises, naming the parameter.
"""

from __future__ import annotations

import sys

import torch

from .fingerprint import key_of
from .prefetch import Prefetcher, Stage3Settings
from .released import raw_data
from .stage3 import ShardedParameter, Stage3Partitions

__all__ = ["ParameterCoordinator"]


class _SavedRef:
    """What autograd keeps instead of a tensor saved from a gathered parameter's storage; ``key``: the
    backward fetch point (the module that saved it)."""

    __slots__ = ("shard", "size", "stride", "offset", "key")

    def __init__(self, shard: ShardedParameter, t: torch.Tensor, key: int) -> None:
        self.shard, self.key = shard, key
        self.size, self.stride = t.size(), t.stride()
        self.offset = t.storage_offset() - raw_data(shard.param).storage_offset()


def _ptr(s: ShardedParameter) -> int:
    return raw_data(s.param).untyped_storage().data_ptr()


class _Module:
    """One module's entry: its label, fetch keys, and the shards its forward gathers — its own
    (non-recursive) parameters, then the external ones registered (``released.py``)."""

    __slots__ = ("label", "keys", "shards", "external_keys")

    def __init__(self, label: str, shards: list[ShardedParameter]) -> None:
        self.label = label
        self.keys = (key_of(f"{label} (forward)"), key_of(f"{label} (backward)"))
        self.shards = shards
        self.external_keys: dict[int, int] = {}

    def external_key(self, s: ShardedParameter) -> int:
        key = self.external_keys.get(id(s))
        if key is None:
            key = self.external_keys[id(s)] = key_of(f"{s.name} (read by {self.label})")
        return key


class _Frame:
    """A module whose forward is running: the shards it counted as users of, and externals gathered for it."""

    __slots__ = ("entry", "shards", "extra")

    def __init__(self, entry: _Module) -> None:
        self.entry, self.shards, self.extra = entry, tuple(entry.shards), []


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
        self._frames: list[_Frame] = []  # the modules in forward, innermost last
        self.entries: dict[int, _Module] = {}
        self.prefetcher = Prefetcher([s for g in parts.groups for s in g.sharded], parts.group, self._release,
                                     settings)
        for s in self.prefetcher.shards:
            s.on_access = self.on_access
        # [Note: hooks on every module] Modules without parameters get hooks too, so the innermost
        # running module is known exactly when a forward touches a parameter another module owns.
        for name, m in module.named_modules():
            entry = _Module(name or f"<root {type(m).__name__}>", parts.shards_of(m.parameters(recurse=False)))
            self.entries[id(m)] = entry
            for p in m.__dict__.get("_ds_external_params", {}).values():
                self.register_external(m, getattr(p, "ds_shard", None))
            self.handles.append(m.register_forward_pre_hook(lambda mod, args, e=entry: self.acquire(e)))
            self.handles.append(m.register_forward_hook(lambda mod, args, out: self.drop(), always_call=True))
        self.handles.append(module.register_forward_pre_hook(self._enter, prepend=True))
        self.handles.append(module.register_forward_hook(self._exit, always_call=True))

    def register_external(self, module: torch.nn.Module, s: ShardedParameter | None) -> None:
        """Gather ``s`` with ``module``'s own parameters from now on (a no-op for a module or parameter
        this coordinator does not manage, or one already registered)."""
        entry = self.entries.get(id(module))
        if entry is not None and s is not None and s.owner is self.parts and s not in entry.shards:
            entry.shards.append(s)

    def unregister_external(self, module: torch.nn.Module, s: ShardedParameter | None) -> None:
        entry = self.entries.get(id(module))
        own = set(map(id, module.parameters(recurse=False)))
        if entry is not None and s is not None and s in entry.shards and id(s.param) not in own:
            entry.shards.remove(s)

    def configure(self, settings: Stage3Settings) -> None:
        self.prefetcher.settings = settings

    # -- gather / release with use counts -------------------------------------------------------------
    def acquire(self, entry: _Module) -> None:
        """A module's forward starts: gather its shards not already whole, count one more user of each."""
        frame = _Frame(entry)
        self._frames.append(frame)
        if not frame.shards:
            return
        for s in frame.shards:
            s.users += 1
        self.prefetcher.fetch(entry.keys[0], [s for s in frame.shards if not s.persistent])
        for s in frame.shards:
            self.live[_ptr(s)] = s

    def drop(self) -> None:
        if not self._frames:
            return
        frame = self._frames.pop()
        for s in frame.shards:
            s.users -= 1
            self.release_if_unused(s)
        for s in frame.extra:
            s.users -= 1
            self.release_if_unused(s)

    def on_access(self, s: ShardedParameter) -> bool:
        """Model code touched released ``s`` (``released.py``): while a step runs, gather it now and
        register it as an external parameter of the innermost module running (so its forward gathers it
        from the next step on); outside modules (between forward and backward) keep it for backward.
        False when no step runs: the caller raises, naming ``s``."""
        if self.prefetcher.step is None or not self.handles:
            return False
        if self._frames:
            frame = self._frames[-1]
            entry = frame.entry
            if s not in entry.shards:
                entry.shards.append(s)
            frame.extra.append(s)
            s.users += 1
            key = entry.external_key(s)
        else:
            s.held_for_backward = True
            key = key_of(f"{s.name} (read outside any module's forward)")
        self.prefetcher.stats["on_access"] += 1
        self.prefetcher.fetch(key, [s])
        self.live[_ptr(s)] = s
        return True

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
        key = self._frames[-1].entry.keys[1] if self._frames else key_of(f"{s.name} (backward)")
        return _SavedRef(s, t, key)

    def _unpack(self, saved):
        if not isinstance(saved, _SavedRef):
            return saved
        s = saved.shard
        if not s.held_for_backward or not s.gathered:
            self.prefetcher.fetch(saved.key, [s])  # the first use of ``s`` in this backward
            self.live[_ptr(s)] = s
        s.held_for_backward = True
        data = raw_data(s.param)
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
        self._frames = []
