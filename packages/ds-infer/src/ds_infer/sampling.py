"""Next-token selection: repetition penalty, temperature, top-k, top-p (nucleus), greedy or sampled.

The order and arithmetic follow the usual pipeline (and transformers' processors), so greedy and
seeded runs are comparable: the penalty (Keskar et al. 2019, CTRL) divides positive logits and
multiplies negative ones of every token already in the sequence; temperature divides; top-k keeps
the ``k`` largest; top-p (Holtzman et al. 2020) keeps the smallest set whose probability reaches
``p``; then argmax or a multinomial draw.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["apply_repetition_penalty", "warp", "select"]


def apply_repetition_penalty(logits: Tensor, seen: Tensor, penalty: float) -> Tensor:
    """``seen [B, L]``: every token id so far (prompt and generated)."""
    if penalty == 1.0:
        return logits
    score = logits.gather(1, seen)
    score = torch.where(score < 0, score * penalty, score / penalty)
    return logits.scatter(1, seen, score)


def warp(logits: Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0) -> Tensor:
    if temperature != 1.0:
        logits = logits / temperature
    if top_k and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=False)
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        drop = cumulative <= (1 - top_p)
        drop[..., -1:] = False  # always keep the most likely token
        logits = logits.masked_fill(drop.scatter(1, order, drop), float("-inf"))
    return logits


def select(logits: Tensor, do_sample: bool, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
           generator: torch.Generator | None = None) -> Tensor:
    """``[B]`` next tokens from fp32 ``logits [B, V]``."""
    if not do_sample:
        return logits.argmax(dim=-1)
    probs = warp(logits, temperature, top_k, top_p).softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)
