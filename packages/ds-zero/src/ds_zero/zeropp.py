"""ZeRO++'s stage-3 options (Wang et al. 2023, "ZeRO++: Extremely Efficient Collective Communication
for Giant Model Training"): which gathers and reductions they change, and the secondary groups of hpZ.

- ``zero_quantized_weights`` (qwZ, section 3.1): the prefetcher's parameter all-gathers carry
  block-quantized int8 (``allgather.py``, ``quantize.py``); gathers that must be exact (checkpoints,
  ``GatheredParameters``, persistent parameters) are not quantized.
- ``zero_hpz_partition_size`` k (hpZ, section 3.2): a forward gather leaves each rank 1/k of every
  gathered parameter (its *secondary shard*), split over a group of k consecutive data-parallel ranks
  (one node, typically); the re-gathers of backward then run within that group only. The secondary
  shards live from the forward gather until the step's backward ends (``prefetch.py``).
- ``zero_quantized_gradients`` (qgZ, section 3.3): each gradient's reduce-scatter becomes an
  all-to-all of int4-quantized chunks, each rank dequantizing and summing its own chunk in fp32
  (``reduce3.py``). With hpZ on too, its groups are taken as the nodes and the all-to-all is the
  paper's hierarchical one: within the node first, then across nodes with 1/k of the flat bytes.
"""

from __future__ import annotations

import torch

from ds_core import comm
from ds_core.errors import ConfigError

__all__ = ["SecondaryPartition", "secondary_partition", "NodeGroups", "node_groups"]


class SecondaryPartition:
    """hpZ's group of ``size`` consecutive data-parallel ranks this rank belongs to, and its place in it."""

    def __init__(self, group, size: int, rank: int) -> None:
        self.group, self.size, self.rank = group, size, rank

    def slice(self, padded: torch.Tensor) -> torch.Tensor:
        """This rank's secondary shard of a gathered, padded, flattened parameter (a view)."""
        part = padded.numel() // self.size
        return padded[self.rank * part:(self.rank + 1) * part]


def secondary_partition(size: int, data_group) -> SecondaryPartition | None:
    """Build the hpZ groups (every rank of ``data_group`` calls this, in the same order); None when off.

    The data-parallel ranks ``[i·k, (i+1)·k)`` form group i: with ranks placed node by node, each group is
    one node and the backward gathers stay on its fast links.
    """
    world = comm.get_world_size(data_group)
    if size in (0, 1) or world == 1:
        return None
    if size < 0 or world % size:
        raise ConfigError(f"zero_optimization.zero_hpz_partition_size {size} does not divide the "
                          f"data-parallel world size {world}: hpZ splits the ranks into groups of that many "
                          f"consecutive ranks; set it to a divisor of {world} (e.g. the GPUs per node), or 1 "
                          f"to turn hpZ off")
    if size == world:
        return None  # one group of everyone: the primary partition already is that
    rank = comm.get_rank(data_group)
    mine = None
    for first in range(0, world, size):
        ranks = [comm.global_rank(data_group, r) for r in range(first, first + size)]
        group = comm.new_group(ranks)
        if first <= rank < first + size:
            mine = group
    return SecondaryPartition(mine, size, rank % size)



class NodeGroups:
    """Hierarchical qgZ's groups: ``intra`` (this rank's node: ``size`` consecutive ranks) and ``inter``
    (the ``count`` ranks with this rank's local index, one per node, in node order)."""

    def __init__(self, intra, inter, size: int, count: int) -> None:
        self.intra, self.inter, self.size, self.count = intra, inter, size, count


def node_groups(hpz: SecondaryPartition | None, data_group) -> NodeGroups | None:
    """The nodes of hierarchical qgZ: hpZ's groups and the groups across them (every rank of
    ``data_group`` calls this, in the same order); None without hpZ (qgZ is then one all-to-all)."""
    if hpz is None:
        return None
    world = comm.get_world_size(data_group)
    size = hpz.size
    inter = None
    for j in range(size):
        group = comm.new_group([comm.global_rank(data_group, r) for r in range(j, world, size)])
        if j == hpz.rank:
            inter = group
    return NodeGroups(hpz.group, inter, size, world // size)
