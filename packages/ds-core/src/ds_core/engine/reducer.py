"""Data-parallel gradient averaging: bucketed all-reduce started from gradient hooks.

Each parameter's post-accumulate-grad hook moves its gradient into the flat fp32 buffer (for 16-bit
models; fp32 models accumulate there directly because ``.grad`` is a view of it). On a micro-step
that synchronizes, a bucket's all-reduce is launched asynchronously as soon as its last gradient
arrives, so communication overlaps the rest of backward, as in PyTorch DDP (Li et al. 2020).
"""

from __future__ import annotations

import weakref

import torch

from .. import comm
from ..errors import CommError
from ..params import DEFAULT_AXIS, reduce_axis
from .context import ReduceSettings
from .precision import FlatGradients

__all__ = ["DataParallelReducer", "DEFAULT_BUCKET_BYTES", "weak_grad_hook"]


def weak_grad_hook(method, *args):
    """A post-accumulate-grad hook calling ``method(*args, param)`` through a weak reference.

    torch keeps parameter hooks where the garbage collector cannot see them, so a hook holding its
    reducer would keep the reducer — and through it the engine, its buffers and optimizer state —
    alive for as long as the parameters live, even after the engine is dropped. Through a weak
    reference the hook does nothing once the reducer is gone (``engine.destroy()`` also removes it).
    """
    ref = weakref.WeakMethod(method)

    def hook(param):
        bound = ref()
        if bound is not None:
            bound(*args, param)

    return hook

DEFAULT_BUCKET_BYTES = 25 * 1024 * 1024


class DataParallelReducer:
    """Averages gradients over ``group`` as ``reduce`` (:class:`ReduceSettings`) says."""

    def __init__(self, grads: FlatGradients, group=None, bucket_bytes: int = DEFAULT_BUCKET_BYTES,
                 reduce: ReduceSettings | None = None, fp32_model: bool = True,
                 axis_groups: dict | None = None) -> None:
        self.grads = grads
        # The process group of each reduce axis; ``group`` is the data axis's.
        self.axis_groups = {DEFAULT_AXIS: group, **(axis_groups or {})}
        self.world = comm.get_world_size(group)
        self.settings = reduce = reduce or ReduceSettings()
        self.fp32_model = fp32_model
        # communication_data_type: all-reduce a 16-bit copy (half the bytes), accumulate in fp32.
        self.comm_dtype = reduce.comm_dtype if reduce.comm_dtype not in (None, torch.float32) else None
        self.copies: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.buckets: list[tuple[int, int, list[int], object]] = []  # (start, end, param indices, group)
        # Gradient buffers without tags (or from other layouts) are one data-axis segment.
        segments = getattr(grads, "segments", None) or [(DEFAULT_AXIS, None, 0, grads.numel)]
        for axis, _, seg_start, seg_end in segments:
            if axis not in self.axis_groups:
                raise CommError(f"parameters are tagged to reduce over {axis!r} but the engine has no "
                                f"process group for that axis; build the topology with that axis")
            start, members = seg_start, []
            for i, p in enumerate(grads.params):
                off = grads.offsets[i]
                if not seg_start <= off < seg_end:
                    continue
                members.append(i)
                end = off + p.numel()
                if (end - start) * 4 >= bucket_bytes or end == seg_end:
                    self.buckets.append((start, end, members, self.axis_groups[axis]))
                    start, members = end, []
        self.bucket_of = {i: b for b, (_, _, m, _) in enumerate(self.buckets) for i in m}
        self.pending: list[int] = []
        self.works: list = []
        self.launched: list[bool] = []
        self.sync = False
        self.handles = [p.register_post_accumulate_grad_hook(weak_grad_hook(self._hook)) for p in grads.params]
        self.attach_grads()

    def attach_grads(self) -> None:
        """Point fp32 parameters' ``.grad`` at their slice of the flat buffer."""
        if self.fp32_model:
            for p, view in zip(self.grads.params, self.grads.views):
                p.grad = view

    def begin(self, sync: bool) -> None:
        """Called before backward: ``sync`` says whether this micro-step all-reduces."""
        self.sync = sync and any(comm.get_world_size(g) > 1 for *_, g in self.buckets)
        self.pending = [len(m) for _, _, m, _ in self.buckets]
        self.launched = [False] * len(self.buckets)
        self.works = []

    def _hook(self, p: torch.Tensor) -> None:
        i = self.grads.index[id(p)]
        view = self.grads.views[i]
        if self.fp32_model:
            if p.grad.data_ptr() != view.data_ptr():  # someone replaced .grad (e.g. zero_grad(None))
                view.add_(p.grad)
                p.grad = view
        else:
            view.add_(p.grad.to(torch.float32))
            p.grad = None
        if self.sync:
            b = self.bucket_of[i]
            self.pending[b] -= 1
            if self.pending[b] == 0:
                self._launch(b)

    def _launch(self, b: int) -> None:
        start, end, _, group = self.buckets[b]
        chunk = self.grads.buffer[start:end]
        if self.settings.prescale:
            chunk.mul_(self.settings.before)
        if self.comm_dtype is not None:
            wire = chunk.to(self.comm_dtype)
            self.copies.append((chunk, wire))
            chunk = wire
        self.works.append(comm.all_reduce(chunk, group=group, async_op=True))
        self.launched[b] = True

    def finish(self) -> None:
        """Called after backward: launch buckets whose parameters got no gradient, wait, average."""
        if not self.sync:
            return
        for b, done in enumerate(self.launched):
            if not done:
                self._launch(b)
        for work in self.works:
            if work is not None:
                work.wait()
        self.works = []
        for chunk, wire in self.copies:
            chunk.copy_(wire)
        self.copies = []
        # The gradient of the mean loss over the global batch: every bucket is divided by the
        # data-axis size, whichever group summed it. An expert's gradient already sums the tokens
        # its expert ranks routed to it, so its expert_data sum covers the whole batch too.
        if self.settings.prescale:
            if self.settings.predivide != self.world:
                self.grads.buffer.mul_(self.settings.after(self.world))
        else:
            self.grads.buffer.div_(self.world)

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def broadcast_parameters(module: torch.nn.Module, group=None, src: int = 0, axis_groups: dict | None = None) -> None:
    """Make every rank start from the parameters and buffers of the first rank of its group.

    Tagged parameters (experts) are broadcast only within their own reduce axis's group.
    """
    groups = {DEFAULT_AXIS: group, **(axis_groups or {})}
    with torch.no_grad():
        for t in list(module.parameters()) + list(module.buffers()):
            g = groups.get(reduce_axis(t), group)
            if comm.get_world_size(g) == 1:
                continue
            comm.broadcast(t.data, src=comm.global_rank(g, src), group=g)
