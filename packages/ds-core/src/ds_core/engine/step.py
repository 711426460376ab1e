"""The optimizer-step decision shared by every strategy and the pipeline: unscale, agree, clip.

At an accumulation boundary the engine asks the data-parallel strategy for its
:class:`~ds_core.engine.strategy.NormTerm` s and calls :func:`decide_step`:

1. the squared gradient norm is summed over the groups each term names (a ZeRO partition over the data
   axis, an expert's norm over the expert axis, a tensor-parallel shard over the tensor axis), then
   through the engine's ``grad_norm`` hooks (the pipeline adds its other stages);
2. with loss scaling (fp16), a non-finite total on *any* rank means an overflow: one ``MAX`` all-reduce
   over the world makes every rank — whatever stage or expert it holds — skip the step together;
3. otherwise the coefficient ``1 / loss_scale × min(1, clip / (norm + 1e-6))`` (the rule of
   ``torch.nn.utils.clip_grad_norm_``) is handed to ``strategy.step(coef)``, which folds it into its
   optimizer pass (``ds_core.optim.fused``) or multiplies its gradients once.

The loss scale is a power of two, so unscaling inside the coefficient gives the same numbers as
dividing the gradients first.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import torch

from .. import comm

__all__ = ["NormTerm", "StepDecision", "decide_step", "global_sq_norm", "agree_any", "clip_coefficient"]


class NormTerm(NamedTuple):
    """A piece of the global squared gradient norm: ``sq`` (a 0-dim float64 tensor, this rank's sum of
    squares) is summed over each group of ``groups`` in turn (none: it is already global)."""

    sq: torch.Tensor
    groups: tuple = ()


class StepDecision(NamedTuple):
    apply: bool  #: False: skip this step on every rank (fp16 overflow somewhere)
    coef: float  #: multiply the gradients by this before the update (unscale × clip)
    grad_norm: float  #: the global norm of the unscaled gradients (inf when skipped)


def global_sq_norm(terms: Sequence) -> float:
    """Sum ``terms`` (``NormTerm``: squared norm, groups) into the global squared norm.

    Terms with the same groups are added locally first, so each distinct group list costs one
    all-reduce per group. Every rank must pass terms with the same group lists in the same order.
    """
    sums: dict[tuple, list] = {}
    for term in terms:
        key = tuple(id(g) for g in term.groups)
        entry = sums.get(key)
        if entry is None:
            sums[key] = [term.groups, term.sq.to(torch.float64)]
        else:
            entry[1] = entry[1] + term.sq
    total = 0.0
    for groups, local in sums.values():
        for group in groups:
            if comm.get_world_size(group) > 1:
                comm.all_reduce(local, group=group)
        total += float(local)
    return total


def agree_any(flag: bool, group=None) -> bool:
    """True on every rank of ``group`` (default: the world) when ``flag`` is true on any of them."""
    if comm.get_world_size(group) == 1:
        return flag
    t = torch.tensor([1.0 if flag else 0.0])
    comm.all_reduce(t, op=comm.ReduceOp.MAX, group=group)
    return bool(t.item())


def clip_coefficient(norm: float, clip: float) -> float:
    """``min(1, clip / (norm + 1e-6))`` — torch's ``clip_grad_norm_`` rule; 1 when ``clip`` is 0 or the
    norm is not finite (nothing sensible to clip by)."""
    if clip > 0 and math.isfinite(norm):
        coef = clip / (norm + 1e-6)
        if coef < 1:
            return coef
    return 1.0


def decide_step(terms: Sequence, loss_scale: float | None, clip: float, hooks=None) -> StepDecision:
    """See the module docstring. ``loss_scale`` is None without loss scaling."""
    sq = global_sq_norm(terms)
    if hooks is not None:
        sq = hooks.reduce_grad_norm(sq)
    inv = 1.0
    if loss_scale is not None:
        if agree_any(not math.isfinite(sq)):
            return StepDecision(False, 0.0, float("inf"))
        inv = 1.0 / loss_scale
    norm = math.sqrt(sq) * inv if math.isfinite(sq) else sq
    return StepDecision(True, inv * clip_coefficient(norm, clip), norm)
