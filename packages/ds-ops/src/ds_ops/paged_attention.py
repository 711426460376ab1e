"""``ds_ops::paged_attention``: causal attention of a ragged batch over a paged (blocked) KV cache.

    paged_attention(q, k_cache, v_cache, block_tables, seq_lens, query_start_loc, max_query_len, scale, window)

- ``q`` (T, Hq, D): the queries of ``S`` sequences, flat; sequence ``s`` owns rows
  ``query_start_loc[s] .. query_start_loc[s + 1]`` (``query_start_loc`` int32, S + 1 entries).
- ``k_cache`` / ``v_cache`` (num_blocks, block_size, Hkv, D), already holding every query's own key
  and value; Hq must be a multiple of Hkv (grouped-query attention).
- ``block_tables`` (S, max_blocks) int32: position ``p`` of sequence ``s`` lives in block
  ``block_tables[s, p // block_size]``, slot ``p % block_size``.
- ``seq_lens`` (S,) int32: each sequence's context length, its queries being the last ones, so query
  ``i`` of ``s`` is at position ``seq_lens[s] - q_len + i`` and sees keys ``0 ..`` that position.
- ``max_query_len``: the longest run of queries (sizes the kernel's grid without a device sync).
- ``window``: sliding window (a key is seen when ``q_pos - k_pos < window``); 0 for none.

Returns (T, Hq, D) in ``q``'s dtype. The default is plain PyTorch: one
``scaled_dot_product_attention`` per sequence over its keys and values gathered head-major (already in
SDPA's contiguous layout). The "cuda" kernel is :mod:`ds_ops.triton.paged_attention` (block sizes a
power of two >= 16, head dim <= 256; anything else runs the default). ds-infer's serving engine
calls it through ``ds_core.ops.get_op``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from . import triton as _triton
from .registry import custom_op, register_kernel

__all__ = ["paged_attention", "paged_attention_reference", "kernel_supports"]

_KERNEL = "triton (ds_ops.triton.paged_attention)"


def _check(q: Tensor, k_cache: Tensor, v_cache: Tensor, block_tables: Tensor, seq_lens: Tensor,
           query_start_loc: Tensor) -> None:  # fmt: skip
    if q.dim() != 3 or k_cache.dim() != 4 or k_cache.shape != v_cache.shape:
        raise ValueError(f"paged_attention: q {tuple(q.shape)} must be (T, Hq, D) and k_cache/v_cache "
                         f"{tuple(k_cache.shape)}/{tuple(v_cache.shape)} the same (num_blocks, block_size, Hkv, D)")
    if q.shape[2] != k_cache.shape[3] or q.shape[1] % k_cache.shape[2]:
        raise ValueError(f"paged_attention: q heads/dim {tuple(q.shape[1:])} do not fit the cache's "
                         f"{tuple(k_cache.shape[2:])}; Hq must be a multiple of Hkv and D equal")
    num_seqs = block_tables.shape[0]
    if seq_lens.shape != (num_seqs,) or query_start_loc.shape != (num_seqs + 1,):
        raise ValueError(f"paged_attention: {num_seqs} block tables need seq_lens of shape ({num_seqs},) and "
                         f"query_start_loc of ({num_seqs + 1},); got {tuple(seq_lens.shape)} and "
                         f"{tuple(query_start_loc.shape)}")


def _gather(cache: Tensor, blocks: Tensor, ctx: int) -> Tensor:
    """One sequence's keys (or values) as a contiguous ``(1, Hkv, ctx, D)`` tensor."""
    num_blocks, block_size, heads, dim = cache.shape
    if cache.is_contiguous():  # rows of the (slots * Hkv, D) view, head by head: already in SDPA's layout
        slots = (blocks[:, None] * block_size + torch.arange(block_size, device=cache.device)).reshape(-1)[:ctx]
        rows = slots[None, :] * heads + torch.arange(heads, device=cache.device)[:, None]
        return cache.view(-1, dim).index_select(0, rows.reshape(-1)).view(1, heads, ctx, dim)
    return cache[blocks].flatten(0, 1)[:ctx].transpose(0, 1).unsqueeze(0)


