"""DeepSpeed-Ulysses (Jacobs et al. 2023): attention over a sequence split across ranks.

Every rank holds ``s/p`` positions of every head. Before attention one all-to-all per tensor trades
that for all ``s`` positions of ``h/p`` heads — attention is independent per head, so each rank then
runs an ordinary (causal or not) attention on full sequences — and one all-to-all after trades
back. Communication per rank is ``O(s·h·d / p)`` per tensor, constant as ``p`` grows with ``s``.

:class:`DistributedAttention` has DeepSpeed's signature and layout: inputs ``[s/p, b, h, d]`` with
``batch_dim_idx=1`` (or ``[b, s/p, h, d]`` with ``batch_dim_idx=0``), ``scatter_idx`` the head
dimension, ``gather_idx`` the sequence dimension, and ``forward(query, key, value, batch_dim_idx,
rotary_pos_emb=None, *args, **kwargs)`` calling ``local_attention(q, k, v, *args, **kwargs)`` on
``[s, b, h/p, d]`` (or ``[b, s, h/p, d]``) tensors.

Grouped-query attention: when the key/value heads do not divide ``p`` they are repeated (each KV
head ``lcm(kv, p) / kv`` times, keeping the query grouping) before the all-to-all, so every rank gets
the KV heads its query heads use; query heads that do not divide ``p`` are an error naming both.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from ds_core import comm
from ds_core.errors import ConfigError

from ..comm import TensorGroup

__all__ = ["DistributedAttention", "seq_all_to_all", "replicate_kv_heads", "apply_rotary"]


def _a2a(x: torch.Tensor, tg: TensorGroup, scatter: int, gather: int, comm_dtype=None) -> torch.Tensor:
    """Split ``x`` along ``scatter`` into ``p`` chunks, send chunk ``i`` to rank ``i``, concatenate the
    received chunks (rank order) along ``gather``."""
    p = tg.size
    if x.shape[scatter] % p:
        raise ConfigError(f"all-to-all over {p} sequence-parallel ranks: dimension {scatter} of size "
                          f"{x.shape[scatter]} does not divide by {p}")
    tg.require_live("Ulysses all-to-all")
    dtype = x.dtype
    if comm_dtype is not None and comm_dtype != dtype:
        x = x.to(comm_dtype)
    send = x.unflatten(scatter, (p, x.shape[scatter] // p)).movedim(scatter, 0).contiguous()
    recv = torch.empty_like(send)
    comm.all_to_all(recv, send, group=tg.group)
    out = recv.movedim(0, gather).flatten(gather, gather + 1)
    return out.to(dtype) if out.dtype != dtype else out


class _SeqAllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, tg, scatter, gather, comm_dtype):
        ctx.args = (tg, scatter, gather, comm_dtype)
        return _a2a(x, tg, scatter, gather, comm_dtype)

    @staticmethod
    def backward(ctx, grad):
        tg, scatter, gather, comm_dtype = ctx.args
        return _a2a(grad, tg, gather, scatter, comm_dtype), None, None, None, None


def seq_all_to_all(x: torch.Tensor, group: TensorGroup, scatter: int, gather: int,
                   comm_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Differentiable all-to-all: scatter dimension ``scatter``, gather dimension ``gather`` (its
    backward is the reverse exchange). ``comm_dtype`` sends in another dtype (e.g. bf16)."""
    if group.size == 1:
        return x
    return _SeqAllToAll.apply(x, group, scatter, gather, comm_dtype)


def replicate_kv_heads(kv: torch.Tensor, num_heads: int, p: int, head_dim_idx: int) -> torch.Tensor:
    """Repeat KV heads so they divide ``p`` and keep the query grouping (see the module docstring)."""
    num_kv = kv.shape[head_dim_idx]
    if num_heads % p:
        raise ConfigError(f"sequence parallelism over {p} ranks needs the query heads to divide: {num_heads} "
                          f"query heads do not split over {p} ranks; use a sequence_parallel_size dividing "
                          f"{num_heads}")
    if num_kv % p == 0:
        return kv
    if num_heads % num_kv:
        raise ConfigError(f"{num_kv} key/value heads do not divide {num_heads} query heads")
    copies = math.lcm(num_kv, p) // num_kv
    return kv.repeat_interleave(copies, dim=head_dim_idx)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(t: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding on the first ``cos.shape[-1]`` channels (the rest pass through)."""
    rot = cos.shape[-1]
    t, rest = t[..., :rot], t[..., rot:]
    t = t * cos + _rotate_half(t) * sin
    return t if rest.shape[-1] == 0 else torch.cat((t, rest), dim=-1)


class DistributedAttention(nn.Module):
    """Ulysses sequence-parallel attention around any local attention callable.

    ``local_attention(q, k, v, *args, **kwargs)``: e.g. a function wrapping
    ``torch.nn.functional.scaled_dot_product_attention`` in the same layout, flash attention, or a
    Hugging Face attention function. ``sequence_process_group``: a process group (``None``: the
    whole world) or a :class:`~ds_parallel.comm.TensorGroup`. ``num_kv_heads``: checked against the
    keys when given. ``comm_dtype``: the dtype of the all-to-alls (``seq_parallel_communication_data_type``).
    """

    def __init__(self, local_attention, sequence_process_group=None, scatter_idx: int = 2, gather_idx: int = 0,
                 num_kv_heads: int | None = None, comm_dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.local_attn = local_attention
        self.spg = TensorGroup.of(sequence_process_group)
        self.scatter_idx = scatter_idx
        self.gather_idx = gather_idx
        self.num_kv_heads = num_kv_heads
        self.comm_dtype = comm_dtype

    def _dims(self, batch_dim_idx: int) -> tuple[int, int]:
        if batch_dim_idx not in (0, 1):
            raise ConfigError(f"batch_dim_idx={batch_dim_idx!r} must be 0 ([b, s, h, d]) or 1 ([s, b, h, d])")
        # DeepSpeed's layouts: the sequence is dim 1 in batch-first inputs whatever gather_idx says
        seq = 1 if batch_dim_idx == 0 and self.gather_idx == 0 else self.gather_idx
        return self.scatter_idx, seq

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, batch_dim_idx: int,
                rotary_pos_emb=None, *args: Any, **kwargs: Any) -> torch.Tensor:
        heads, seq = self._dims(batch_dim_idx)
        p = self.spg.size
        if self.num_kv_heads is not None and key.shape[heads] != self.num_kv_heads:
            raise ConfigError(f"keys have {key.shape[heads]} heads but num_kv_heads={self.num_kv_heads}")
        if p > 1:
            key = replicate_kv_heads(key, query.shape[heads], p, heads)
            value = replicate_kv_heads(value, query.shape[heads], p, heads)
        q = seq_all_to_all(query, self.spg, heads, seq, self.comm_dtype)
        k = seq_all_to_all(key, self.spg, heads, seq, self.comm_dtype)
        v = seq_all_to_all(value, self.spg, heads, seq, self.comm_dtype)
        if rotary_pos_emb is not None:  # DeepSpeed's (cos, sin), [b, s, 1, d] permuted to the [s, b, ...] layout
            cos, sin = (t.permute(1, 0, 2, 3) for t in rotary_pos_emb)
            q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        context = self.local_attn(q, k, v, *args, **kwargs)
        return seq_all_to_all(context, self.spg, seq, heads, self.comm_dtype)
