"""Cross-entropy over vocabulary-sharded logits: no rank ever holds a full row of logits.

Megatron-LM's parallel cross-entropy: with each rank holding the logits of its vocabulary slice,
``loss = log Σ_v exp(z_v - m) - (z_t - m)`` needs three all-reduces of per-token scalars — the max
``m`` (for stability), the sum of exponentials, and the target logit (held by one rank). The
gradient, ``softmax - onehot(target)`` restricted to the local slice, needs no communication.
"""

from __future__ import annotations

import torch

from ds_core import comm

from .comm import TensorGroup

__all__ = ["vocab_parallel_cross_entropy"]


class _VocabParallelCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, target, tg: TensorGroup, vocab_start: int, ignore_index: int):
        logits = logits.float()
        local_vocab = logits.shape[-1]
        m = logits.max(dim=-1).values
        if tg.size > 1:
            tg.require_live("vocab-parallel cross-entropy")
            comm.all_reduce(m, op=comm.ReduceOp.MAX, group=tg.group)
        shifted = logits - m.unsqueeze(-1)
        ignored = target == ignore_index
        local = target - vocab_start
        here = (local >= 0) & (local < local_vocab) & ~ignored
        idx = local.masked_fill(~here, 0)
        target_logit = shifted.gather(-1, idx.unsqueeze(-1)).squeeze(-1).masked_fill(~here, 0.0)
        exp = shifted.exp_()
        sum_exp = exp.sum(dim=-1)
        if tg.size > 1:
            both = torch.stack([target_logit, sum_exp])
            comm.all_reduce(both, group=tg.group)
            target_logit, sum_exp = both[0], both[1]
        loss = (sum_exp.log() - target_logit).masked_fill(ignored, 0.0)
        exp.div_(sum_exp.unsqueeze(-1))  # the softmax, kept for backward
        ctx.save_for_backward(exp, idx, here, ignored)
        return loss

    @staticmethod
    def backward(ctx, grad):
        softmax, idx, here, ignored = ctx.saved_tensors
        g = softmax
        g.scatter_add_(-1, idx.unsqueeze(-1), -here.to(g.dtype).unsqueeze(-1))
        g.mul_((grad * (~ignored).to(grad.dtype)).unsqueeze(-1))
        return g, None, None, None, None


def vocab_parallel_cross_entropy(logits: torch.Tensor, target: torch.Tensor, group: TensorGroup | None = None,
                                 vocab_start: int = 0, ignore_index: int = -100,
                                 reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy of ``target`` given this rank's vocabulary slice of the logits.

    ``logits[..., v]`` is the logit of token ``vocab_start + v``; ``target`` holds global token ids
    (``ignore_index`` marks positions without a label). ``reduction`` is ``"mean"`` (over labelled
    positions, as ``torch.nn.functional.cross_entropy``), ``"sum"`` or ``"none"``. Computed in fp32.
    """
    tg = group or TensorGroup()
    if logits.shape[:-1] != target.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and target {tuple(target.shape)} must agree on "
                         f"every dimension but the last (the vocabulary)")
    loss = _VocabParallelCrossEntropy.apply(logits, target, tg, vocab_start, ignore_index)
    if reduction == "none":
        return loss
    if reduction == "sum":
        return loss.sum()
    if reduction == "mean":
        return loss.sum() / (target != ignore_index).sum().clamp(min=1)
    raise ValueError(f"reduction {reduction!r} must be 'mean', 'sum' or 'none'")
