"""This rank's experts, named by their global index, each run once on its contiguous slice of tokens.

Experts live in an ``nn.ModuleDict`` keyed by the global expert id (``"0"``..``"E-1"``), so their
state-dict names do not depend on the expert-parallel size: a checkpoint saved with ``ep_size=2`` loads
with ``ep_size=1`` and back (ds-core's checkpoint layouts save tagged parameters per rank under their
module names and merge them on load). Expert parameters are tagged (``ds_core.params``) to reduce their
gradients over ``expert_data`` and to differ across ``expert``, which the engine and ZeRO read.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from ds_core.params import tag_params

__all__ = ["Experts", "EXPERT_REDUCE_AXIS", "EXPERT_SHARD_AXIS"]

EXPERT_REDUCE_AXIS = "expert_data"
EXPERT_SHARD_AXIS = "expert"


class Experts(nn.Module):
    """``num_local`` deep copies of ``expert`` holding global ids ``first .. first + num_local - 1``."""

    def __init__(self, expert: nn.Module, num_local: int, first: int) -> None:
        super().__init__()
        self.ids = list(range(first, first + num_local))
        self.experts = nn.ModuleDict({str(i): copy.deepcopy(expert) for i in self.ids})
        tag_params(self.experts.parameters(), reduce_axis=EXPERT_REDUCE_AXIS, shard_axis=EXPERT_SHARD_AXIS)
        for p in self.experts.parameters():
            p.allreduce = False  # DeepSpeed's marker for expert parameters
            p.group_name = None  # set by the layer (``ep_size_{n}``)

    def forward(self, x: torch.Tensor, counts: list[int]) -> torch.Tensor:
        """``x`` holds ``counts[i]`` rows for local expert ``i``, in order. Every expert runs (even on
        zero rows) so every rank produces a gradient for every expert parameter."""
        outs = [e(chunk) for e, chunk in zip(self.experts.values(), torch.split(x, counts))]
        return torch.cat(outs) if outs else x
