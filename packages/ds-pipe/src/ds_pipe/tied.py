"""Tied weights across stages: one process group per tie, initial broadcast, gradient sum.

A tied module (``TiedLayerSpec`` key) lives on every stage that uses it; its copies start from the
first owner's values and receive the sum of every copy's gradient each step, so they take identical
optimizer steps and stay identical — the scheme of Megatron-LM's shared embeddings (Shoeybi et al.
2019, section 3) and DeepSpeed's tied modules. Each data-parallel column has its own group, since
the data-parallel average is taken separately (``ReduceGrads``).
"""

from __future__ import annotations

import torch

from ds_core import comm

__all__ = ["TiedWeights"]


class TiedWeights:
    def __init__(self, module, topology) -> None:
        self.module = module
        self.groups: dict[str, object] = {}
        multi = comm.is_initialized() and comm.get_world_size() > 1
        rank = comm.get_rank() if multi else 0
        columns = [topology.ranks_along("pipe", r) for r in range(topology.world_size)
                   if topology.coordinates(r)["pipe"] == 0]
        for key in sorted(module.tied_indices):
            owners = module.tie_owners(key)
            if len(owners) < 2 or not multi:
                continue
            for column in columns:  # every rank creates every group, in the same order
                ranks = [column[s] for s in owners]
                group = comm.new_group(ranks)
                if rank in ranks:
                    self.groups[key] = (group, ranks[0])
        with torch.no_grad():
            for key, (group, first) in self.groups.items():
                for p in module.tied_parameters(key):
                    comm.broadcast(p.data, src=first, group=group)

    def duplicates(self) -> list[torch.nn.Parameter]:
        """Tied parameters this stage holds but does not own (first owner): counted once in norms."""
        out = []
        for key in self.module.tied_modules:
            if self.module.tie_owners(key)[0] != self.module.stage_id:
                out += self.module.tied_parameters(key)
        return out

    def reduce(self, strategy) -> None:
        """Sum the gradients of each tied parameter over its tie (``strategy``: a ``FullGradients``)."""
        for key, (group, _) in self.groups.items():
            views = [strategy.gradient_of(p) for p in self.module.tied_parameters(key)]
            flat = torch.cat([v.reshape(-1) for v in views])
            comm.all_reduce(flat, group=group)
            offset = 0
            for v in views:
                v.copy_(flat[offset:offset + v.numel()].view_as(v))
                offset += v.numel()
