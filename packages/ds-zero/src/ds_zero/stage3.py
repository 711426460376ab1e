"""The stage-3 layout: every parameter split into N equal shards, one kept per rank.

ZeRO stage 3 (P_os+g+p, Rajbhandari et al. 2020, section 5.3) partitions the parameters themselves:
each rank keeps 1/N of every parameter and the full tensor exists only while the module that uses it
runs (``gather.py`` does the gathering). Unlike stages 1 and 2, where a group's parameters are laid
end to end and split once, here each parameter is flattened, padded to a multiple of N and split on
its own, as DeepSpeed does: rank r keeps elements ``[r·P, (r+1)·P)`` of it, so gathering one
parameter is one all-gather of equal pieces and needs no other parameter.

A rank's shards of one parameter group are laid end to end in one flat tensor (:meth:`Stage3Group.own`),
which is what the optimizer steps (``optimizer.py``'s :class:`ZeroOptimizer` works on it exactly as
on a stage-1/2 partition), so the group's hyper-parameters apply to every element.

While a parameter is released its ``data`` is a *placeholder*: one NaN expanded to the full shape
(no memory, ``param.shape`` still right; writing into it fails). Model code never computes with it:
every partitioned parameter is a :class:`~ds_zero.released.ZeroParameter`, which gathers it where
that is safe or raises naming it (``released.py``). Parameters of at most
``stage3_param_persistence_threshold`` elements stay whole on every rank (they are cheap to keep and
costly to gather one by one); their optimizer state is still partitioned and they are re-gathered
after every step.

With ``offload_param.device: nvme`` (ZeRO-Infinity) a group keeps no flat tensor: its shards live in
one swap file (``swap_params.py``) and ``ShardedParameter.shard`` reads a shard in (or waits for the
read :meth:`ShardedParameter.prefetch` started) when it is used; at most ``buffer_count`` shards
are in memory at once.
"""

from __future__ import annotations

import weakref

import torch

from ds_core import comm
from ds_core.errors import ConfigError
from ds_core.params import DEFAULT_AXIS, reduce_axis, shard_axis

from .partition import check_param_groups, padded_numel
from .released import make_zero_parameter, placeholder, raw_data, set_raw_data, settle
from .swap_params import ShardSwapper

__all__ = ["ShardedParameter", "Stage3Group", "Stage3Partitions", "placeholder", "gather_shards"]


