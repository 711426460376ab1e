"""Stage 3's gradient reducer: each parameter's gradient reduce-scattered into its owners' shards.

At stage 3 (Rajbhandari et al. 2020, section 5.3) a gradient has the layout of its parameter: N
equal shards of the padded flat tensor. Each parameter's post-accumulate-grad hook pads its
gradient into the open bucket, frees ``.grad`` and tells the coordinator the parameter may be
released. A bucket holds up to ``reduce_bucket_size`` elements (at least one parameter) and is
reduce-scattered as one collective (``reduce_scatter_tensor``; on gloo an all-reduce and a slice,
which is faster there — see ``reduce.py``): one collective for several parameters, where one per
parameter cost a round trip each through gloo's threads. The averaged shard is added to this rank's
fp32 gradient partition (laid out like :meth:`Stage3Group.own`), so gradient accumulation over
micro-steps keeps only the partition. With ``overlap_comm`` the collectives are asynchronous, at
most two in flight. ``reduce_bucket_size: 0`` and ZeRO++'s qgZ reduce each parameter on its own.

[Note: stage-3 bucket layout] for the all-reduce (gloo) a bucket is the parameters' padded flat
gradients end to end, and rank r's shard of a parameter at offset o is ``[o + r·P, o + (r+1)·P)``.
For ``reduce_scatter_tensor`` the bucket is a ``[N, C]`` matrix whose row r holds every parameter's
chunk r side by side (column offset c, width P), so the scatter hands rank r its row: its shards of
every parameter in the bucket, each at ``[c, c + P)``.

Collectives are issued in backward order, the same on every rank; parameters that got no gradient
in a micro-step (unused branches) are reduced as zeros in a fixed order by :meth:`finish`.

Once a parameter's gradient is launched the coordinator (``gather.py``) is told it may release the
parameter. The coordinator's per-step lifecycle (compare the forward's module order across ranks
before backward, end the step after it) is driven by the engine hooks the stage-3 strategy subscribes
to (``strategy.py``), not by this reducer.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from ds_core import comm
from ds_core.engine.reducer import weak_grad_hook

from .quantize import GRAD_BITS, GRAD_BLOCK, dequantize_rows, quantize_rows
from .reduce import MAX_IN_FLIGHT, GradientPartitions, gloo_prefers_all_reduce
from .stage3 import ShardedParameter, Stage3Partitions

__all__ = ["Stage3GradientReducer"]


class _Quantized(NamedTuple):
    """A qgZ all-to-all in flight: what arrives, and what is sent (kept alive until it completes)."""

    recv: torch.Tensor
    send: torch.Tensor
    nodes: int = 0  # hierarchical: the number of nodes (the inter-node step follows on completion)


class _Bucket:
    """The open bucket (see [Note: stage-3 bucket layout]): a buffer the hooks fill, and where each
    parameter lies in it — an element offset (all-reduce) or a column offset (reduce-scatter)."""

    def __init__(self, numel: int, world: int, dtype: torch.dtype, device: torch.device) -> None:
        self.buf = torch.empty(numel, dtype=dtype, device=device)
        self.world = world
        self.used = 0  # elements filled (a multiple of world)
        self.members: list[tuple[int, int, int]] = []  # (group index, parameter index, offset)


class _Flight(NamedTuple):
    """A bucket's collective in flight."""

    members: list[tuple[int, int, int]]
    out: torch.Tensor  # the reduced bucket (all-reduce) or this rank's row of it (reduce-scatter)
    send: torch.Tensor  # what was sent, kept alive until the collective completes
    work: object


