"""Pruning masks: magnitude (l1), learned top-k scores, SNIP-momentum blocks.

- ``l1``: keep the entries (weights, rows, heads, channels) with the largest L1 norm, fixed when
  pruning starts.
- ``topk``: learned importance scores; the forward keeps the top ``dense_ratio`` by score and the
  straight-through binarizer passes the mask's gradient to the scores (Movement Pruning, Sanh et al.
  2020). Scores start at the magnitude importance, so the first mask is the l1 mask.
- ``snip_momentum``: importance ``|w * dL/dw|`` (SNIP, Lee et al. 2019) averaged with momentum over
  steps, pruned gradually in blocks (``NxM``: N rows by M inputs; ``N:M``: N kept in every M
  consecutive inputs) following a cubic sparsity ramp (Zhu & Gupta 2017) from ``schedule_offset`` to
  ``schedule_offset_end``.
"""

from __future__ import annotations

import math
import re

import torch
from torch import Tensor

__all__ = ["keep_count", "topk_mask", "TopKBinarizer", "block_mask", "cubic_density"]


def keep_count(n: int, dense_ratio: float) -> int:
    return max(1, min(n, math.ceil(dense_ratio * n - 1e-9)))


def topk_mask(scores: Tensor, dense_ratio: float) -> Tensor:
    """1.0 at the ``dense_ratio`` largest scores (over the whole tensor), 0.0 elsewhere."""
    flat = scores.detach().flatten().float()
    k = keep_count(flat.numel(), dense_ratio)
    mask = torch.zeros_like(flat)
    mask[torch.topk(flat, k, sorted=False).indices] = 1.0
    return mask.view_as(scores).to(scores.dtype)


class TopKBinarizer(torch.autograd.Function):
    """Forward: the top-k mask of the scores; backward: straight through to the scores."""

    @staticmethod
    def forward(ctx, scores: Tensor, dense_ratio: float) -> Tensor:
        return topk_mask(scores, dense_ratio)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return grad, None


def cubic_density(step: int, start: int, end: int, target: float) -> float:
    """Density at ``step``: 1 before ``start``, ``target`` from ``end`` on, a cubic ramp between."""
    if step < start:
        return 1.0
    if step >= end or end == start:
        return target
    frac = (step - start) / (end - start)
    return target + (1.0 - target) * (1.0 - frac) ** 3


def block_mask(scores: Tensor, pattern: str, dense_ratio: float) -> Tensor:
    """A mask of a 2-D score map pruned in blocks: ``'NxM'`` blocks (summed scores, top blocks kept)
    or ``'N:M'`` (in every M consecutive inputs of a row, the N best kept; ``dense_ratio`` is N/M)."""
    out, inp = scores.shape
    if ":" in pattern:
        n, m = map(int, pattern.split(":"))
        if inp % m:
            return topk_mask(scores, dense_ratio)
        s = scores.reshape(out, inp // m, m)
        mask = torch.zeros_like(s)
        mask.scatter_(-1, torch.topk(s, n, dim=-1).indices, 1.0)
        return mask.reshape(out, inp)
    r, c = map(int, re.fullmatch(r"(\d+)x(\d+)", pattern).groups())
    if out % r or inp % c:
        return topk_mask(scores, dense_ratio)
    blocks = scores.reshape(out // r, r, inp // c, c).sum(dim=(1, 3))
    keep = topk_mask(blocks, dense_ratio)
    return keep.repeat_interleave(r, 0).repeat_interleave(c, 1)