class ShardedParameter:
    """One parameter's shard on this rank, and whether (and by how many users) it is gathered.

    ``source`` is the shard :class:`~ds_zero.init_context.Init` made while the model was built: its
    values are taken over (cast to ``shard``'s dtype) instead of reading the parameter's data.
    ``swap`` (a :class:`~ds_zero.swap_params.ShardSwapper`), ``swap_file`` and ``swap_offset``: the
    shard lives at that element offset of that NVMe file; ``shard`` is then read in on use.
    """

    def __init__(self, param: torch.nn.Parameter, name: str, world: int, rank: int, shard: torch.Tensor,
                 persistent: bool, group=None, owner=None, source: ShardedParameter | None = None,
                 swap: ShardSwapper | None = None, swap_file: str | None = None, swap_offset: int = 0) -> None:
        self.param, self.name = param, name
        self.shape = source.shape if source is not None else param.shape
        self.numel = source.numel if source is not None else param.numel()
        self.padded = padded_numel(self.numel, world)
        self.part = self.padded // world
        self.world, self.rank, self.group, self.owner = world, rank, group, owner
        self.swap, self.swap_file, self.swap_offset = swap, swap_file, swap_offset
        self._data: torch.Tensor | None = shard  # in memory (with swap: only around its use)
        self._read = None   # a swap-in in flight (prefetch)
        self._clean = None  # _data._version when it last matched the file
        self.dtype = shard.dtype
        self.device = param.device  # where the gathered tensor lives; the shard may be in host memory
        self.persistent = persistent
        self.users = 0          # forward modules / GatheredParameters contexts holding it gathered
        self.held_for_backward = False
        self.gathered = source is None or source.gathered  # full data present in ``param.data``
        with torch.no_grad():
            if source is not None:
                if getattr(source, "borrow_base", None) is not None:
                    settle(source)  # a model change made while it was gathered on access reaches its shard
                if source.world != world:
                    raise ConfigError(f"parameter {name} was partitioned by ds_zero.Init over {source.world} "
                                      f"ranks but the engine's data-parallel group has {world}; pass the same "
                                      f"group to Init (data_parallel_group=...)")
                shard.copy_(source.shard)
                if source.gathered:
                    set_raw_data(param, raw_data(param).to(shard.dtype))
                else:
                    set_raw_data(param, placeholder(self.shape, shard.dtype, self.device))
            else:
                flat = param.detach().reshape(-1)
                lo = min(self.numel, rank * self.part)
                hi = min(self.numel, lo + self.part)
                shard.zero_()
                shard[:hi - lo].copy_(flat[lo:hi])
        param.ds_shard = self
        make_zero_parameter(param)

    @property
    def shard(self) -> torch.Tensor:
        """This rank's piece of the flattened, padded parameter (``part`` elements), always valid: with
        NVMe offload it is read in here (or a pending :meth:`prefetch` is waited for). Writing into it
        is allowed; an NVMe shard changed so is written back before its memory is reused."""
        if self.swap is None:
            return self._data
        return self.swap.load(self)

    @shard.setter
    def shard(self, value: torch.Tensor) -> None:
        if self.swap is not None:
            raise AttributeError(f"the shard of {self.name} lives on NVMe; write into param.ds_shard.shard "
                                 f"in place instead of replacing it")
        self._data = value

    def prefetch(self) -> None:
        """Start reading the shard from NVMe ahead of its use; a no-op when it is in memory (or not on NVMe)."""
        if self.swap is not None:
            self.swap.prefetch(self)

    def release(self) -> None:
        """Drop the full tensor (persistent parameters stay whole). An NVMe shard stays in memory only
        as one of the ``buffer_count`` most recently used (its file is authoritative)."""
        if self.persistent or not self.gathered:
            return
        set_raw_data(self.param, placeholder(self.shape, self.dtype, self.device))
        self.gathered = False


def gather_shards(items: list[ShardedParameter], group, tag: str | None = None) -> None:
    """All-gather the full tensors of ``items`` in one collective (every rank passes the same list).

    Items whose prefetch is still in flight are completed instead of gathered again. The collective
    carries a fingerprint (``fingerprint.py``: ``tag`` or the parameter names), so ranks that pair
    different gathers fail with both names instead of exchanging the wrong parameters.
    """
    from .allgather import PendingGather, plain_fingerprint

    completed: set[int] = set()
    for s in items:
        pending = getattr(s, "inflight", None)
        if pending is not None:
            pending.wait()
            completed.update(id(x) for x in pending.items)
    items = [s for s in items if id(s) not in completed]
    if items:
        PendingGather(items, group, plain_fingerprint(items, tag)).wait()