class Stage3GradientReducer(GradientPartitions):
    """Reduces each sharded parameter's gradient into its owners' fp32 gradient partitions."""

    def __init__(self, parts: Stage3Partitions, ctx, overlap: bool, coordinator=None,
                 quantized: bool = False, nodes=None, bucket_numel: int = 0) -> None:
        self.device = ctx.device
        self.quantized = quantized  # ZeRO++ qgZ: see _launch_quantized
        self.nodes = nodes if quantized else None  # zeropp.NodeGroups: hierarchical qgZ
        self.overlap = overlap
        self.settings = ctx.reduce
        self.comm_dtype = ctx.reduce.comm_dtype
        self.parts = parts
        self.coordinator = coordinator
        self.handles: list = []
        self.gloo = gloo_prefers_all_reduce(parts.group)
        # qgZ quantizes each parameter's chunks on their own: no buckets there
        self.bucket_numel = 0 if quantized or parts.world == 1 else int(bucket_numel)
        self.total = sum(s.padded for g in parts.groups for s in g.sharded)
        self.grads = [torch.zeros(g.partition_numel, dtype=torch.float32, device=self.device)
                      for g in parts.groups]
        self.order: list[tuple[int, int]] = []
        for gi, g in enumerate(parts.groups):
            for i, s in enumerate(g.sharded):
                self.order.append((gi, i))
                self.handles.append(s.param.register_post_accumulate_grad_hook(weak_grad_hook(self._hook, gi, i)))
        self.begin(True)

    def begin(self, sync: bool) -> None:
        """Start a micro-step; stage 3 reduces every micro-step (``no_sync`` saves no communication)."""
        self.done: set[tuple[int, int]] = set()
        self.in_flight: list = []
        self.bucket: _Bucket | None = None
        self.launched = 0  # padded elements put in buckets this micro-step

    def _hook(self, gi: int, i: int, p: torch.Tensor) -> None:
        grad = p.grad
        p.grad = None
        self._launch(gi, i, grad)

    def _launch(self, gi: int, i: int, grad: torch.Tensor | None) -> None:
        s: ShardedParameter = self.parts.groups[gi].sharded[i]
        self.done.add((gi, i))
        if self.bucket_numel:
            self._add_to_bucket(gi, i, s, grad)
        else:
            self._launch_one(gi, i, s, grad)
        if self.coordinator is not None:
            self.coordinator.backward_done(s)
        self._throttle()

    def _throttle(self) -> None:
        limit = MAX_IN_FLIGHT if self.overlap else 0
        while len(self.in_flight) > limit:
            self._complete_oldest()

    def _add_to_bucket(self, gi: int, i: int, s: ShardedParameter, grad: torch.Tensor | None) -> None:
        b = self.bucket
        if b is not None and b.used + s.padded > b.buf.numel():
            self._flush()
            b = None
        if b is None:  # sized to what can still come this micro-step, so a small model gets no 5e8 buffer
            cap = min(self.bucket_numel // s.world * s.world, self.total - self.launched)
            b = self.bucket = _Bucket(max(cap, s.padded), s.world, self.comm_dtype or torch.float32, self.device)
        if self.gloo:  # padded flat gradients end to end
            offset = b.used
            dst = b.buf[offset:offset + s.padded].view(s.world, s.part)
        else:  # row r = chunk r of every parameter
            offset = b.used // s.world
            dst = b.buf.view(s.world, -1)[:, offset:offset + s.part]
        self._fill(dst, s, grad)
        b.members.append((gi, i, offset))
        b.used += s.padded
        self.launched += s.padded
        if b.used == b.buf.numel():  # full: nothing more fits
            self._flush()

    def _fill(self, dst: torch.Tensor, s: ShardedParameter, grad: torch.Tensor | None) -> None:
        """Write a parameter's padded gradient into ``dst``, a ``[world, part]`` view (rows are the ranks'
        chunks; contiguous or a column block of a bucket), without a padded temporary; prescaled."""
        if grad is None or not s.part:  # no gradient in this backward (an unused branch): zeros
            dst.zero_()
            return
        flat = grad.reshape(-1)
        rows, rest = divmod(s.numel, s.part)
        dst[:rows].copy_(flat[:rows * s.part].view(rows, s.part))
        if rest:
            dst[rows, :rest].copy_(flat[rows * s.part:])
            dst[rows, rest:].zero_()  # the padding
        dst[rows + (1 if rest else 0):].zero_()
        if self.settings.prescale:
            dst.mul_(self.settings.before)

    def _flush(self) -> None:
        """Launch the open bucket's collective (the same buckets in the same order on every rank)."""
        b, self.bucket = self.bucket, None
        if b is None or not b.members:
            return
        if self.gloo:
            out = send = b.buf[:b.used]
            work = comm.all_reduce(out, group=self.parts.group, async_op=True)
        else:
            send = b.buf.view(b.world, -1)[:, :b.used // b.world]
            send = send.contiguous().reshape(-1)  # a copy only when the bucket is not full
            out = torch.empty(b.used // b.world, dtype=b.buf.dtype, device=self.device)
            work = comm.reduce_scatter(out, send, group=self.parts.group, async_op=True)
        self.in_flight.append(_Flight(b.members, out, send, work))

    def _launch_one(self, gi: int, i: int, s: ShardedParameter, grad: torch.Tensor | None) -> None:
        """One parameter's collective (``reduce_bucket_size: 0``, qgZ, or a single rank)."""
        wire = torch.empty(s.padded, dtype=self.comm_dtype or torch.float32, device=self.device)
        self._fill(wire.view(s.world, s.part), s, grad)
        if s.world == 1:
            out, work = wire, None
        elif self.quantized:
            out, work = self._launch_quantized(s, wire)
        elif self.gloo:
            out, work = wire, comm.all_reduce(wire, group=self.parts.group, async_op=True)
        else:
            out = torch.empty(s.part, dtype=wire.dtype, device=self.device)
            work = comm.reduce_scatter(out, wire, group=self.parts.group, async_op=True)
        self.in_flight.append((gi, i, out, work))

    def _launch_quantized(self, s: ShardedParameter, wire: torch.Tensor):
        """ZeRO++ qgZ (Wang et al. 2023, section 3.3): the reduce-scatter as one all-to-all of quantized
        chunks. Chunk r of the padded gradient (rank r's part) is quantized on its own (int4, a fp32 scale
        per block) and sent to rank r, which dequantizes what every rank sent it and sums in fp32
        (:meth:`_complete_oldest`). Quantizing before the sum, not between ring hops, keeps the error to
        one rounding per rank."""
        if self.nodes is not None:
            return self._launch_hierarchical(s, wire)
        rows = quantize_rows(wire.view(s.world, s.part), GRAD_BLOCK, GRAD_BITS)
        recv = torch.empty_like(rows)
        work = comm.all_to_all(recv, rows.reshape(-1), group=self.parts.group, async_op=True)
        return _Quantized(recv, rows), work

    def _launch_hierarchical(self, s: ShardedParameter, wire: torch.Tensor):
        """qgZ's hierarchical all-to-all (section 3.3 of the paper), first step: within the node.

        [Note: hierarchical qgZ] data-parallel rank ``n·L + j`` is local rank j of node n (L ranks per
        node, N nodes). Step 1, within the node: local rank j receives from each local peer the chunks
        of ranks ``n·L + j`` for every node n, and sums them: N node-partial chunks. Step 2
        (:meth:`_inter_node`), across nodes, among the ranks of local index j: node n's partial of
        chunk ``n·L + j`` goes to node n, which sums the N partials: its own chunk, reduced over every
        rank. Across nodes each rank sends N chunks instead of N·L: 1/L of the flat all-to-all's
        inter-node bytes, for one more rounding (the partials are quantized again)."""
        nodes = self.nodes
        chunks = wire.view(nodes.count, nodes.size, s.part).transpose(0, 1).reshape(-1, s.part)  # [L·N, part]
        rows = quantize_rows(chunks, GRAD_BLOCK, GRAD_BITS)
        recv = torch.empty_like(rows)
        work = comm.all_to_all(recv, rows.reshape(-1), group=nodes.intra, async_op=True)
        return _Quantized(recv, rows, nodes.count), work

    def _inter_node(self, s: ShardedParameter, recv: torch.Tensor) -> torch.Tensor:
        """The second step of the hierarchical qgZ (see its note): returns this rank's reduced chunk."""
        nodes = self.nodes
        partials = dequantize_rows(recv, s.part, GRAD_BLOCK, GRAD_BITS).view(nodes.size, nodes.count, s.part)
        rows = quantize_rows(partials.sum(dim=0), GRAD_BLOCK, GRAD_BITS)  # [N, row]: row n to node n
        back = torch.empty_like(rows)
        comm.all_to_all(back, rows.reshape(-1), group=nodes.inter)
        return dequantize_rows(back, s.part, GRAD_BLOCK, GRAD_BITS).sum(dim=0)

    def _complete_oldest(self) -> None:
        entry = self.in_flight.pop(0)
        if isinstance(entry, _Flight):
            self._complete_bucket(entry)
            return
        gi, i, out, work = entry
        if work is not None:
            work.wait()
        g = self.parts.groups[gi]
        s = g.sharded[i]
        if isinstance(out, _Quantized) and out.nodes:
            out = self._inter_node(s, out.recv)
        elif isinstance(out, _Quantized):
            out = dequantize_rows(out.recv, s.part, GRAD_BLOCK, GRAD_BITS).sum(dim=0)
        if out.numel() != s.part:  # all-reduced whole: keep this rank's shard
            out = out[s.rank * s.part:(s.rank + 1) * s.part]
        self.grads[gi][g.offsets[i]:g.offsets[i] + s.part].add_(out, alpha=self.settings.after(self.parts.world))

    def _complete_bucket(self, flight: _Flight) -> None:
        if flight.work is not None:
            flight.work.wait()
        alpha = self.settings.after(self.parts.world)
        for gi, i, offset in flight.members:
            g = self.parts.groups[gi]
            s = g.sharded[i]
            start = offset + s.rank * s.part if self.gloo else offset
            self.grads[gi][g.offsets[i]:g.offsets[i] + s.part].add_(flight.out[start:start + s.part], alpha=alpha)

    def finish(self) -> None:
        """After backward: reduce parameters that got no gradient (as zeros), then wait for all."""
        for gi, i in self.order:
            if (gi, i) not in self.done:
                self._launch(gi, i, None)
        self._flush()
        while self.in_flight:
            self._complete_oldest()

    def attach_grads(self) -> None:
        """Nothing to attach: ``.grad`` is freed as soon as it is reduced."""

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []
