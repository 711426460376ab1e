"""Optimizer parameter groups with expert parameters apart, as DeepSpeed's
``split_params_into_different_moe_groups_for_optimizer`` makes them.

Expert parameters differ per expert rank and reduce over their own group, so DeepSpeed keeps them in
their own optimizer groups, marked ``moe: True`` and named after the expert-parallel size
(``ep_size_{n}``). The engine and ZeRO here read parameter tags rather than group names, so the split
is for compatibility and for giving experts their own hyper-parameters (e.g. no weight decay).
"""

from __future__ import annotations

import torch
from torch import nn

from ds_core.errors import ConfigError

__all__ = ["is_moe_param", "split_params_into_different_moe_groups_for_optimizer",
           "split_params_grads_into_shared_and_expert_params"]


def is_moe_param(p: torch.Tensor) -> bool:
    """True for expert parameters (DeepSpeed marks them ``allreduce=False``)."""
    return getattr(p, "allreduce", True) is False


def split_params_into_different_moe_groups_for_optimizer(param_groups, max_group_size: int | None = None) -> list[dict]:
    """Split each group into its non-expert parameters and one group per expert-parallel size.

    ``param_groups`` is a module, a dict, a list/tuple of dicts, or an iterable of parameters. Each new
    expert group copies its source group's hyper-parameters and adds ``moe: True`` and
    ``name: "<source name>_ep_size_{n}"``. Empty non-expert groups are dropped.
    """
    if isinstance(param_groups, nn.Module):
        param_groups = [{"params": list(param_groups.parameters()), "name": "dense"}]
    elif isinstance(param_groups, dict):
        param_groups = [param_groups]
    else:
        param_groups = list(param_groups)
        if param_groups and not isinstance(param_groups[0], dict):
            param_groups = [{"params": param_groups, "name": "dense"}]
    if max_group_size is not None and max_group_size < 1:
        raise ConfigError(f"max_group_size={max_group_size!r} must be >= 1 (elements per expert group)")
    out: list[dict] = []
    experts: list[dict] = []
    for i, group in enumerate(param_groups):
        if "params" not in group:
            raise ConfigError(f"parameter group {i} has no 'params' key; give each group a list of parameters")
        params = list(group["params"])
        dense = [p for p in params if not is_moe_param(p)]
        hyper = {k: v for k, v in group.items() if k != "params"}
        base = hyper.get("name", f"group{i}")
        by_name: dict[str, list] = {}
        for p in params:
            if is_moe_param(p):
                by_name.setdefault(getattr(p, "group_name", None) or "ep_size_1", []).append(p)
        if dense:
            out.append({**hyper, "params": dense})
        for name, ps in by_name.items():
            for chunk in _chunks(ps, max_group_size):
                experts.append({**hyper, "params": chunk, "moe": True, "name": f"{base}_{name}"})
    return out + experts


def _chunks(params: list, max_numel: int | None) -> list[list]:
    if max_numel is None:
        return [params]
    chunks, current, size = [], [], 0
    for p in params:
        if current and size + p.numel() > max_numel:
            chunks.append(current)
            current, size = [], 0
        current.append(p)
        size += p.numel()
    return chunks + ([current] if current else [])


def split_params_grads_into_shared_and_expert_params(group: list[torch.Tensor]):
    """``(shared params with grads, expert params with grads)``: the split DeepSpeed uses for clipping."""
    shared = [p for p in group if p.grad is not None and not is_moe_param(p)]
    expert = [p for p in group if p.grad is not None and is_moe_param(p)]
    return shared, expert
