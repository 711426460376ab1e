"""Parameters whose gradient is a partial sum across a group of ranks.

A parameter every tensor rank holds in full but uses only on its own shard of the activations —
the replicated KV rows of grouped-query attention, a per-head norm (Qwen3's ``q_norm``) applied to
this rank's heads — gets from each rank only that rank's share of its gradient. So does every
parameter under sequence parallelism, where each rank sees a slice of the sequence. Such gradients
must be summed over the group before the data-parallel average and before the optimizer step.

The sum runs in a tensor hook (``Tensor.register_hook``), which sees the gradient of one backward
pass before it is accumulated into ``.grad``: gradient accumulation over micro-batches then adds
already-summed gradients, and the engine's own post-accumulate hooks (data-parallel reduction,
ZeRO) see the summed value.
"""

from __future__ import annotations

import torch

from ds_core import comm

from .comm import TensorGroup

__all__ = ["sum_gradient_over", "gradient_groups", "carry_over"]

_ATTR = "_ds_grad_sum_groups"


def sum_gradient_over(param: torch.Tensor, group: TensorGroup, name: str) -> None:
    """Sum ``param``'s gradient over ``group`` (named ``name``, e.g. ``"tensor"``) in every backward.

    Registering the same group name twice is a no-op, so plans can be applied idempotently.
    """
    if group.size == 1 or not param.requires_grad or group.group is None:
        return  # one rank, a frozen parameter, or a shard built offline (it cannot run backward)
    names: dict = param.__dict__.setdefault(_ATTR, {})
    if name in names:
        return
    names[name] = group

    def hook(grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone()
        comm.all_reduce(grad, group=group.group)
        return grad

    param.register_hook(hook)


def gradient_groups(param: torch.Tensor) -> dict[str, TensorGroup]:
    """The groups (by name) ``param``'s gradient is summed over."""
    return dict(getattr(param, _ATTR, {}))


def carry_over(old: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
    """Give ``new`` (a materialized replacement of ``old``) its attributes, tags and gradient sums."""
    groups = gradient_groups(old)
    for key, value in old.__dict__.items():
        if key != _ATTR:
            setattr(new, key, value)
    for name, group in groups.items():
        sum_gradient_over(new, group, name)
    return new
