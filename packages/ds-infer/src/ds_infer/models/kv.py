"""Attention backends: where a layer's keys and values live and how attention over them is computed.

Every attention layer of a native model hands its rotated ``q [B, T, Hq, D]`` and new
``k, v [B, T, Hkv, D]`` to the backend object passed to ``model.forward(..., kv)``::

    out = kv.attend(layer_idx, q, k, v, scale=..., window=...)   # -> [B, T, Hq, D]

The backend stores ``k, v`` wherever it keeps them and attends ``q`` causally over everything the
sequence has so far. Here are two backends:

- :class:`NoCache`: attention within the tokens of this forward only (scoring a full sequence,
  perplexity, training-style prefill), with optional left padding;
- :class:`StaticKVCache`: one preallocated ``[B, Hkv, max_len, D]`` buffer per layer, the decode
  loop's cache. Its decode step can run with a device-side write position so the step has static
  shapes and can be captured (``torch.compile``, CUDA graphs).

A paged cache (serving) is a third implementation of the same one-method protocol,
:class:`KVBackend`. Grouped-query attention is left to the backend: ``Hq`` is a multiple of
``Hkv`` and query head ``h`` reads kv head ``h // (Hq // Hkv)``.

[Note: slots and positions] A static cache's batch rows advance in lock step: step ``s`` of every
row goes to slot ``s``. Left-padded prompts leave invalid slots at the start of shorter rows;
:attr:`StaticKVCache.valid` masks them. Rotary positions are per token and come from the caller;
within a row valid slots are contiguous, so slot distances equal position distances and sliding
windows can be applied in slot space.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["KVBackend", "KVSpec", "NoCache", "StaticKVCache", "sdpa"]


@runtime_checkable
class KVBackend(Protocol):
    """What an attention layer calls. ``window``: sliding window in tokens (key kept when
    ``q_pos - k_pos < window``), ``None`` for full causal attention."""

    def attend(self, layer: int, q: Tensor, k: Tensor, v: Tensor, *, scale: float,
               window: int | None = None) -> Tensor: ...


@dataclass(frozen=True)
class KVSpec:
    """What a cache must hold for a model on this rank (``model.kv_spec()``)."""

    num_layers: int
    num_kv_heads: int  # on this rank (after tensor-parallel sharding)
    head_dim: int
    dtype: torch.dtype
    device: torch.device
    sliding_windows: tuple[int | None, ...]

    def bytes_per_token(self) -> int:
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * torch.empty((), dtype=self.dtype).element_size()


def sdpa(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, scale: float, causal: bool = False) -> Tensor:
    """``q [B, Hq, T, D]``, ``k, v [B, Hkv, L, D]`` -> ``[B, Hq, T, D]`` with grouped-query heads.

    One query per row (decoding): the query heads of a group are folded into the query axis,
    ``[B, Hkv, G, D]``, so the keys are read once per kv head and never repeated; a ``[B, 1, 1, L]``
    mask broadcasts over the group. Longer queries use SDPA's own grouped-query support.
    """
    hq, hkv = q.shape[1], k.shape[1]
    if hkv != hq:
        b, _, t, d = q.shape
        if t == 1 and not causal:
            out = F.scaled_dot_product_attention(q.reshape(b, hkv, hq // hkv, d), k, v, attn_mask=mask, scale=scale)
            return out.reshape(b, hq, 1, d)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal and mask is None,
                                              scale=scale, enable_gqa=True)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal and mask is None, scale=scale)


def _causal_mask(q_slots: Tensor, k_slots: Tensor, window: int | None) -> Tensor:
    """Bool ``[T, L]``: key slot visible to query slot (causal, optionally windowed)."""
    diff = q_slots[:, None] - k_slots[None, :]
    keep = diff >= 0
    if window is not None:
        keep = keep & (diff < window)
    return keep


class NoCache:
    """Causal attention among the tokens of one forward; nothing is kept.

    ``padding_mask [B, T]`` (1 = real token, 0 = left padding) excludes pad keys; a pad query
    attends only to itself so its (unused) output stays finite.
    """

    def __init__(self, padding_mask: Tensor | None = None) -> None:
        self.padding_mask = padding_mask.bool() if padding_mask is not None else None
        self._masks: dict[int | None, Tensor | None] = {}

    def _mask(self, t: int, window: int | None, device: torch.device) -> Tensor | None:
        if window in self._masks:
            return self._masks[window]
        if self.padding_mask is None and (window is None or window >= t):
            mask = None
        else:
            slots = torch.arange(t, device=device)
            keep = _causal_mask(slots, slots, window)[None]
            if self.padding_mask is not None:
                keep = (keep & self.padding_mask[:, None, :]) | torch.eye(t, dtype=torch.bool, device=device)
            mask = keep[:, None]
        self._masks[window] = mask
        return mask

    def attend(self, layer: int, q: Tensor, k: Tensor, v: Tensor, *, scale: float,
               window: int | None = None) -> Tensor:
        mask = self._mask(q.shape[1], window, q.device)
        out = sdpa(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), mask, scale, causal=mask is None)
        return out.transpose(1, 2)


class StaticKVCache:
    """Preallocated keys/values for ``batch`` rows of up to ``max_len`` tokens (see the module note).

    Use: ``begin(num_tokens)`` before a forward, ``end()`` after it (advances the write offset).
    ``begin_static(offset_tensor)`` is the capture-friendly decode step: one token per row written
    at a device-side offset, attention over the whole buffer with a mask, no host synchronisation.
    """

    def __init__(self, spec: KVSpec, batch: int, max_len: int) -> None:
        self.spec, self.batch, self.max_len = spec, batch, max_len
        shape = (batch, spec.num_kv_heads, max_len, spec.head_dim)
        self.k = [torch.zeros(shape, dtype=spec.dtype, device=spec.device) for _ in range(spec.num_layers)]
        self.v = [torch.zeros(shape, dtype=spec.dtype, device=spec.device) for _ in range(spec.num_layers)]
        self.valid = torch.ones(batch, max_len, dtype=torch.bool, device=spec.device)
        self.has_padding = False
        self.offset = 0
        self._t = 0
        self._static_pos: Tensor | None = None
        self._span = max_len
        self._masks: dict[int | None, Tensor | None] = {}

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.k, *self.v))

    def reset(self, padding_mask: Tensor | None = None) -> None:
        """Empty the cache; ``padding_mask [B, P]`` marks the left-padded prompt about to be written."""
        self.offset = 0
        self.valid.fill_(True)
        self.has_padding = False
        if padding_mask is not None and not bool(padding_mask.all()):
            self.valid[:, : padding_mask.shape[1]] = padding_mask.bool()
            self.has_padding = True

    def begin(self, num_tokens: int) -> None:
        if self.offset + num_tokens > self.max_len:
            raise ValueError(f"StaticKVCache: {self.offset} cached + {num_tokens} new tokens exceed max_len "
                             f"{self.max_len}; allocate the cache for prompt + max_new_tokens")
        self._t, self._static_pos = num_tokens, None
        self._masks.clear()

    def begin_static(self, offset: Tensor, span: int | None = None) -> None:
        """One token per row at slot ``offset`` (a 0-dim long tensor on the cache's device),
        attending over the first ``span`` slots (default: all of them; the caller keeps
        ``offset < span``). A fixed ``span`` keeps the shapes static; see :meth:`static_span`."""
        self._t, self._static_pos = 1, offset
        self._span = self.max_len if span is None else span
        self._masks.clear()

    def static_span(self, offset: int, minimum: int = 64) -> int:
        """The slots a static step writing slot ``offset`` attends over: the smallest power of two
        (at least ``minimum``) above ``offset``, capped at ``max_len``.

        [Note: attention span buckets] The static step's shapes must not change every step, but
        attending over the whole buffer reads every slot's keys and values however few are filled
        — at batch 8 on a small model that is as many bytes as the weights. Powers of two bound
        the waste to 2x the filled length and the number of distinct shapes (captured graphs) to
        ``log2(max_len / minimum) + 1``."""
        span = minimum
        while span <= offset:
            span *= 2
        return min(span, self.max_len)

    def end(self) -> None:
        self.offset += self._t

    def _mask(self, window: int | None) -> Tensor | None:
        if window in self._masks:
            return self._masks[window]
        device = self.valid.device
        if self._static_pos is not None:  # static decode: the whole buffer, future slots masked
            span = self._span
            slots = torch.arange(span, device=device)
            keep = slots <= self._static_pos
            if window is not None:
                keep = keep & (slots > self._static_pos - window)
            mask = (keep[None, :] & self.valid[:, :span])[:, None, None, :]
        else:
            start, t = self.offset, self._t
            length = start + t
            needs_window = window is not None and window < length
            if not self.has_padding and not needs_window and (t == 1 or start == 0):
                mask = None  # plain causal (t > 1 from the start) or everything visible (t == 1)
            else:
                q_slots = torch.arange(start, length, device=device)
                keep = _causal_mask(q_slots, torch.arange(length, device=device), window)[None]
                keep = keep & self.valid[:, None, :length]
                keep = keep | (q_slots[None, :, None] == torch.arange(length, device=device)[None, None])
                mask = keep[:, None]
        self._masks[window] = mask
        return mask

    def attend(self, layer: int, q: Tensor, k: Tensor, v: Tensor, *, scale: float,
               window: int | None = None) -> Tensor:
        kc, vc = self.k[layer], self.v[layer]
        k, v = k.transpose(1, 2), v.transpose(1, 2)  # [B, Hkv, T, D]
        if self._static_pos is not None:
            kc.index_copy_(2, self._static_pos.view(1), k)
            vc.index_copy_(2, self._static_pos.view(1), v)
            keys, values = kc[:, :, : self._span], vc[:, :, : self._span]
        else:
            start, end = self.offset, self.offset + self._t
            kc[:, :, start:end] = k
            vc[:, :, start:end] = v
            keys, values = kc[:, :, :end], vc[:, :, :end]
        mask = self._mask(window)
        causal = mask is None and self._t > 1
        return sdpa(q.transpose(1, 2), keys, values, mask, scale, causal=causal).transpose(1, 2)
