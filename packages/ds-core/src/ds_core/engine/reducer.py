"""Data-parallel gradient averaging: bucketed all-reduce started from gradient hooks.

Each parameter's post-accumulate-grad hook moves its gradient into the flat fp32 buffer (for 16-bit
models; fp32 models accumulate there directly because ``.grad`` is a view of it). On a micro-step
that synchronizes, a bucket's all-reduce is launched asynchronously as soon as its last gradient
arrives, so communication overlaps the rest of backward, as in PyTorch DDP (Li et al. 2020).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from .. import comm
from .precision import FlatGradients

__all__ = ["DataParallelReducer", "DEFAULT_BUCKET_BYTES"]

DEFAULT_BUCKET_BYTES = 25 * 1024 * 1024


class DataParallelReducer:
    """Averages gradients over ``group``; ``prescale``/``predivide`` follow DeepSpeed's options."""

    def __init__(self, grads: FlatGradients, group=None, bucket_bytes: int = DEFAULT_BUCKET_BYTES,
                 prescale: bool = False, predivide: float = 1.0, fp32_model: bool = True,
                 comm_dtype: torch.dtype | None = None) -> None:
        self.grads = grads
        self.group = group
        self.world = comm.get_world_size(group)
        self.prescale = prescale
        self.predivide = predivide
        self.fp32_model = fp32_model
        # communication_data_type: all-reduce a 16-bit copy (half the bytes), accumulate in fp32.
        self.comm_dtype = comm_dtype if comm_dtype not in (None, torch.float32) else None
        self.copies: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.buckets: list[tuple[int, int, list[int]]] = []  # (start, end, param indices)
        start, members = 0, []
        for i, p in enumerate(grads.params):
            members.append(i)
            end = grads.offsets[i] + p.numel()
            if (end - start) * 4 >= bucket_bytes or i == len(grads.params) - 1:
                self.buckets.append((start, end, members))
                start, members = end, []
        self.bucket_of = {i: b for b, (_, _, m) in enumerate(self.buckets) for i in m}
        self.pending: list[int] = []
        self.works: list = []
        self.launched: list[bool] = []
        self.sync = False
        self.handles = [p.register_post_accumulate_grad_hook(self._hook) for p in grads.params]
        self.attach_grads()

    def attach_grads(self) -> None:
        """Point fp32 parameters' ``.grad`` at their slice of the flat buffer."""
        if self.fp32_model:
            for p, view in zip(self.grads.params, self.grads.views):
                p.grad = view

    def begin(self, sync: bool) -> None:
        """Called before backward: ``sync`` says whether this micro-step all-reduces."""
        self.sync = sync and self.world > 1
        self.pending = [len(m) for _, _, m in self.buckets]
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
        start, end, _ = self.buckets[b]
        chunk = self.grads.buffer[start:end]
        if self.prescale:
            chunk.mul_(1.0 / self.predivide)
        if self.comm_dtype is not None:
            wire = chunk.to(self.comm_dtype)
            self.copies.append((chunk, wire))
            chunk = wire
        self.works.append(comm.all_reduce(chunk, group=self.group, async_op=True))
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
        buf = self.grads.buffer
        if self.prescale:
            if self.predivide != self.world:
                buf.mul_(self.predivide / self.world)
        else:
            buf.div_(self.world)

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def broadcast_parameters(module: torch.nn.Module, group=None, src: int = 0) -> None:
    """Make every rank start from rank ``src``'s parameters and buffers."""
    if comm.get_world_size(group) == 1:
        return
    with torch.no_grad():
        for t in list(module.parameters()) + list(module.buffers()):
            dist.broadcast(t.data, src=src, group=group)
