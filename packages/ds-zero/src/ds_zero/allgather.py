"""One stage-3 all-gather of shards: started asynchronously, completed (and fingerprint-checked) on demand.

Each rank sends its shards of the gathered parameters end to end, behind a :class:`Fingerprint`
header (``fingerprint.py``); the output is ``world`` slots of ``header + shards``. :meth:`wait`
checks every rank's header against this rank's, then points each parameter's ``data`` at its full
tensor (one copy per parameter out of the rank-interleaved slots). While it is in flight each
shard's ``inflight`` attribute names it, so whoever needs the parameter first waits for it instead of
gathering it again. A shared ``queue`` (oldest first) makes waits complete earlier gathers first, so
a fingerprint mismatch is reported at the first collective that went wrong.

ZeRO++ (``zeropp.py``) adds two forms, chosen by the prefetcher identically on every rank:

- qwZ (``quant``: a block size): the shards travel block-quantized to int8 with fp32 scales, header
  and codes and scales as one ``uint8`` message, and are dequantized on arrival. Only the gathered
  copy is approximate: the shard and the fp32 masters are never touched.
- hpZ (``hpz``: a :class:`~ds_zero.zeropp.SecondaryPartition`): a gather with ``keep`` set leaves each
  parameter's *secondary shard* (its 1/k of the gathered tensor, k the secondary group's size) on the
  shard; a gather of parameters that all have one runs over the secondary group only, from those
  shards, exactly (no quantization: backward then sees bit for bit the weights the forward used).
"""

from __future__ import annotations

from collections import deque

import torch

from ds_core import comm

from .fingerprint import PLAIN, Fingerprint, check_rows, decode_rows, header_len, key_of, wait_bounded
from .quantize import dequantize_rows, quantize_rows, row_bytes
from .released import raw_data, set_raw_data

__all__ = ["PendingGather", "plain_fingerprint", "notice_round", "wire_numel"]


def wire_numel(length: int, dtype: torch.dtype, quant: int) -> int:
    """Elements each rank sends in a gather of ``length`` elements (header included) of ``dtype``:
    ``length`` itself, or with ``quant`` (a block size) the bytes of the header and the int8 row."""
    if not quant:
        return length
    head = header_len(dtype)
    return head * torch.empty((), dtype=dtype).element_size() + row_bytes(length - head, quant)


def plain_fingerprint(items, tag: str | None = None) -> Fingerprint:
    """The header of a gather outside the module hooks (GatheredParameters, checkpoints, the step)."""
    names = tag or ", ".join(s.name for s in items[:3]) + (f" and {len(items) - 3} more" if len(items) > 3 else "")
    dtype = getattr(items[0], "dtype", None) or items[0].shard.dtype  # no NVMe read just for the dtype
    length = header_len(dtype) + sum(s.part for s in items)
    return Fingerprint(PLAIN, 0, key_of(names), 0, length)