class Stage3Group:
    """One parameter group's shards on this rank: the flat tensor the optimizer steps (``own()``).

    Offers what :class:`~ds_zero.optimizer.ZeroOptimizer` and the checkpoint layout use of a
    stage-1/2 :class:`~ds_zero.partition.GroupPartition` (``own``, ``partition_numel``, ``hyper``,
    ``axis``, ``describe``...).
    """

    axis, shard, source = DEFAULT_AXIS, None, 0

    def __init__(self, params: list[torch.nn.Parameter], names: list[str], hyper: dict, world: int,
                 rank: int, dtype: torch.dtype, device: torch.device, threshold: int, group, owner=None,
                 pin: bool = False, swap: ShardSwapper | None = None) -> None:
        self.params, self.names, self.hyper = list(params), list(names), hyper
        self.world, self.rank, self.group = world, rank, group
        sources = [getattr(p, "ds_shard", None) for p in self.params]
        numels = [s.numel if s is not None else p.numel() for p, s in zip(self.params, sources)]
        parts = [padded_numel(n, world) // world for n in numels]
        self.offsets = [sum(parts[:i]) for i in range(len(parts))]
        self.partition_numel = max(1, sum(parts))
        self.numel = sum(numels)
        self.padded = self.partition_numel * world
        self.dtype, self.swap, self._own = dtype, swap, None
        if swap is None:
            self.flat = torch.zeros(self.partition_numel, dtype=dtype, device=device)
            self.sharded = [ShardedParameter(p, n, world, rank, self.flat[o:o + k], m <= threshold, group, owner,
                                             src)
                            for p, n, o, k, m, src in zip(self.params, self.names, self.offsets, parts, numels,
                                                          sources)]
        else:
            self.flat = torch.zeros(0, dtype=dtype, device=device)  # nothing resident: the file holds the shards
            self.swap_file = swap.add_group(self.partition_numel, dtype)
            self.sharded = self._swap_out_shards(swap, world, rank, threshold, group, owner, parts, numels, sources)
        if any(s.persistent and not s.gathered for s in self.sharded):
            gather_shards([s for s in self.sharded if s.persistent and not s.gathered], group)
        for s in self.sharded:
            s.release()

    def _swap_out_shards(self, swap, world, rank, threshold, group, owner, parts, numels, sources):
        """Build each shard in memory and write it to the group's file, at most ``buffer_count`` at once."""
        out, in_flight = [], []
        tail = sum(parts)
        if tail < self.partition_numel:  # an empty group's one padding element
            in_flight.append((None, swap.write_range(self.swap_file, torch.zeros(self.partition_numel - tail,
                                                                                 dtype=self.dtype), tail)))
        for p, n, o, k, m, src in zip(self.params, self.names, self.offsets, parts, numels, sources):
            s = ShardedParameter(p, n, world, rank, torch.zeros(k, dtype=self.dtype), m <= threshold, group, owner,
                                 src, swap=swap, swap_file=self.swap_file, swap_offset=o)
            swap.check(s)
            out.append(s)
            in_flight.append((s, swap.write_out(s)))
            while len(in_flight) >= swap.count:
                self._confirm(*in_flight.pop(0))
        for item in in_flight:
            self._confirm(*item)
        return out

    @staticmethod
    def _confirm(s, handle) -> None:
        handle.wait()  # the in-memory shard is dropped only once its write is confirmed
        if s is not None:
            s._data = None

    def own(self) -> torch.Tensor:
        """This rank's shards of every parameter of the group, end to end (a view: the optimizer
        stepping it updates what the next gather returns). With NVMe shards: a copy read from the
        file and kept until :meth:`flush_own` (run by ``Stage3Partitions.all_gather`` and before
        the step), which writes it back if it was changed."""
        if self.swap is None:
            return self.flat
        if self._own is None:
            t = self.read_own()
            self._own = (t, t._version)
        return self._own[0]

    def read_own(self) -> torch.Tensor:
        """This rank's shards, end to end, in a new tensor (with NVMe shards: changes flushed, file read)."""
        if self.swap is None:
            return self.flat.clone()
        self.swap.flush(self.sharded)
        out = torch.empty(self.partition_numel, dtype=self.dtype)
        self.swap.read_range(self.swap_file, out).wait()
        return out

    def flush_own(self) -> None:
        """Write back a copy :meth:`own` handed out if it was changed (its shards in memory are stale then)."""
        if self._own is None:
            return
        (t, version), self._own = self._own, None
        if t._version != version:
            for s in self.sharded:
                self.swap.evict(s)
            self.swap.write_range(self.swap_file, t).wait()

    def write_range(self, lo: int, values: torch.Tensor):
        """Start writing ``values`` (cast to the model's dtype) at element ``lo`` of the shard file;
        returns the handle (keep ``values`` until it is waited)."""
        v = values.detach().to(self.dtype).contiguous()
        return self.swap.write_range(self.swap_file, v, lo)

    def describe(self) -> dict:
        return {"layout": "per_parameter", "numel": self.numel, "partition_numel": self.partition_numel,
                "padded": self.padded,
                "params": [{"name": s.name, "shape": list(s.shape), "offset": o, "part": s.part}
                           for s, o in zip(self.sharded, self.offsets)]}


class Stage3Partitions:
    """Every trainable parameter sharded over the data-parallel group (see the module docstring)."""

    def __init__(self, groups: list[dict], module: torch.nn.Module, group, dtype: torch.dtype,
                 device: torch.device, threshold: int, shard_device: torch.device | None = None,
                 pin: bool = False, swap: ShardSwapper | None = None) -> None:
        self.group = group
        self.axis_groups = {DEFAULT_AXIS: group}
        self.world = comm.get_world_size(group)
        self.rank = comm.get_rank(group)
        names = check_param_groups(module, groups)
        for spec in groups:
            for p in spec["params"]:
                if reduce_axis(p) not in (None, DEFAULT_AXIS) or shard_axis(p) is not None:
                    raise ConfigError(f"parameter {names[id(p)]} is tagged with axis {reduce_axis(p)!r}: ZeRO "
                                      f"stage 3 partitions only data-parallel parameters (experts are not "
                                      f"supported at stage 3 yet); use stage 2 for this model")
        self.groups = [Stage3Group(spec["params"], [names[id(p)] for p in spec["params"]],
                                   {k: v for k, v in spec.items() if k != "params"}, self.world, self.rank,
                                   dtype, shard_device or device, threshold, group, self, pin, swap)
                       for spec in groups]
        self.swap = swap
        self.by_param = {id(s.param): s for g in self.groups for s in g.sharded}
        self._optimizer = None  # set by the optimizer factory: GatheredParameters refreshes its masters
        self.coordinator = None

    tagged = False

    @property
    def optimizer(self):
        """The optimizer stepping these shards, or None. Held weakly: the model's parameters reach this
        object (``param.ds_shard.owner``) and must not keep a dropped engine's optimizer alive."""
        return self._optimizer() if self._optimizer is not None else None

    @optimizer.setter
    def optimizer(self, opt) -> None:
        self._optimizer = weakref.ref(opt) if opt is not None else None

    def global_rank(self, r: int) -> int:
        return r if self.group is None else torch.distributed.get_global_rank(self.group, r)

    def shards_of(self, params) -> list[ShardedParameter]:
        """The :class:`ShardedParameter` of each managed parameter in ``params`` (others skipped)."""
        out, seen = [], set()
        for p in params:
            s = self.by_param.get(id(p))
            if s is not None and id(p) not in seen:
                seen.add(id(p))
                out.append(s)
        return out

    def begin_update(self) -> None:
        """Before the optimizer writes new shards: with NVMe shards, write back changes made in memory
        and drop every in-memory copy (the step makes them stale)."""
        if self.swap is not None:
            for g in self.groups:
                g.flush_own()
            self.swap.drop_all()

    def all_gather(self, bucket_numel: int) -> None:
        """After the step: refresh the parameters that are whole (persistent ones, or any a context
        holds) from the updated shards; released ones are gathered fresh when next used."""
        if self.swap is not None:
            for g in self.groups:
                g.flush_own()
        for g in self.groups:
            live = [s for s in g.sharded if s.gathered]
            for i in range(0, len(live), 64):
                gather_shards(live[i:i + 64], self.group)

    def describe(self) -> dict:
        return {"world_size": self.world, "layout": "per_parameter", "groups": [g.describe() for g in self.groups]}

    def close(self) -> None:
        """Remove the NVMe shard files (nothing without NVMe offload); the model is unusable afterwards."""
        if self.swap is not None:
            self.swap.close()
