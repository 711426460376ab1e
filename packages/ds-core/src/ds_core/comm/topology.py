"""Named parallel axes on a ``DeviceMesh``: ``pipe``, ``data``, ``expert``, ``sequence``, ``tensor``.

Rank layout, outermost to innermost: pipe, data, sequence, tensor. Expert parallelism splits the data
axis: ``data = expert_data × expert``, experts on consecutive data ranks (as DeepSpeed-MoE lays them
out), so expert all-to-alls stay close and expert gradients reduce over ``expert_data`` only.
The sizes are checked when the object is built, before any process group exists; the mesh itself is
created on first use.

There is no process-wide "current" topology: ``ds_core.initialize(..., topology=)`` takes one (or
builds the default from what the model's layers ask for, see ``ds_core.engine.initialize``) and hands
it to every component; layers that need an axis (``ds_moe.MoE(..., topology=)``) take it explicitly.
"""

from __future__ import annotations

import math
from functools import cached_property

from ..errors import CommError

__all__ = ["Topology", "AXES"]

AXES = ("pipe", "data", "expert", "sequence", "tensor")
_MESHES: dict[tuple, tuple] = {}  # (device type, shape) -> (default group, mesh, data mesh): see Topology.mesh
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
        """The DeviceMesh (dims pipe, expert_data, expert, sequence, tensor, plus flattened data).

        [Note: shared meshes] Every process group costs memory and set-up time, so topologies of the
        same shape over the same default process group share one mesh (and its groups): an engine
        built after another reuses them. This memo holds communicators, not a "current topology":
        each component still gets its topology explicitly.
        """
        import torch.distributed as dist
        from torch.distributed.device_mesh import init_device_mesh

        shape = tuple(self.sizes[d] for d in _MESH_DIMS)
        default = dist.distributed_c10d._get_default_group()
        key = (self.device_type, shape)
        cached = _MESHES.get(key)
        if cached is not None and cached[0] is default:
            mesh, self._data_mesh = cached[1], cached[2]
            return mesh
        mesh = init_device_mesh(self.device_type, shape, mesh_dim_names=_MESH_DIMS)
        # keep the flattened data mesh ourselves: slicing it back out of the root mesh is deprecated
        self._data_mesh = mesh["expert_data", "expert"]._flatten("data")
        _MESHES[key] = (default, mesh, self._data_mesh)
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

    def same_layout(self, other: Topology) -> bool:
        """True when ``other`` has the same world size and axis sizes (its groups may differ)."""
        return self.world_size == other.world_size and self.sizes == other.sizes

    def check_world(self, world_size: int, where: str = "initialize") -> None:
        """Raise unless this topology covers exactly ``world_size`` ranks (checked before any group exists)."""
        if self.world_size != world_size:
            raise CommError(f"{where}: the topology {self!r} covers {self.world_size} ranks but {world_size} "
                            f"are running; build it with Topology({world_size}, ...) so its axes multiply to "
                            f"the number of ranks launched")

    def outer_axes(self) -> list[str]:
        """Axes outside the data axis with more than one rank (``pipe``, ``sequence``, ``tensor``)."""
        return [a for a in ("pipe", "sequence", "tensor") if self.sizes[a] > 1]

    def scope(self, global_rank: int) -> str:
        """A file-name prefix naming ``global_rank``'s coordinates on the outer axes (``"pp1_tp0_"``;
        ``""`` when there are none): ranks of one scope hold the same model shard and differ only
        along ``data``, so checkpoint files of a scope are written once per data replica set."""
        coords = self.coordinates(global_rank)
        short = {"pipe": "pp", "sequence": "sp", "tensor": "tp"}
        return "".join(f"{short[a]}{coords[a]}_" for a in self.outer_axes())

    def __repr__(self) -> str:
        axes = " × ".join(f"{a}={self.sizes[a]}" for a in AXES)
        return f"Topology({axes}; world={self.world_size})"

    @property
    def product(self) -> int:
        return math.prod(self.sizes[d] for d in _MESH_DIMS)
