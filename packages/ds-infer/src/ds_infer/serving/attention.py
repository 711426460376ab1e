"""Attention over the paged KV cache for one ragged batch, and the per-step metadata it needs.

A step's batch is flat: ``T`` tokens from ``S`` sequences, sequence ``s`` contributing a run of
``q_len[s]`` consecutive tokens (a prefill chunk, or one decode token) that are the last ``q_len[s]``
of its ``ctx_len[s]`` cached tokens. Query ``i`` of that run sits at position
``ctx_len[s] - q_len[s] + i`` and attends to the sequence's keys ``0 .. position`` (causal), or to
the last ``window`` of them for a sliding-window layer.

:class:`AttentionMetadata` is built once per step from the block tables and shared by every layer.
Two implementations compute the same thing:

- :func:`paged_attention_torch`, the PyTorch path used on CPU: decode rows go through batched
  ``scaled_dot_product_attention`` calls over keys gathered through the block tables, padded to the
  longest context of their group (padding masked); decode sequences are sorted by context length and
  cut into up to :data:`MAX_DECODE_GROUPS` groups, so a few long contexts do not make every row pay
  for their padding. Each prefill chunk has its own call. Gather indices and masks are computed once
  per step (and window), not per layer.
- ``ds_ops::paged_attention`` (ds-ops), a ``torch.library`` op whose CUDA kernel is Triton and
  whose default is plain PyTorch; chosen on CUDA, or when ``attention_backend='ds_ops'``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["AttentionMetadata", "DecodeGroup", "PrefillChunk", "paged_attention_torch", "build_metadata"]

MAX_DECODE_GROUPS = 4
MIN_DECODE_GROUP = 8  # sequences per group below which another call costs more than the padding saved


@dataclass
class DecodeGroup:
    """Decode sequences attended in one call: their rows, context rows padded to ``lmax``, lengths."""

    rows: Tensor  # (n,) long: each sequence's token row in the flat batch
    kv_rows: Tensor  # (n * Hkv * lmax,) long: rows of the cache's (slots * Hkv, D) view (see the note)
    ctx: Tensor  # (n,) long
    lmax: int


@dataclass
class PrefillChunk:
    """A run of more than one query of one sequence: rows ``start .. start + rows`` of the batch."""

    start: int
    rows: int
    ctx: int
    kv_rows: Tensor  # (Hkv * ctx,) long: rows of the cache's (slots * Hkv, D) view (see the note)


@dataclass
class AttentionMetadata:
    """Where each token's K/V goes and what each query attends to, for one step (all layers)."""

    num_tokens: int
    block_size: int
    positions: Tensor  # (T,) long: each token's position in its sequence
    slot_mapping: Tensor  # (T,) long: cache slot (block * block_size + offset) of each token
    # sequences contributing exactly one query token, in groups of similar context length
    decode_groups: list[DecodeGroup]
    decode_all: bool  # one group holding every token of the batch, rows 0..T-1 in order
    prefills: list[PrefillChunk]
    # the same batch in the layout of ds_ops::paged_attention
    block_tables: Tensor  # (S, max_blocks) int32
    seq_lens: Tensor  # (S,) int32: context length after this step
    query_start_loc: Tensor  # (S + 1,) int32
    max_query_len: int
    _masks: dict = field(default_factory=dict, repr=False)

    def decode_mask(self, i: int, window: int | None) -> Tensor:
        """(n, 1, 1, lmax) bool for decode group ``i``: context positions each query sees."""
        key = ("decode", i, window)
        if key not in self._masks:
            group = self.decode_groups[i]
            pos = torch.arange(group.lmax, device=group.ctx.device)[None, :]
            keep = pos < group.ctx[:, None]
            if window is not None:
                keep &= pos >= group.ctx[:, None] - window
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
                dev = chunk.kv_rows.device
                diff = torch.arange(chunk.ctx - chunk.rows, chunk.ctx, device=dev)[:, None] - \
                    torch.arange(chunk.ctx, device=dev)[None, :]
                mask = diff >= 0
                if window is not None:
                    mask &= diff < window
            self._masks[key] = mask
        return self._masks[key]


def _head_major(slots: Tensor, num_kv_heads: int) -> Tensor:
    """Rows of the ``(slots * Hkv, D)`` view holding ``slots`` of every head, ordered head by head."""
    heads = torch.arange(num_kv_heads)
    return (slots[..., None, :] * num_kv_heads + heads[:, None]).reshape(-1)


