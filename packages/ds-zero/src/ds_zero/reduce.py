"""Gradient reducers for ZeRO stages 1 and 2 (the engine's ``gradient_reducer`` component).

- Stage 1 (P_os, Rajbhandari et al. 2020, section 5.1): every rank still holds the full fp32
  gradient, averaged by ds-core's bucketed all-reduce exactly as at stage 0; at the step each rank
  copies out only the slice its optimizer partition needs.
- Stage 2 (P_os+g, section 5.2): gradients are reduced into the owning rank's partition as backward
  produces them. Each parameter's post-accumulate-grad hook adds its gradient to a bucket
  (``reduce_bucket_size`` elements) and frees ``.grad``; a full bucket is reduced to the ranks that
  own its elements (``reduce_scatter``; one ``reduce`` per owner, since buckets do not align with
  partitions) or all-reduced (``reduce_scatter: false``, and always on gloo, where it is faster),
  asynchronously when ``overlap_comm`` (at most two buckets in flight,
  the double buffering of DeepSpeed's implementation). The owner accumulates the averaged piece into
  its fp32 partition gradient, so gradient accumulation across micro-steps never holds the full
  gradient, and no full-size gradient buffer exists. Buckets are launched in a fixed order on every
  rank, so collectives always match.

Groups of tagged parameters (experts; see ``partition.py``) are reduced over their own axis's process
group and averaged by its size, exactly as ds-core's default reducer treats them at stage 0.

Both are built by the ZeRO strategy (``strategy.py``) over the :class:`~ds_zero.partition.Partitions`
it made, and hand it this rank's gradient partitions (:meth:`grad_partitions`).
"""

from __future__ import annotations

import torch

from ds_core import comm
from ds_core.engine.precision import FlatGradients
from ds_core.engine.reducer import DataParallelReducer, weak_grad_hook
from ds_core.params import DEFAULT_AXIS

from .partition import Partitions

__all__ = ["PartitionAlignedGradients", "AllReduceGradients", "PartitionedGradientReducer", "GradientPartitions",
           "gloo_prefers_all_reduce"]

MAX_IN_FLIGHT = 2
#: On gloo an all-reduce beats per-owner reduces (2 CPU ranks, 44 MB: 41 ms vs 67 ms; its
#: reduce_scatter takes 102 ms), so ``reduce_scatter: true`` all-reduces there; the result is the same.
GLOO_PREFERS_ALL_REDUCE = True


def gloo_prefers_all_reduce(group) -> bool:
    """True when ``group`` spans several gloo ranks and all-reducing beats reduce-scattering there."""
    return comm.get_world_size(group) > 1 and GLOO_PREFERS_ALL_REDUCE and comm.get_backend(group) == "gloo"


class PartitionAlignedGradients(FlatGradients):
    """A :class:`FlatGradients` (same attributes) laid out like the partitions: group after group,
    each padded, so every rank's gradient slice is a contiguous view — no copy at the step."""

    def __init__(self, parts: Partitions, device: torch.device,  # noqa: D107 (no super: own layout)
                 dtype: torch.dtype = torch.float32) -> None:
        self.params, self.offsets, self.bases = [], [], []
        base = 0
        for g in parts.groups:
            self.bases.append(base)
            self.params += g.params
            self.offsets += [base + o for o in g.offsets]
            base += g.padded
        self.numel = base
        # one segment per group: the reducer all-reduces each over its group's axis
        self.segments = [(g.axis, g.shard, b, b + g.padded) for b, g in zip(self.bases, parts.groups)
                         if g.padded] or [(DEFAULT_AXIS, None, 0, base)]
        self.buffer = torch.zeros(base, dtype=dtype, device=device)
        self.views = [self.buffer[o:o + p.numel()].view_as(p) for o, p in zip(self.offsets, self.params)]
        self.index = {id(p): i for i, p in enumerate(self.params)}
        self.partitions = [self.buffer[b + g.lo:b + g.hi] for b, g in zip(self.bases, parts.groups)]