def _attend(q: Tensor, k_cache: Tensor, v_cache: Tensor, block_tables: Tensor, lens: list[int], starts: list[int],
            seqs, scale: float, window: int, out: Tensor) -> None:  # fmt: skip
    """``scaled_dot_product_attention`` per sequence of ``seqs`` over its gathered keys and values."""
    block_size = k_cache.shape[1]
    gqa = q.shape[1] != k_cache.shape[2]
    for s in seqs:
        lo, hi, ctx = starts[s], starts[s + 1], lens[s]
        if hi == lo:
            continue
        blocks = block_tables[s, : -(-ctx // block_size)].long()
        k, v = _gather(k_cache, blocks, ctx), _gather(v_cache, blocks, ctx)
        qs = q[lo:hi].transpose(0, 1).unsqueeze(0)
        rows = hi - lo
        diff = torch.arange(ctx - rows, ctx, device=q.device)[:, None] - torch.arange(ctx, device=q.device)[None, :]
        mask = (diff >= 0) & (diff < window) if window > 0 else diff >= 0
        o = F.scaled_dot_product_attention(qs, k.to(q.dtype), v.to(q.dtype), attn_mask=mask, scale=scale,
                                           enable_gqa=gqa)  # fmt: skip
        out[lo:hi] = o.squeeze(0).transpose(0, 1)


def paged_attention_reference(q: Tensor, k_cache: Tensor, v_cache: Tensor, block_tables: Tensor,
                              seq_lens: Tensor, query_start_loc: Tensor, scale: float,
                              window: int = 0) -> Tensor:  # fmt: skip
    """One ``scaled_dot_product_attention`` per sequence over its gathered keys and values."""
    _check(q, k_cache, v_cache, block_tables, seq_lens, query_start_loc)
    out = torch.empty_like(q)
    lens = seq_lens.tolist()
    _attend(q, k_cache, v_cache, block_tables, lens, query_start_loc.tolist(), range(len(lens)), scale, window, out)
    return out


def kernel_supports(q: Tensor, k_cache: Tensor, v_cache: Tensor) -> bool:
    """Shapes the Triton kernel handles; others run the default."""
    block_size, head_dim = k_cache.shape[1], k_cache.shape[3]
    return (block_size >= 16 and block_size & (block_size - 1) == 0 and head_dim <= 256 and k_cache.stride(3) == 1
            and v_cache.stride() == k_cache.stride() and q.dtype in (torch.float32, torch.float16, torch.bfloat16))



@custom_op("paged_attention")
def paged_attention(q: Tensor, k_cache: Tensor, v_cache: Tensor, block_tables: Tensor, seq_lens: Tensor,
                    query_start_loc: Tensor, max_query_len: int, scale: float, window: int) -> Tensor:  # fmt: skip
    """Causal attention of a ragged batch over a paged KV cache (see the module docstring)."""
    return paged_attention_reference(q, k_cache, v_cache, block_tables, seq_lens, query_start_loc, scale, window)


@paged_attention.register_fake
def _paged_attention_fake(q, k_cache, v_cache, block_tables, seq_lens, query_start_loc, max_query_len, scale,
                          window):  # fmt: skip
    return torch.empty_like(q)


def _paged_attention_cuda(q, k_cache, v_cache, block_tables, seq_lens, query_start_loc, max_query_len, scale,
                          window):  # fmt: skip
    if not _triton.available() or not kernel_supports(q, k_cache, v_cache):
        return paged_attention_reference(q, k_cache, v_cache, block_tables, seq_lens, query_start_loc, scale,
                                         window)  # fmt: skip
    _check(q, k_cache, v_cache, block_tables, seq_lens, query_start_loc)
    from .triton.paged_attention import paged_attention_launch

    return paged_attention_launch(q, k_cache, v_cache, block_tables, seq_lens, query_start_loc, max_query_len,
                                  scale, window)  # fmt: skip


register_kernel("paged_attention", "cuda", _paged_attention_cuda, kernel=_KERNEL, status=_triton.status)