def build_metadata(chunks: list[tuple[list[int], int, int]], block_size: int, device: torch.device | str,
                   *, num_kv_heads: int = 1, with_torch_path: bool = True) -> AttentionMetadata:  # fmt: skip
    """Metadata for a batch of ``(block_table, num_computed_tokens, num_new_tokens)`` chunks, in batch order.

    [Note: head-major gathers] The cache of a layer is ``(slots, Hkv, D)``; seen as ``(slots * Hkv, D)``
    its row ``slot * Hkv + h`` is one head's key at one slot. Gathering the rows ordered (sequence,
    head, position) yields keys already laid out ``(n, Hkv, L, D)`` and contiguous, which
    ``scaled_dot_product_attention`` reads at full speed (about twice as fast as a strided view).
    """
    num_seqs = len(chunks)
    max_blocks = max(len(table) for table, _, _ in chunks)
    tables = torch.tensor([table + [0] * (max_blocks - len(table)) for table, _, _ in chunks], dtype=torch.long)
    q_lens = torch.tensor([n for _, _, n in chunks], dtype=torch.long)
    ctx_lens = torch.tensor([c + n for _, c, n in chunks], dtype=torch.long)
    starts = torch.zeros(num_seqs + 1, dtype=torch.long)
    torch.cumsum(q_lens, 0, out=starts[1:])
    total = int(starts[-1])

    # slot of every token: position p of sequence s lives at tables[s, p // bs] * bs + p % bs
    seq_of_token = torch.repeat_interleave(torch.arange(num_seqs), q_lens)
    pos = torch.arange(total) - starts[:-1][seq_of_token] + (ctx_lens - q_lens)[seq_of_token]
    slot_mapping = tables[seq_of_token, pos // block_size] * block_size + pos % block_size

    groups: list[DecodeGroup] = []
    prefills: list[PrefillChunk] = []
    decode_all = False
    if with_torch_path:
        is_decode = q_lens == 1
        offsets = torch.arange(block_size)
        decode = is_decode.nonzero().squeeze(1)
        parts = min(MAX_DECODE_GROUPS, max(1, len(decode) // MIN_DECODE_GROUP))
        if parts > 1:  # similar lengths together: less padding to gather and attend over
            decode = decode[torch.argsort(ctx_lens[decode], stable=True)]
        for d in torch.tensor_split(decode, parts) if len(decode) else ():
            lmax = int(ctx_lens[d].max())
            nb = -(-lmax // block_size)
            slots = (tables[d, :nb, None] * block_size + offsets).reshape(len(d), nb * block_size)[:, :lmax]
            groups.append(DecodeGroup(starts[d].to(device), _head_major(slots, num_kv_heads).to(device),
                                      ctx_lens[d].to(device), lmax))  # fmt: skip
        decode_all = parts == 1 and len(decode) == num_seqs
        for s in (~is_decode).nonzero().squeeze(1).tolist():
            rows, ctx = int(q_lens[s]), int(ctx_lens[s])
            nb = -(-ctx // block_size)
            slots = (tables[s, :nb, None] * block_size + offsets).reshape(-1)[:ctx]
            prefills.append(PrefillChunk(int(starts[s]), rows, ctx, _head_major(slots, num_kv_heads).to(device)))

    return AttentionMetadata(
        num_tokens=total,
        block_size=block_size,
        positions=pos.to(device),
        slot_mapping=slot_mapping.to(device),
        decode_groups=groups,
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
    num_heads, (num_kv_heads, head_dim) = q.shape[1], k_cache.shape[1:]
    gqa = num_heads != num_kv_heads
    k_rows, v_rows = k_cache.view(-1, head_dim), v_cache.view(-1, head_dim)
    out = None if meta.decode_all else torch.empty_like(q)
    for i, group in enumerate(meta.decode_groups):
        n, lmax = len(group.ctx), group.lmax
        k = k_rows.index_select(0, group.kv_rows).view(n, num_kv_heads, lmax, head_dim)
        v = v_rows.index_select(0, group.kv_rows).view(n, num_kv_heads, lmax, head_dim)
        qd = q if meta.decode_all else q.index_select(0, group.rows)
        # one query per sequence: fold the query heads sharing a kv head into the query axis
        o = F.scaled_dot_product_attention(qd.view(n, num_kv_heads, num_heads // num_kv_heads, head_dim), k, v,
                                           attn_mask=meta.decode_mask(i, window), scale=scale)  # fmt: skip
        o = o.reshape(n, num_heads, head_dim)
        if meta.decode_all:
            return o
        out.index_copy_(0, group.rows, o)
    for i, chunk in enumerate(meta.prefills):
        k = k_rows.index_select(0, chunk.kv_rows).view(1, num_kv_heads, chunk.ctx, head_dim)
        v = v_rows.index_select(0, chunk.kv_rows).view(1, num_kv_heads, chunk.ctx, head_dim)
        qs = q[chunk.start:chunk.start + chunk.rows].transpose(0, 1).unsqueeze(0)
        mask = meta.prefill_mask(i, window)
        o = F.scaled_dot_product_attention(qs, k, v, attn_mask=mask, is_causal=mask is None, scale=scale,
                                           enable_gqa=gqa)  # fmt: skip
        out[chunk.start:chunk.start + chunk.rows] = o.squeeze(0).transpose(0, 1)
    return out
