"""The paged KV cache's tensors and the attention backend a model's layers call during a step.

Storage: per layer one ``(num_blocks * block_size, Hkv, D)`` tensor for keys and one for values,
allocated once from the memory budget; :mod:`ds_infer.serving.block_manager` decides which blocks
belong to whom. :class:`PagedAttention` is the ``kv`` object handed to
``model.forward(input_ids, positions, kv)``: each attention layer calls
``kv.attend(layer, q, k, v, scale=..., window=...)`` with ``q [1, T, Hq, D]`` and the new
``k, v [1, T, Hkv, D]``; it writes the new keys and values to their slots and attends every query
over its own sequence's blocks.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .attention import AttentionMetadata, paged_attention_torch

__all__ = ["PagedKVCache", "PagedAttention"]


class PagedKVCache:
    """Keys and values of ``num_blocks`` blocks for every layer (on this rank)."""

    def __init__(self, num_layers: int, num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str) -> None:  # fmt: skip
        self.num_layers, self.num_blocks, self.block_size = num_layers, num_blocks, block_size
        self.num_kv_heads, self.head_dim, self.dtype = num_kv_heads, head_dim, dtype
        self.device = torch.device(device)
        shape = (num_blocks * block_size, num_kv_heads, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]

    @staticmethod
    def bytes_per_block(num_layers: int, block_size: int, num_kv_heads: int, head_dim: int,
                        dtype: torch.dtype) -> int:  # fmt: skip
        return 2 * num_layers * block_size * num_kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.k, *self.v))

    def _blocks(self, t: Tensor) -> Tensor:
        return t.view(self.num_blocks, self.block_size, self.num_kv_heads, self.head_dim)

    def copy_out(self, blocks: list[int]) -> Tensor:
        """Host copy ``(layers, 2, len(blocks), block_size, Hkv, D)`` of ``blocks`` (swap out)."""
        idx = torch.tensor(blocks, dtype=torch.long, device=self.device)
        parts = [torch.stack([self._blocks(k).index_select(0, idx), self._blocks(v).index_select(0, idx)])
                 for k, v in zip(self.k, self.v)]  # fmt: skip
        pin = self.device.type == "cuda"
        host = torch.empty((self.num_layers, 2, len(blocks), self.block_size, self.num_kv_heads, self.head_dim),
                           dtype=self.dtype, pin_memory=pin)  # fmt: skip
        host.copy_(torch.stack(parts))
        return host

    def copy_in(self, host: Tensor, blocks: list[int]) -> None:
        """Write a :meth:`copy_out` result into ``blocks`` (swap in)."""
        idx = torch.tensor(blocks, dtype=torch.long, device=self.device)
        data = host.to(self.device, non_blocking=True)
        for layer, (k, v) in enumerate(zip(self.k, self.v)):
            self._blocks(k).index_copy_(0, idx, data[layer, 0])
            self._blocks(v).index_copy_(0, idx, data[layer, 1])


class PagedAttention:
    """The ``kv`` backend of one step: stores new keys/values, attends over the block tables."""

    def __init__(self, cache: PagedKVCache, meta: AttentionMetadata, use_op: bool = False) -> None:
        self.cache, self.meta, self.use_op = cache, meta, use_op
        if use_op:
            from ds_core.ops import get_op

            self._op = get_op("paged_attention")
            if self._op is None:
                raise RuntimeError("attention_backend='ds_ops' needs ds-ops installed (pip install ds-ops[cuda])")

    def attend(self, layer: int, q: Tensor, k: Tensor, v: Tensor, *, scale: float,
               window: int | None = None) -> Tensor:  # fmt: skip
        kc, vc = self.cache.k[layer], self.cache.v[layer]
        meta = self.meta
        batch = q.shape[0]
        q, k, v = q.reshape(-1, *q.shape[2:]), k.reshape(-1, *k.shape[2:]), v.reshape(-1, *v.shape[2:])
        kc.index_copy_(0, meta.slot_mapping, k.to(kc.dtype))
        vc.index_copy_(0, meta.slot_mapping, v.to(vc.dtype))
        if self.use_op:
            c = self.cache
            shape = (c.num_blocks, c.block_size, c.num_kv_heads, c.head_dim)
            out = self._op(q, kc.view(shape), vc.view(shape), meta.block_tables, meta.seq_lens,
                           meta.query_start_loc, meta.max_query_len, float(scale), int(window or 0))
        else:
            out = paged_attention_torch(q, kc, vc, meta, scale, window)
        return out.view(batch, -1, *out.shape[1:])