class AllReduceGradients:
    """Stage 1: full fp32 gradients all-reduced by ds-core's :class:`DataParallelReducer`."""

    def __init__(self, parts: Partitions, ctx, bucket_numel: int) -> None:
        self.parts = parts
        self.bucket_numel = bucket_numel
        self.grads = PartitionAlignedGradients(parts, ctx.device, ctx.precision.grad_dtype)
        self.inner = DataParallelReducer(
            self.grads, parts.group, bucket_bytes=bucket_numel * 4, reduce=ctx.reduce,
            fp32_model=ctx.precision.grads_are_views,
            axis_groups={a: g for a, g in parts.axis_groups.items() if a != DEFAULT_AXIS})

    def begin(self, sync: bool) -> None:
        self.inner.begin(sync)

    def finish(self) -> None:
        self.inner.finish()

    def attach_grads(self) -> None:
        self.inner.attach_grads()

    def remove(self) -> None:
        self.inner.remove()

    def zero(self) -> None:
        self.grads.zero()

    def grad_partitions(self) -> list[torch.Tensor]:
        """This rank's slice of each group's averaged gradient (views of the full buffer)."""
        return self.grads.partitions

    def partition_grads(self, out: list[torch.Tensor]) -> None:
        for src, dest in zip(self.grads.partitions, out):
            if dest is not src:
                dest.copy_(src, non_blocking=True)

    def buffer_bytes(self) -> int:
        return self.grads.buffer.numel() * self.grads.buffer.element_size()


class GradientPartitions:
    """What the optimizer wrapper reads from a reducer that keeps only this rank's fp32 gradient
    partitions in ``self.grads`` (one tensor per parameter group): stage 2 and stage 3."""

    grads: list[torch.Tensor]

    def zero(self) -> None:
        for t in self.grads:
            t.zero_()

    def grad_partitions(self) -> list[torch.Tensor]:
        return self.grads

    def partition_grads(self, out: list[torch.Tensor]) -> None:
        for src, dest in zip(self.grads, out):
            if dest is not src:
                dest.copy_(src, non_blocking=True)

    def buffer_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.grads)


