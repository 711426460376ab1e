"""Batched next-token selection with each request's own sampling parameters.

One call handles every row that needs a token this step (one per sequence that reached the end of
its known tokens). Greedy rows take the argmax; sampled rows go through temperature, top-k, top-p
and min-p, then draw with the exponential race (``argmax(p / E)``, ``E ~ Exp(1)`` — the Gumbel-max
trick in another form), whose noise comes from the request's own generator when it has a seed. A
seeded request therefore draws the same tokens whatever it is batched with.

Penalties, applied to the logits first and in this order (what Hugging Face and the OpenAI API do):
repetition (CTRL, Keskar et al. 2019: positive logits of tokens seen in prompt or output divided by
the penalty, negative ones multiplied), then frequency and presence (logit minus
``frequency * count + presence * [count > 0]`` over the output tokens), and the ``min_tokens`` rule
(EOS and stop tokens impossible until that many tokens are out).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .sequence import Sequence

__all__ = ["Sampler", "apply_penalties", "filter_logits"]


def apply_penalties(logits: Tensor, seqs: list[Sequence]) -> Tensor:
    """Penalties of each row's request, in place on a float32 ``(rows, vocab)`` tensor."""
    for row, seq in enumerate(seqs):
        p = seq.params
        if p.repetition_penalty != 1:
            seen = torch.tensor(sorted(set(seq.token_ids)), dtype=torch.long, device=logits.device)
            score = logits[row, seen]
            logits[row, seen] = torch.where(score < 0, score * p.repetition_penalty, score / p.repetition_penalty)
        if (p.frequency_penalty or p.presence_penalty) and seq.num_output_tokens:
            out = torch.tensor(seq.output_token_ids, dtype=torch.long, device=logits.device)
            counts = torch.bincount(out, minlength=logits.shape[1])[: logits.shape[1]].to(logits.dtype)
            logits[row] -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).to(logits.dtype)
        if p.min_tokens and seq.num_output_tokens < p.min_tokens:
            banned = list(p.stop_token_ids or [])
            if not p.ignore_eos:
                banned.extend(seq.eos_token_ids)
            banned = [t for t in banned if t < logits.shape[1]]
            if banned:
                logits[row, banned] = float("-inf")
    return logits


def filter_logits(logits: Tensor, temperature: Tensor, top_k: Tensor, top_p: Tensor, min_p: Tensor) -> Tensor:
    """Probabilities after temperature, top-k, top-p and min-p, one parameter per row.

    ``top_k`` 0 and ``top_p`` 1 and ``min_p`` 0 disable a filter. Ties at the top-k boundary keep the
    lower token ids (a stable descending sort), like ``torch.topk``.
    """
    logits = logits / temperature[:, None]
    vocab = logits.shape[1]
    if bool((top_k > 0).any()) or bool((top_p < 1).any()):
        ordered, order = torch.sort(logits, dim=-1, descending=True, stable=True)
        rank = torch.arange(vocab, device=logits.device)[None, :]
        k = torch.where(top_k > 0, top_k, vocab).clamp(max=vocab)
        drop = rank >= k[:, None]
        ordered = ordered.masked_fill(drop, float("-inf"))
        probs = ordered.softmax(dim=-1)
        before = probs.cumsum(dim=-1) - probs  # mass strictly above each token
        drop |= (before > top_p[:, None]) & (rank > 0)
        logits = torch.empty_like(logits).scatter_(1, order, ordered.masked_fill(drop, float("-inf")))
    probs = logits.softmax(dim=-1)
    if bool((min_p > 0).any()):
        floor = min_p[:, None] * probs.amax(dim=-1, keepdim=True)
        probs = probs.masked_fill(probs < floor, 0.0)
        probs = probs / probs.sum(dim=-1, keepdim=True)
    return probs


class Sampler:
    """Turns a step's logits into one token per row."""

    def __init__(self, seed: int = 0) -> None:
        self.generator = torch.Generator().manual_seed(seed)

    def __call__(self, logits: Tensor, seqs: list[Sequence]) -> list[int]:
        logits = logits.float()
        if any(s.params.needs_penalties or s.params.min_tokens for s in seqs):
            logits = apply_penalties(logits.clone(), seqs)
        greedy = [s.params.greedy for s in seqs]
        if all(greedy):
            return logits.argmax(dim=-1).tolist()
        tokens = logits.argmax(dim=-1)
        rows = [i for i, g in enumerate(greedy) if not g]
        sampled = [seqs[i].params for i in rows]
        dev = logits.device
        probs = filter_logits(
            logits[rows],
            torch.tensor([p.temperature for p in sampled], device=dev),
            torch.tensor([p.top_k for p in sampled], device=dev),
            torch.tensor([p.top_p for p in sampled], device=dev),
            torch.tensor([p.min_p for p in sampled], device=dev),
        )
        noise = torch.empty(probs.shape, dtype=torch.float32)
        shared = [j for j, i in enumerate(rows) if seqs[i].generator is None]
        if shared:
            noise[shared] = torch.empty(len(shared), probs.shape[1]).exponential_(generator=self.generator)
        for j, i in enumerate(rows):
            if seqs[i].generator is not None:  # a seeded request draws from its own stream only
                noise[j].exponential_(generator=seqs[i].generator)
        choice = (probs / noise.to(dev)).argmax(dim=-1)
        tokens[rows] = choice
        return tokens.tolist()