class PendingGather:
    """The all-gather of ``items`` (every rank passes the same list), started by the constructor."""

    def __init__(self, items: list, group, fp: Fingerprint, queue: deque | None = None,
                 timeout: float | None = None, quant: int = 0, hpz=None, keep: bool = False) -> None:
        self.items, self.fp, self.queue, self.timeout = items, fp, queue, timeout
        # hpZ: every item has its secondary shard -> gather within the secondary group, from those
        self.secondary = hpz is not None and all(getattr(s, "secondary", None) is not None for s in items)
        self.hpz = hpz if (self.secondary or keep) else None
        self.group = group = hpz.group if self.secondary else group
        s0 = items[0]
        self.world = comm.get_world_size(group)
        self.quant = quant if self.world > 1 and not self.secondary else 0
        self.done = False
        self.dtype, device = dtype, device = getattr(s0, "dtype", None) or s0.shard.dtype, s0.device
        self.widths = [s.padded // self.world for s in items]
        self.header = header_len(dtype) if self.world > 1 else 0
        with torch.no_grad():
            if self.secondary:
                pieces = [s.secondary for s in items]
            else:
                pieces = [s.shard.to(device, non_blocking=True) for s in items]  # from host memory under offload
            if self.quant:
                payload = torch.cat(pieces) if len(pieces) > 1 else pieces[0]
                self.payload = payload.numel()
                pieces = [fp.encode(dtype, device).view(torch.uint8),
                          quantize_rows(payload.view(1, -1), self.quant)[0]]
                self.header *= torch.empty((), dtype=dtype).element_size()  # in bytes
            elif self.world > 1:
                pieces.insert(0, fp.encode(dtype, device))
            send = torch.cat(pieces) if len(pieces) > 1 else pieces[0]
            self.send = send  # referenced until the collective is waited for
            self.slot = send.numel()
            if self.world == 1:
                self.out, self.work = send, None
            else:
                self.out = torch.empty(self.world * self.slot, dtype=send.dtype, device=device)
                self.work = comm.all_gather(self.out, send, group=group, async_op=True)
        for s in items:
            s.inflight = self
        if queue is not None:
            queue.append(self)

    def rows(self) -> list[Fingerprint | None]:
        """Every rank's header (after :meth:`wait_raw`)."""
        return decode_rows(self.out.view(self.world, self.slot)[:, :self.header])

    def wait_raw(self) -> None:
        """Wait for this gather (and, first, every older one in the queue), without installing anything."""
        if self.queue is not None:
            while self.queue and self.queue[0] is not self:
                self.queue[0].wait()
            if self.queue and self.queue[0] is self:
                self.queue.popleft()
        if self.work is not None:
            work, self.work = self.work, None
            wait_bounded(work, self.timeout, self.fp, comm.get_rank(self.group))
        self.send = None

    def wait(self) -> None:
        """Complete the gather: check every rank's fingerprint, then install the full parameters."""
        if self.done:
            return
        self.done = True
        try:
            self.wait_raw()
        finally:
            for s in self.items:
                if getattr(s, "inflight", None) is self:
                    s.inflight = None
        if self.world > 1:
            check_rows(self.rows(), self.fp, comm.get_rank(self.group))
        grid = self.out.view(self.world, self.slot)
        off = self.header
        with torch.no_grad():
            if self.quant:  # [world, payload] in the model's dtype
                grid = dequantize_rows(grid[:, off:], self.payload, self.quant, dtype=self.dtype)
                off = 0
            for s, width in zip(self.items, self.widths):
                padded = grid[:, off:off + width].reshape(-1)
                off += width
                if self.hpz is not None and not self.secondary and not s.persistent:
                    s.secondary = self.hpz.slice(padded).clone()
                full = padded[:s.numel].view(s.shape)
                if s.persistent and s.gathered:
                    raw_data(s.param).copy_(full)
                else:
                    set_raw_data(s.param, full)
                s.gathered = True
        self.out = None


def notice_round(fp: Fingerprint, length: int, dtype: torch.dtype, device, group, timeout: float | None,
                 queue: deque | None = None, quant: int = 0) -> list[Fingerprint | None]:
    """Send ``fp`` in an all-gather of ``length`` elements per rank — the length of the gather the other
    ranks are expected to issue next — and return every rank's header (not checked). Used by a rank
    that is about to deviate from the step's recorded collectives: its peers receive its fingerprint
    in place of the data they expected, so no rank ever issues a gather of another size."""
    if queue is not None:
        while queue:
            queue[0].wait()
    world = comm.get_world_size(group)
    head = fp.encode(dtype, device)
    if quant:  # shaped like a qwZ gather: bytes
        head, length, dtype = head.view(torch.uint8), wire_numel(length, dtype, quant), torch.uint8
    send = torch.zeros(length, dtype=dtype, device=device)
    send[:head.numel()] = head
    out = torch.empty(world * length, dtype=dtype, device=device)
    work = comm.all_gather(out, send, group=group, async_op=True)
    wait_bounded(work, timeout, fp, comm.get_rank(group))
    return decode_rows(out.view(world, length)[:, :head.numel()])
