"""Named parallel axes on a ``DeviceMesh``: ``pipe``, ``data``, ``expert``, ``sequence``, ``tensor``.

Rank layout, outermost to innermost: pipe, data, sequence, tensor. Expert parallelism splits the data
axis: ``data = expert_data × expert``, experts on consecutive data ranks (as DeepSpeed-MoE lays them
out), so expert all-to-alls stay close and expert gradients reduce over ``expert_data`` only.
The sizes are checked when the object is built, before any process group exists; the mesh itself is
created on first use.
"""

from __future__ import annotations

import math
from functools import cached_property

from ..errors import CommError

__all__ = ["Topology", "AXES", "get_topology", "set_topology", "ensure_topology"]

AXES = ("pipe", "data", "expert", "sequence", "tensor")
_MESH_DIMS = ("pipe", "expert_data", "expert", "sequence", "tensor")


class Topology:
    """Sizes of each parallel axis and the process groups for them.

    ``data=-1`` (the default) takes whatever the other axes leave of the world.
    """

    def __init__(self, world_size: int, pipe: int = 1, data: int = -1, expert: int = 1,
                 sequence: int = 1, tensor: int = 1, device_type: str = "cpu") -> None:
        for name, size in (("pipe", pipe), ("expert", expert), ("sequence", sequence),
                           ("tensor", tensor)):
            if not isinstance(size, int) or size < 1:
                raise CommError(f"topology axis {name}={size!r} must be a positive integer")
        others = pipe * sequence * tensor
        if data == -1:
            if world_size % others:
                raise CommError(
                    f"world size {world_size} is not divisible by pipe {pipe} × sequence {sequence} "
                    f"× tensor {tensor} = {others}; change the axis sizes or the number of ranks"
                )
            data = world_size // others
        if data * others != world_size:
            raise CommError(
                f"pipe {pipe} × data {data} × sequence {sequence} × tensor {tensor} = "
                f"{data * others} != world size {world_size}; make the product equal the ranks "
                f"launched or leave data=-1"
            )
        if data % expert:
            raise CommError(
                f"expert axis {expert} must divide the data axis {data} (experts are carved out "
                f"of data-parallel ranks); pick an expert size that divides {data}"
            )
        self.world_size = world_size
        self.device_type = device_type
        self.sizes = {"pipe": pipe, "data": data, "expert": expert, "sequence": sequence,
                      "tensor": tensor, "expert_data": data // expert}

    def size(self, axis: str) -> int:
        self._check_axis(axis)
        return self.sizes[axis]

    def _check_axis(self, axis: str) -> None:
        if axis not in self.sizes:
            raise CommError(f"unknown topology axis {axis!r}; axes are {', '.join(self.sizes)}")

    @cached_property
    def mesh(self):
        """The DeviceMesh (dims pipe, expert_data, expert, sequence, tensor, plus flattened data)."""
        from torch.distributed.device_mesh import init_device_mesh

        shape = tuple(self.sizes[d] for d in _MESH_DIMS)
        mesh = init_device_mesh(self.device_type, shape, mesh_dim_names=_MESH_DIMS)
        # keep the flattened data mesh ourselves: slicing it back out of the root mesh is deprecated
        self._data_mesh = mesh["expert_data", "expert"]._flatten("data")
        return mesh

    def _axis_mesh(self, axis: str):
        mesh = self.mesh
        return self._data_mesh if axis == "data" else mesh[axis]

    def group(self, axis: str):
        """The process group of this rank along ``axis``."""
        self._check_axis(axis)
        return self._axis_mesh(axis).get_group()

    def rank(self, axis: str) -> int:
        """This rank's coordinate along ``axis``."""
        self._check_axis(axis)
        return self._axis_mesh(axis).get_local_rank()

    def coordinates(self, global_rank: int) -> dict[str, int]:
        """Coordinates of any global rank, computed arithmetically (no process group needed)."""
        coords: dict[str, int] = {}
        rest = global_rank
        for dim in reversed(_MESH_DIMS):
            coords[dim] = rest % self.sizes[dim]
            rest //= self.sizes[dim]
        coords["data"] = coords["expert_data"] * self.sizes["expert"] + coords["expert"]
        return coords

    def ranks_along(self, axis: str, global_rank: int) -> list[int]:
        """Global ranks that share every coordinate with ``global_rank`` except ``axis``."""
        self._check_axis(axis)
        mine = self.coordinates(global_rank)
        keep = {"data": ("expert_data", "expert")}.get(axis, (axis,))
        return [r for r in range(self.world_size)
                if all(self.coordinates(r)[d] == mine[d] for d in _MESH_DIMS if d not in keep)]

    def __repr__(self) -> str:
        axes = " × ".join(f"{a}={self.sizes[a]}" for a in AXES)
        return f"Topology({axes}; world={self.world_size})"

    @property
    def product(self) -> int:
        return math.prod(self.sizes[d] for d in _MESH_DIMS)


_current: Topology | None = None


def get_topology() -> Topology | None:
    """The process-wide topology set by ``initialize`` or a feature (``None`` before either)."""
    return _current


def set_topology(topology: Topology | None) -> None:
    global _current
    _current = topology


def ensure_topology(**sizes: int) -> Topology:
    """The current topology, created from ``sizes`` over the whole world if none exists yet.

    Features that need an axis (an MoE layer needs ``expert``) call this when they are built; a
    conflicting request (``expert=2`` when the current topology has ``expert=4``) is an error.
    """
    from .collectives import get_world_size

    global _current
    if _current is None:
        _current = Topology(get_world_size(), **sizes)
        return _current
    for axis, size in sizes.items():
        if axis != "data" and _current.size(axis) != size:
            raise CommError(
                f"{axis}={size} was requested but the current topology has {axis}="
                f"{_current.size(axis)} ({_current!r}); use one size per run or build the model "
                f"before calling initialize with another topology")
    return _current
