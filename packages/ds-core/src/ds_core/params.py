"""Parameter tags: how a feature tells the engine (and ZeRO) that some parameters are special.

Expert parameters of a mixture-of-experts layer differ across the ``expert`` axis: each expert rank
holds different experts. Their gradients must be averaged only over ``expert_data`` (the ranks that
hold the same experts), their norm summed over ``expert``, and ZeRO must partition them within
``expert_data``. A feature tags such parameters; the engine and ZeRO read the tags. Untagged
parameters are replicated over the whole ``data`` axis.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

__all__ = ["tag_params", "reduce_axis", "shard_axis", "is_tagged", "DEFAULT_AXIS"]

DEFAULT_AXIS = "data"
_REDUCE = "ds_reduce_axis"
_SHARD = "ds_shard_axis"


def tag_params(params: Iterable[torch.Tensor], *, reduce_axis: str, shard_axis: str | None = None) -> None:
    """Mark parameters: gradients are averaged over ``reduce_axis``; they differ across ``shard_axis``."""
    from .comm.topology import AXES

    valid = set(AXES) | {"expert_data"}
    for axis in (reduce_axis, shard_axis):
        if axis is not None and axis not in valid:
            raise ValueError(f"axis {axis!r} is not a topology axis; use one of {sorted(valid)}")
    for p in params:
        setattr(p, _REDUCE, reduce_axis)
        setattr(p, _SHARD, shard_axis)


def reduce_axis(p: torch.Tensor) -> str:
    """The axis a parameter's gradient is averaged over (``data`` unless tagged)."""
    return getattr(p, _REDUCE, DEFAULT_AXIS)


def shard_axis(p: torch.Tensor) -> str | None:
    """The axis across which the parameter holds different values (``None``: replicated)."""
    return getattr(p, _SHARD, None)


def is_tagged(p: torch.Tensor) -> bool:
    return hasattr(p, _REDUCE)
