"""The tensor-parallel group and the collectives of Megatron-LM's layers, as autograd functions.

Shoeybi et al. 2019 ("Megatron-LM", section 3) name two conjugate operators around a parallel MLP or
attention block: ``f`` is the identity in forward and an all-reduce in backward (it sits where a
replicated activation enters column-parallel layers), ``g`` is an all-reduce in forward and the
identity in backward (it sits where row-parallel partial sums leave). The gather and scatter pairs
below move between a replicated tensor and one split along its last dimension.

Every collective goes through ``ds_core.comm`` so the comms logger counts it. A group of size one
makes each function the identity, so the same layers run unsharded in one process.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from ds_core import comm
from ds_core.errors import CommError

__all__ = [
    "model_topology",
    "TensorGroup",
    "tensor_group",
    "copy_to_group",
    "reduce_from_group",
    "gather_from_group",
    "scatter_to_group",
]


@dataclass(frozen=True)
class TensorGroup:
    """A process group with its size and this process's rank in it.

    ``TensorGroup(size=2, rank=1)`` without a process group describes a shard offline: layers and
    plans can be built and loaded with it (to inspect or save one rank's shard), but a forward pass
    that needs a collective raises. ``TensorGroup.of(group)`` wraps a real ``ProcessGroup``.
    """

    size: int = 1
    rank: int = 0
    group: Any = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        if not isinstance(self.size, int) or self.size < 1 or not 0 <= self.rank < self.size:
            raise CommError(f"TensorGroup(size={self.size!r}, rank={self.rank!r}): size must be a positive "
                            f"integer and 0 <= rank < size")

    @classmethod
    def of(cls, group=None) -> TensorGroup:
        """The group ``group`` (``None``: the whole world if a process group exists, else one process)."""
        if isinstance(group, TensorGroup):
            return group
        if not comm.is_initialized():
            if group is not None:
                raise CommError("a process group was given but torch.distributed is not initialized; "
                                "call ds_core.init_distributed() first")
            return cls()
        if group is None:
            group = dist.group.WORLD
        return cls(comm.get_world_size(group), comm.get_rank(group), group)

    @property
    def live(self) -> bool:
        """True when collectives can run (a real group of more than one process)."""
        return self.size > 1 and self.group is not None

    def require_live(self, what: str) -> None:
        if self.size > 1 and self.group is None:
            raise CommError(f"{what} needs the {self.size} ranks' process group, but this layer was built "
                            f"offline (TensorGroup without a group); build it with TensorGroup.of(group)")

    def __deepcopy__(self, memo):  # process groups cannot be copied; shards keep pointing at theirs
        return self

    def __reduce__(self):  # pickled shards (e.g. sent between processes) travel without the group
        return (TensorGroup, (self.size, self.rank))


def model_topology(model, *, tensor: int = 1, sequence: int = 1):
    """The ds-core topology ``model`` is built for, with at least these ``tensor``/``sequence`` sizes.

    The model's own (``model.ds_topology``, set by an earlier :func:`~ds_parallel.tensor_parallel` or
    :func:`~ds_parallel.sequence_parallel` call) when it already has them; else a new
    ``Topology(world, tensor=, sequence=)`` (keeping the other sizes of the model's), which is recorded as
    ``model.ds_topology`` so that ``ds_core.initialize`` builds the run on it. A size that disagrees with
    the model's is an error naming both.
    """
    have = getattr(model, "ds_topology", None)
    if have is not None:
        for axis, want in (("tensor", tensor), ("sequence", sequence)):
            if want > 1 and have.size(axis) not in (1, want):
                raise CommError(f"the model is built for {have!r} but {axis} size {want} is asked for; use one size")
        if (tensor <= 1 or have.size("tensor") == tensor) and (sequence <= 1 or have.size("sequence") == sequence):
            return have
    if not comm.is_initialized():
        raise CommError(f"tensor {tensor} × sequence {sequence} parallelism needs torch.distributed: call "
                        f"ds_core.init_distributed() and launch a multiple of {max(1, tensor) * max(1, sequence)} ranks")
    sizes = {"tensor": have.size("tensor") if have is not None else 1,
             "sequence": have.size("sequence") if have is not None else 1}
    sizes["tensor"], sizes["sequence"] = max(sizes["tensor"], tensor), max(sizes["sequence"], sequence)
    pipe = have.size("pipe") if have is not None else 1
    topology = comm.Topology(comm.get_world_size(), pipe=pipe, **sizes)
    model.ds_topology = topology
    return topology


def tensor_group(topology=None) -> TensorGroup:
    """The ``tensor`` axis of ``topology`` as a TensorGroup (one process without a topology)."""
    if topology is None or topology.size("tensor") == 1:
        return TensorGroup()
    if not comm.is_initialized():
        return TensorGroup(topology.size("tensor"), 0)
    return TensorGroup(topology.size("tensor"), topology.rank("tensor"), topology.group("tensor"))


# -- autograd functions -------------------------------------------------------------------------

def _all_reduce(x: torch.Tensor, tg: TensorGroup) -> torch.Tensor:
    tg.require_live("all-reduce")
    x = x.contiguous()
    comm.all_reduce(x, group=tg.group)
    return x


def _gather_last(x: torch.Tensor, tg: TensorGroup, sizes: tuple[int, ...] | None) -> torch.Tensor:
    """All-gather along the last dimension; ``sizes`` are every rank's widths when they differ."""
    tg.require_live("all-gather")
    width = max(sizes) if sizes else x.shape[-1]
    local = x.movedim(-1, 0)
    if local.shape[0] != width:  # pad the short shards to one width: all_gather needs equal pieces
        pad = local.new_zeros((width - local.shape[0], *local.shape[1:]))
        local = torch.cat([local, pad])
    local = local.contiguous()
    out = local.new_empty((tg.size * local.shape[0], *local.shape[1:]))
    comm.all_gather(out, local, group=tg.group)
    out = out.view(tg.size, *local.shape)
    if sizes:
        out = torch.cat([out[r, :sizes[r]] for r in range(tg.size)])
    else:
        out = out.flatten(0, 1)
    return out.movedim(0, -1).contiguous()


def _split_last(x: torch.Tensor, tg: TensorGroup, sizes: tuple[int, ...] | None) -> torch.Tensor:
    if sizes:
        start = sum(sizes[:tg.rank])
        return x[..., start:start + sizes[tg.rank]].contiguous()
    width = x.shape[-1] // tg.size
    return x[..., tg.rank * width:(tg.rank + 1) * width].contiguous()


class _CopyToGroup(torch.autograd.Function):
    """Megatron's ``f``: identity forward, all-reduce of the gradient backward."""

    @staticmethod
    def forward(ctx, x, tg):
        ctx.tg = tg
        return x

    @staticmethod
    def backward(ctx, grad):
        return _all_reduce(grad, ctx.tg), None


class _ReduceFromGroup(torch.autograd.Function):
    """Megatron's ``g``: all-reduce forward, identity backward."""

    @staticmethod
    def forward(ctx, x, tg, inplace):
        if inplace and x.is_contiguous():
            ctx.mark_dirty(x)
            return _all_reduce(x, tg)
        return _all_reduce(x.clone(), tg)

    @staticmethod
    def backward(ctx, grad):
        return grad, None, None


class _GatherFromGroup(torch.autograd.Function):
    """All-gather the last dimension forward; keep this rank's slice of the gradient backward."""

    @staticmethod
    def forward(ctx, x, tg, sizes):
        ctx.tg, ctx.sizes = tg, sizes
        return _gather_last(x, tg, sizes)

    @staticmethod
    def backward(ctx, grad):
        return _split_last(grad, ctx.tg, ctx.sizes), None, None


class _ScatterToGroup(torch.autograd.Function):
    """Keep this rank's slice of the last dimension forward; all-gather the gradient backward."""

    @staticmethod
    def forward(ctx, x, tg, sizes):
        ctx.tg, ctx.sizes = tg, sizes
        return _split_last(x, tg, sizes)

    @staticmethod
    def backward(ctx, grad):
        return _gather_last(grad, ctx.tg, ctx.sizes), None, None


def copy_to_group(x: torch.Tensor, group: TensorGroup) -> torch.Tensor:
    """``f``: a replicated activation entering column-parallel layers (its gradient is summed)."""
    return x if group.size == 1 else _CopyToGroup.apply(x, group)


def reduce_from_group(x: torch.Tensor, group: TensorGroup, inplace: bool = False) -> torch.Tensor:
    """``g``: sum the partial results of row-parallel layers over the group.

    ``inplace=True`` reuses ``x``'s memory; only for a tensor nothing else holds (a fresh matmul output).
    """
    return x if group.size == 1 else _ReduceFromGroup.apply(x, group, inplace)


def gather_from_group(x: torch.Tensor, group: TensorGroup, sizes: tuple[int, ...] | None = None) -> torch.Tensor:
    """Concatenate every rank's last dimension (``sizes``: each rank's width when they differ)."""
    return x if group.size == 1 else _GatherFromGroup.apply(x, group, tuple(sizes) if sizes else None)


def scatter_to_group(x: torch.Tensor, group: TensorGroup, sizes: tuple[int, ...] | None = None) -> torch.Tensor:
    """This rank's slice of a replicated tensor's last dimension."""
    return x if group.size == 1 else _ScatterToGroup.apply(x, group, tuple(sizes) if sizes else None)
