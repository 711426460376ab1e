"""Everything ds-parallel tells ds-core's training seam, in one place.

Today's seam reads parameter tags (``ds_core.params``): a parameter tagged ``shard_axis="tensor"``
has its squared norm summed over the tensor axis for gradient clipping and is checkpointed per
rank; gradients are averaged over the data axis. The engine-side pieces (the ``tensor_parallel``
config section, the ``model_wrapper`` component, checkpoints) live in :mod:`ds_parallel.training`.
"""

from __future__ import annotations

import torch

from ds_core.params import tag_params

__all__ = ["tag_tensor_sharded"]


def tag_tensor_sharded(param: torch.Tensor, group) -> None:
    """Tell the engine ``param`` differs across the tensor axis (and reduces over data as usual)."""
    if group.size > 1:
        tag_params([param], reduce_axis="data", shard_axis="tensor")
