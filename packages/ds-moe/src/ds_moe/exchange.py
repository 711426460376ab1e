"""The expert-parallel exchange: ``all_to_all_single`` as an autograd function.

Dispatch sends each token to the rank holding its expert and combine sends the result back
(GShard, Lepikhin et al. 2020, section 3.2; DeepSpeed-MoE, Rajbhandari et al. 2022). The gradient of
an all-to-all is the all-to-all of the gradient with the send and receive splits swapped, so the
backward pass routes each token's gradient back to the rank that sent it. Split sizes may be uneven
(dropless routing sends however many tokens each expert got).
"""

from __future__ import annotations

import torch

from ds_core import comm

__all__ = ["all_to_all", "exchange_counts"]


class _AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, out_splits: list[int], in_splits: list[int], group) -> torch.Tensor:
        ctx.splits = (out_splits, in_splits)
        ctx.group = group
        x = x.contiguous()
        out = x.new_empty((sum(out_splits), *x.shape[1:]))
        comm.all_to_all(out, x, output_split_sizes=out_splits, input_split_sizes=in_splits, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        out_splits, in_splits = ctx.splits
        return _AllToAll.apply(grad.contiguous(), in_splits, out_splits, ctx.group), None, None, None


def all_to_all(x: torch.Tensor, out_splits: list[int], in_splits: list[int], group) -> torch.Tensor:
    """Send rows ``x[sum(in_splits[:r]) : ...]`` to rank ``r`` of ``group``; receive ``out_splits[r]`` rows
    from each. Differentiable in ``x``."""
    return _AllToAll.apply(x, list(out_splits), list(in_splits), group)


def exchange_counts(counts: torch.Tensor, group) -> torch.Tensor:
    """``counts`` (ep × local experts, this rank's tokens per global expert) -> the same shape holding,
    per source rank, how many tokens it sends to each of this rank's experts."""
    out = torch.empty_like(counts)
    comm.all_to_all(out.reshape(-1), counts.contiguous().reshape(-1), group=group)
    return out
