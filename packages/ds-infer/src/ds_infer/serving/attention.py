"""Attention over the paged KV cache for one ragged batch, and the per-step metadata it needs.

A step's batch is flat: ``T`` tokens from ``S`` sequences, sequence ``s`` contributing a run of
``q_len[s]`` consecutive tokens (a prefill chunk, or one decode token) that are the last ``q_len[s]``
of its ``ctx_len[s]`` cached tokens. Query ``i`` of that run sits at position
``ctx_len[s] - q_len[s] + i`` and attends to the sequence's keys ``0 .. position`` (causal), or to
the last ``window`` of them for a sliding-window layer.

:class:`AttentionMetadata` is built once per step from the block tables and shared by every layer.
Two implementations compute the same thing:

- :func:`paged_attention_torch`, the PyTorch path used on CPU: the decode rows of all sequences go
  through one batched ``scaled_dot_product_attention`` over keys gathered through the block tables
  (padded to the longest context, padding masked), each prefill chunk through its own call. Gather
  indices and masks are computed once per step (and window), not per layer.
- ``ds_ops::paged_attention`` (ds-ops), a ``torch.library`` op whose CUDA kernel is Triton and
  whose default is plain PyTorch; chosen on CUDA, or when ``attention_backend='ds_ops'``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["AttentionMetadata", "PrefillChunk", "paged_attention_torch", "build_metadata"]


@dataclass
class PrefillChunk:
    """A run of more than one query of one sequence: rows ``start .. start + rows`` of the batch."""

    start: int
    rows: int
    ctx: int
    slots: Tensor  # (ctx,) long: cache slot of each context position


@dataclass
class AttentionMetadata:
    """Where each token's K/V goes and what each query attends to, for one step (all layers)."""

    num_tokens: int
    block_size: int
    positions: Tensor  # (T,) long: each token's position in its sequence
    slot_mapping: Tensor  # (T,) long: cache slot (block * block_size + offset) of each token
    # decode group: sequences contributing exactly one query token
    decode_rows: Tensor | None  # (Sd,) long: their token's row in the flat batch
    decode_slots: Tensor | None  # (Sd * Lmax,) long: cache slot of each context position (padding: 0)
    decode_ctx: Tensor | None  # (Sd,) long: context length
    decode_lmax: int
    decode_all: bool  # every token of the batch is a decode token (rows are 0..T-1)
    prefills: list[PrefillChunk]
    # the same batch in the layout of ds_ops::paged_attention
    block_tables: Tensor  # (S, max_blocks) int32
    seq_lens: Tensor  # (S,) int32: context length after this step
    query_start_loc: Tensor  # (S + 1,) int32
    max_query_len: int
    _masks: dict = field(default_factory=dict, repr=False)

    def decode_mask(self, window: int | None) -> Tensor:
        """(Sd, 1, 1, Lmax) bool: context positions each decode query sees."""
        key = ("decode", window)
        if key not in self._masks:
            pos = torch.arange(self.decode_lmax, device=self.decode_ctx.device)[None, :]
            keep = pos < self.decode_ctx[:, None]
            if window is not None:
                keep &= pos >= self.decode_ctx[:, None] - window
            self._masks[key] = keep[:, None, None, :]
        return self._masks[key]

    def prefill_mask(self, i: int, window: int | None) -> Tensor | None:
        """(rows, ctx) bool for prefill chunk ``i``, or None when plain top-left causal does it."""
        key = (i, window)
        if key not in self._masks:
            chunk = self.prefills[i]
            if chunk.ctx == chunk.rows and (window is None or window >= chunk.ctx):
                mask = None
            else:
                dev = chunk.slots.device
                diff = torch.arange(chunk.ctx - chunk.rows, chunk.ctx, device=dev)[:, None] - \
                    torch.arange(chunk.ctx, device=dev)[None, :]
                mask = diff >= 0
                if window is not None:
                    mask &= diff < window
            self._masks[key] = mask
        return self._masks[key]


