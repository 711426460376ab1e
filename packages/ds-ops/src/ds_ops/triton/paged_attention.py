"""Paged attention for a ragged batch in Triton (the "cuda" kernel of ``ds_ops::paged_attention``).

Grid: (sequence, query head, tile of ``BLOCK_M`` queries). A program loads its tile of queries, then
walks the sequence's block table one KV block (``block_size`` slots) at a time up to the last
position its tile may see, with the online softmax of FlashAttention (Dao et al. 2022, Algorithm 1:
running max ``m``, normalizer ``l``, rescaled accumulator), so keys are read once per tile and never
gathered into a contiguous copy. The causal mask is bottom-right aligned: query ``i`` of a run of
``q_len`` sits at position ``seq_len - q_len + i``; with a sliding ``window`` it also needs
``q_pos - k_pos < window``, and blocks wholly outside every query's window are not read. Grouped-query attention maps query head ``h`` to
KV head ``h // (Hq / Hkv)``. Decode tokens are tiles of one valid row. Dot products accumulate in
fp32 (IEEE for fp32 inputs, no TF32; 16-bit inputs use the tensor cores' 16-bit products).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

__all__ = ["paged_attention_launch", "BLOCK_M"]

BLOCK_M = 16  # queries per program; tl.dot needs >= 16


@triton.jit
def _paged_attention_kernel(
    q_ptr, k_ptr, v_ptr, o_ptr, tables_ptr, seq_lens_ptr, q_start_ptr, scale, window,
    stride_qt, stride_qh, stride_kb, stride_ks, stride_kh, stride_ot, stride_oh, stride_tb,
    GROUP: tl.constexpr, BLOCK_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr, DOT_F32: tl.constexpr,
):  # fmt: skip
    s = tl.program_id(0)
    h = tl.program_id(1)
    tile = tl.program_id(2)
    q_start = tl.load(q_start_ptr + s)
    q_len = tl.load(q_start_ptr + s + 1) - q_start
    seq_len = tl.load(seq_lens_ptr + s)
    first_pos = seq_len - q_len

    rows = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < q_len
    pos = first_pos + rows
    d = tl.arange(0, BLOCK_D)
    d_ok = d < HEAD_DIM
    q_rows = (q_start + rows).to(tl.int64)
    q = tl.load(q_ptr + q_rows[:, None] * stride_qt + h * stride_qh + d[None, :],
                mask=row_ok[:, None] & d_ok[None, :], other=0.0)  # fmt: skip
    if DOT_F32:
        q = q.to(tl.float32)
    kv_head = h // GROUP

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    # keys up to the last position this tile sees; a tile past the run sees none
    last = tl.minimum(seq_len, first_pos + (tile + 1) * BLOCK_M)
    num_blocks = tl.where(tile * BLOCK_M < q_len, tl.cdiv(last, BLOCK_SIZE), 0)
    # with a sliding window, blocks wholly before the tile's first query's window are skipped
    first_block = tl.where(window > 0, tl.maximum(first_pos + tile * BLOCK_M - window + 1, 0) // BLOCK_SIZE, 0)
    slots = tl.arange(0, BLOCK_SIZE)
    for j in range(first_block, num_blocks):
        block = tl.load(tables_ptr + s * stride_tb + j).to(tl.int64)
        offs = block * stride_kb + slots[:, None] * stride_ks + kv_head * stride_kh + d[None, :]
        k = tl.load(k_ptr + offs, mask=d_ok[None, :], other=0.0)
        v = tl.load(v_ptr + offs, mask=d_ok[None, :], other=0.0)
        if DOT_F32:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
            qk = tl.dot(q, tl.trans(k), input_precision="ieee") * scale
        else:
            qk = tl.dot(q, tl.trans(k)) * scale
        key_pos = j * BLOCK_SIZE + slots
        diff = pos[:, None] - key_pos[None, :]
        visible = (diff >= 0) & (key_pos[None, :] < seq_len) & ((window <= 0) | (diff < window))
        qk = tl.where(visible, qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows that see nothing yet
        p = tl.exp(qk - m_safe[:, None])
        alpha = tl.exp(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        if DOT_F32:
            acc = acc * alpha[:, None] + tl.dot(p, v, input_precision="ieee")
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    out = acc / l_safe[:, None]
    tl.store(o_ptr + q_rows[:, None] * stride_ot + h * stride_oh + d[None, :], out.to(o_ptr.dtype.element_ty),
             mask=row_ok[:, None] & d_ok[None, :])  # fmt: skip


def _interpreting() -> bool:
    # The interpreter's tl.dot reads bfloat16 operands wrongly (numpy has no bfloat16), so under
    # TRITON_INTERPRET=1 the products are taken in fp32; compiled kernels use the tensor cores.
    return os.environ.get("TRITON_INTERPRET") == "1"


def paged_attention_launch(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           block_tables: torch.Tensor, seq_lens: torch.Tensor, query_start_loc: torch.Tensor,
                           max_query_len: int, scale: float, window: int = 0) -> torch.Tensor:  # fmt: skip
    """Launch the kernel; arguments as ``ds_ops::paged_attention`` (cache last dim contiguous)."""
    num_seqs = block_tables.shape[0]
    num_heads, head_dim = q.shape[1], q.shape[2]
    q = q.to(k_cache.dtype)
    if q.stride(2) != 1:
        q = q.contiguous()
    out = torch.empty_like(q)
    tables = block_tables.to(torch.int32).contiguous()
    if num_seqs == 0 or q.shape[0] == 0:
        return out
    grid = (num_seqs, num_heads, triton.cdiv(max(max_query_len, 1), BLOCK_M))
    _paged_attention_kernel[grid](
        q, k_cache, v_cache, out, tables, seq_lens.to(torch.int32), query_start_loc.to(torch.int32), scale, window,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        out.stride(0), out.stride(1), tables.stride(0),
        GROUP=num_heads // k_cache.shape[2], BLOCK_SIZE=k_cache.shape[1], HEAD_DIM=head_dim,
        BLOCK_D=max(16, triton.next_power_of_2(head_dim)), BLOCK_M=BLOCK_M,
        DOT_F32=q.dtype == torch.float32 or _interpreting(),
    )  # fmt: skip
    return out