class PartitionedGradientReducer(GradientPartitions):
    """Stage 2: bucketed reduction of gradients into each rank's fp32 gradient partition."""

    def __init__(self, parts: Partitions, ctx, bucket_numel: int, overlap: bool, reduce_scatter: bool) -> None:
        self.device = ctx.device
        self.bucket_numel = bucket_numel
        self.overlap = overlap
        self.reduce_scatter = reduce_scatter and not gloo_prefers_all_reduce(parts.group)
        self.settings = ctx.reduce
        self.comm_dtype = ctx.reduce.comm_dtype
        self.parts = parts
        self.handles: list = []
        self.peak_staging_numel = 0
        # the accumulated partitions in the precision's gradient dtype (data_types.grad_accum_dtype);
        # buckets are staged and reduced in fp32 either way
        self.grads = [torch.zeros(g.partition_numel, dtype=ctx.precision.grad_dtype, device=self.device)
                      for g in parts.groups]
        self.buckets: list[tuple[int, int, int, int]] = []  # (group, flat lo, flat hi, #params)
        self.bucket_of: list[list[int]] = []
        self.members: list[list[int]] = []  # parameter indices (in their group) of each bucket
        self._free: dict[int, list[torch.Tensor]] = {}  # staging buffers to reuse, by size
        for gi, g in enumerate(parts.groups):
            owner = []
            start, count = 0, 0
            for i, p in enumerate(g.params):
                count += 1
                owner.append(len(self.buckets))
                end = g.offsets[i] + p.numel()
                if end - start >= self.bucket_numel or i == len(g.params) - 1:
                    self.buckets.append((gi, start, end, count))
                    self.members.append(list(range(i + 1 - count, i + 1)))
                    start, count = end, 0
            self.bucket_of.append(owner)
            for i, p in enumerate(g.params):
                self.handles.append(p.register_post_accumulate_grad_hook(weak_grad_hook(self._hook, gi, i)))
        self.begin(True)

    # -- the engine's reducer protocol -----------------------------------------------------------
    def begin(self, sync: bool) -> None:
        """Start a micro-step. Stage 2 reduces on every micro-step (``sync`` is not needed: the
        reduced partitions accumulate), so ``no_sync`` saves no communication here."""
        self.pending = [n for *_, n in self.buckets]
        self.ready = [False] * len(self.buckets)
        self.arrived: list[set[int]] = [set() for _ in self.buckets]
        self.staging: list[torch.Tensor | None] = [None] * len(self.buckets)
        self.next_launch = 0
        self.in_flight: list[tuple[int, torch.Tensor, list]] = []

    def _hook(self, gi: int, i: int, p: torch.Tensor) -> None:
        b = self.bucket_of[gi][i]
        _, lo, hi, _ = self.buckets[b]
        staging = self._staging(b)
        off = self.parts.groups[gi].offsets[i] - lo
        # each parameter's hook runs once per backward, after autograd accumulated its gradient:
        # its slot is written once (slots of parameters without a gradient are zeroed at launch)
        staging[off:off + p.numel()].copy_(p.grad.reshape(-1))
        p.grad = None
        self.arrived[b].add(i)
        self.pending[b] -= 1
        if self.pending[b] == 0:
            self.ready[b] = True
            while self.next_launch < len(self.buckets) and self.ready[self.next_launch]:
                self._launch(self.next_launch)
                self.next_launch += 1

    def _staging(self, b: int) -> torch.Tensor:
        """Bucket ``b``'s staging buffer: a released one of its size when there is one. [Note: staging
        reuse] a fresh buffer per bucket and micro-step would be mapped, faulted in and zeroed every
        time; reused buffers are written slot by slot instead, so nothing needs zeroing."""
        if self.staging[b] is None:
            _, lo, hi, _ = self.buckets[b]
            free = self._free.get(hi - lo)
            self.staging[b] = free.pop() if free else torch.empty(hi - lo, dtype=torch.float32, device=self.device)
            live = sum(t.numel() for t in self.staging if t is not None)
            self.peak_staging_numel = max(self.peak_staging_numel, live)
        return self.staging[b]

    def _launch(self, b: int) -> None:
        gi, lo, hi, _ = self.buckets[b]
        chunk = self._staging(b)
        if self.pending[b]:  # parameters that got no gradient in this backward count as zeros
            g = self.parts.groups[gi]
            for i in self.members[b]:
                if i not in self.arrived[b]:
                    off = g.offsets[i] - lo
                    chunk[off:off + g.params[i].numel()].zero_()
        if self.settings.prescale:
            chunk.mul_(self.settings.before)
        wire = chunk.to(self.comm_dtype) if self.comm_dtype is not None else chunk
        works = []
        g = self.parts.groups[gi]
        if g.world > 1:
            if self.reduce_scatter:
                part = g.partition_numel
                for r in range(lo // part, (hi - 1) // part + 1):
                    a, c = max(lo, r * part), min(hi, (r + 1) * part)
                    works.append(comm.reduce(wire[a - lo:c - lo], dst=g.global_rank(r),
                                             group=g.group, async_op=True))
            else:
                works.append(comm.all_reduce(wire, group=g.group, async_op=True))
        self.in_flight.append((b, wire, works))
        limit = MAX_IN_FLIGHT if self.overlap else 0
        while len(self.in_flight) > limit:
            self._complete_oldest()

    def _complete_oldest(self) -> None:
        b, wire, works = self.in_flight.pop(0)
        for work in works:
            work.wait()
        gi, lo, hi, _ = self.buckets[b]
        g = self.parts.groups[gi]
        a, c = max(lo, g.lo), min(hi, g.hi)
        if a < c:
            # mean over the global batch: divide by the data-axis size for every group (see
            # ds_core.engine.reducer), experts included
            self.grads[gi][a - g.lo:c - g.lo].add_(wire[a - lo:c - lo], alpha=self.settings.after(self.parts.world))
        staging, self.staging[b] = self.staging[b], None
        self._free.setdefault(staging.numel(), []).append(staging)

    def finish(self) -> None:
        """After backward: reduce buckets whose parameters got no gradient (as zeros), then wait for all."""
        while self.next_launch < len(self.buckets):
            self._launch(self.next_launch)
            self.next_launch += 1
        while self.in_flight:
            self._complete_oldest()

    def attach_grads(self) -> None:
        """Nothing to attach: ``.grad`` is freed as soon as it is bucketed."""

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []

    def buffer_bytes(self) -> int:
        return super().buffer_bytes() + self.peak_staging_numel * 4