def build_metadata(chunks: list[tuple[list[int], int, int]], block_size: int, device: torch.device | str,
                   *, with_torch_path: bool = True) -> AttentionMetadata:  # fmt: skip
    """Metadata for a batch of ``(block_table, num_computed_tokens, num_new_tokens)`` chunks, in batch order."""
    num_seqs = len(chunks)
    max_blocks = max(len(table) for table, _, _ in chunks)
    tables = torch.zeros(num_seqs, max_blocks, dtype=torch.long)
    for s, (table, _, _) in enumerate(chunks):
        tables[s, : len(table)] = torch.tensor(table, dtype=torch.long)
    q_lens = torch.tensor([n for _, _, n in chunks], dtype=torch.long)
    ctx_lens = torch.tensor([c + n for _, c, n in chunks], dtype=torch.long)
    starts = torch.zeros(num_seqs + 1, dtype=torch.long)
    torch.cumsum(q_lens, 0, out=starts[1:])
    total = int(starts[-1])

    # slot of every token: position p of sequence s lives at tables[s, p // bs] * bs + p % bs
    seq_of_token = torch.repeat_interleave(torch.arange(num_seqs), q_lens)
    pos = torch.arange(total) - starts[:-1][seq_of_token] + (ctx_lens - q_lens)[seq_of_token]
    slot_mapping = tables[seq_of_token, pos // block_size] * block_size + pos % block_size

    decode_rows = decode_slots = decode_ctx = None
    decode_lmax = 0
    prefills: list[PrefillChunk] = []
    decode_all = False
    if with_torch_path:
        is_decode = q_lens == 1
        offsets = torch.arange(block_size)
        if bool(is_decode.any()):
            d = is_decode.nonzero().squeeze(1)
            decode_lmax = int(ctx_lens[d].max())
            nb = -(-decode_lmax // block_size)
            slots = (tables[d, :nb, None] * block_size + offsets).reshape(len(d), nb * block_size)
            decode_rows = starts[d].to(device)
            decode_slots = slots[:, :decode_lmax].reshape(-1).to(device)
            decode_ctx = ctx_lens[d].to(device)
            decode_all = len(d) == num_seqs
        for s in (~is_decode).nonzero().squeeze(1).tolist():
            rows, ctx = int(q_lens[s]), int(ctx_lens[s])
            nb = -(-ctx // block_size)
            slots = (tables[s, :nb, None] * block_size + offsets).reshape(-1)[:ctx]
            prefills.append(PrefillChunk(int(starts[s]), rows, ctx, slots.to(device)))

    return AttentionMetadata(
        num_tokens=total,
        block_size=block_size,
        positions=pos.to(device),
        slot_mapping=slot_mapping.to(device),
        decode_rows=decode_rows,
        decode_slots=decode_slots,
        decode_ctx=decode_ctx,
        decode_lmax=decode_lmax,
        decode_all=decode_all,
        prefills=prefills,
        block_tables=tables.to(device=device, dtype=torch.int32),
        seq_lens=ctx_lens.to(device=device, dtype=torch.int32),
        query_start_loc=starts.to(device=device, dtype=torch.int32),
        max_query_len=int(q_lens.max()),
    )


def paged_attention_torch(q: Tensor, k_cache: Tensor, v_cache: Tensor, meta: AttentionMetadata,
                          scale: float, window: int | None = None) -> Tensor:  # fmt: skip
    """Causal attention of ``q`` (T, Hq, D) over the cached keys/values of each token's sequence.

    ``k_cache``/``v_cache`` are one layer's ``(num_slots, Hkv, D)`` views, already holding this step's
    keys and values. Hq must be a multiple of Hkv (grouped-query attention).
    """
    gqa = q.shape[1] != k_cache.shape[1]
    if meta.decode_rows is not None:
        n, lmax = len(meta.decode_ctx), meta.decode_lmax
        k = k_cache.index_select(0, meta.decode_slots).view(n, lmax, *k_cache.shape[1:]).transpose(1, 2)
        v = v_cache.index_select(0, meta.decode_slots).view(n, lmax, *v_cache.shape[1:]).transpose(1, 2)
        qd = q if meta.decode_all else q.index_select(0, meta.decode_rows)
        o = F.scaled_dot_product_attention(qd.unsqueeze(2), k, v, attn_mask=meta.decode_mask(window),
                                           scale=scale, enable_gqa=gqa).squeeze(2)  # fmt: skip
        if meta.decode_all:
            return o
        out = torch.empty_like(q)
        out[meta.decode_rows] = o
    else:
        out = torch.empty_like(q)
    for i, chunk in enumerate(meta.prefills):
        k = k_cache.index_select(0, chunk.slots).transpose(0, 1).unsqueeze(0)
        v = v_cache.index_select(0, chunk.slots).transpose(0, 1).unsqueeze(0)
        qs = q[chunk.start:chunk.start + chunk.rows].transpose(0, 1).unsqueeze(0)
        mask = meta.prefill_mask(i, window)
        o = F.scaled_dot_product_attention(qs, k, v, attn_mask=mask, is_causal=mask is None, scale=scale,
                                           enable_gqa=gqa)  # fmt: skip
        out[chunk.start:chunk.start + chunk.rows] = o.squeeze(0).transpose(0, 1)
    return out
