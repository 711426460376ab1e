"""Stage 3's gradient reducer: each parameter's gradient reduce-scattered into its owners' shards.

At stage 3 (Rajbhandari et al. 2020, section 5.3) a gradient has the layout of its parameter: N
equal shards of the padded flat tensor. Each parameter's post-accumulate-grad hook pads its
gradient, reduce-scatters it (``reduce_scatter_tensor``; on gloo an all-reduce and a slice, which
is faster there — see ``reduce.py``), frees ``.grad`` and tells the coordinator the parameter may be
released. The averaged shard is added to this rank's fp32 gradient partition (laid out like
:meth:`Stage3Group.own`), so gradient accumulation over micro-steps keeps only the partition. With
``overlap_comm`` the collectives are asynchronous, at most two in flight.

Collectives are issued in backward order, the same on every rank; parameters that got no gradient
in a micro-step (unused branches) are reduced as zeros in a fixed order by :meth:`finish`.

The reducer also brackets the coordinator's step (``gather.py``, ``prefetch.py``): it hands it the
config's stage-3 knobs, has the ranks compare their forward's module order before backward starts
(so a rank that ran other modules fails there, before gradients are reduced in a different order),
and ends the step after backward.
"""

from __future__ import annotations

import weakref

import torch
import torch.distributed as dist

from ds_core import comm
from ds_core.engine.reducer import weak_grad_hook

from .prefetch import Stage3Settings
from .reduce import COMM_DTYPES, GLOO_PREFERS_ALL_REDUCE, GradientPartitions
from .stage3 import ShardedParameter, Stage3Partitions

__all__ = ["Stage3GradientReducer"]

MAX_IN_FLIGHT = 2


class Stage3GradientReducer(GradientPartitions):
    """The engine's ``gradient_reducer`` at stage 3; bound to the layout by the optimizer factory."""

    def __init__(self, engine, overlap: bool) -> None:
        cfg = engine.config
        self.device = engine.device
        self.overlap = overlap
        self.prescale = cfg.prescale_gradients
        self.predivide = cfg.gradient_predivide_factor
        self.comm_dtype = COMM_DTYPES.get(cfg.communication_data_type or "")
        zero = cfg.section("zero_optimization")
        self.settings = Stage3Settings.from_config(zero) if zero is not None else Stage3Settings()
        self.parts: Stage3Partitions | None = None
        self.coordinator = None
        self.handles: list = []

    def bind(self, parts: Stage3Partitions, coordinator=None) -> None:
        self.parts = parts
        self.coordinator = coordinator
        if coordinator is not None:
            coordinator.configure(self.settings)
            # the model outlives a dropped engine: take the module hooks off with this reducer
            weakref.finalize(self, coordinator.remove)
        self.gloo = parts.world > 1 and GLOO_PREFERS_ALL_REDUCE and dist.get_backend(parts.group) == "gloo"
        self.grads = [torch.zeros(g.partition_numel, dtype=torch.float32, device=self.device)
                      for g in parts.groups]
        self.order: list[tuple[int, int]] = []
        for gi, g in enumerate(parts.groups):
            for i, s in enumerate(g.sharded):
                self.order.append((gi, i))
                self.handles.append(s.param.register_post_accumulate_grad_hook(weak_grad_hook(self._hook, gi, i)))
        self.begin(True)

    # -- the engine's reducer protocol ---------------------------------------------------------------
    def begin(self, sync: bool) -> None:
        """Start a micro-step; stage 3 reduces every micro-step (``no_sync`` saves no communication)."""
        self.done: set[tuple[int, int]] = set()
        self.in_flight: list = []
        if self.coordinator is not None:
            self.coordinator.check_path()

    def _hook(self, gi: int, i: int, p: torch.Tensor) -> None:
        grad = p.grad
        p.grad = None
        self._launch(gi, i, grad)

    def _launch(self, gi: int, i: int, grad: torch.Tensor | None) -> None:
        s: ShardedParameter = self.parts.groups[gi].sharded[i]
        self.done.add((gi, i))
        wire = torch.zeros(s.padded, dtype=self.comm_dtype or torch.float32, device=self.device)
        if grad is not None:
            wire[:s.numel].copy_(grad.reshape(-1))
        if self.prescale:
            wire.mul_(1.0 / self.predivide)
        if s.world == 1:
            out, work = wire, None
        elif self.gloo:
            out, work = wire, comm.all_reduce(wire, group=self.parts.group, async_op=True)
        else:
            out = torch.empty(s.part, dtype=wire.dtype, device=self.device)
            work = dist.reduce_scatter_tensor(out, wire, group=self.parts.group, async_op=True)
        self.in_flight.append((gi, i, out, work))
        if self.coordinator is not None:
            self.coordinator.backward_done(s)
        limit = MAX_IN_FLIGHT if self.overlap else 0
        while len(self.in_flight) > limit:
            self._complete_oldest()

    def _complete_oldest(self) -> None:
        gi, i, out, work = self.in_flight.pop(0)
        if work is not None:
            work.wait()
        g = self.parts.groups[gi]
        s = g.sharded[i]
        if out.numel() != s.part:  # all-reduced whole: keep this rank's shard
            out = out[s.rank * s.part:(s.rank + 1) * s.part]
        world = self.parts.world
        scale = self.predivide / world if self.prescale else 1.0 / world
        self.grads[gi][g.offsets[i]:g.offsets[i] + s.part].add_(out, alpha=scale)

    def finish(self) -> None:
        """After backward: reduce parameters that got no gradient (as zeros), then wait for all."""
        for gi, i in self.order:
            if (gi, i) not in self.done:
                self._launch(gi, i, None)
        while self.in_flight:
            self._complete_oldest()
        if self.coordinator is not None:
            self.coordinator.end_step()

    def partition_grads(self, out: list[torch.Tensor]) -> None:
        """Before the optimizer step: no gather may still be in flight (it would bring old values)."""
        if self.coordinator is not None:
            self.coordinator.end_step()
        super().partition_grads(out)

    def attach_grads(self) -> None:
        """Nothing to attach: ``.grad`` is freed as soon as it is reduced."""

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []
        if self.coordinator is not None:
            self.coordinator.remove()
