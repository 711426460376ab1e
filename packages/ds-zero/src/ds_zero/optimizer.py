"""The ZeRO partition stepper: master weights and optimizer state of this rank's partitions only.

Each rank keeps master weights (fp32; or 16-bit with ``*_master_weights_and_grads``, stepped by
``ds_core.engine.low_precision``) and optimizer state for its own partition only — 1/N of them
(P_os, Rajbhandari et al. 2020, section 5.1) — one flat master tensor per parameter group, so the
group's hyper-parameters apply to every element of it. The ZeRO strategies (``strategy.py``) own one;
the engine's shared step helper has already decided the coefficient (unscale × clip, from the global
norm of the gradient partitions) when :meth:`ZeroOptimizer.step` runs, which:

1. takes this rank's averaged gradient partitions (views of stage 1's full gradient, stage 2's or
   stage 3's partitions; with offload, copied into host memory);
2. steps the partition optimizer with the gradients multiplied by the coefficient (folded into the
   optimizer's pass when it fuses it), copies the masters back in the model's dtype, and all-gathers
   the updated partitions into every rank's model (``allgather_bucket_size`` elements at a time).

With ``offload_optimizer.device: cpu`` (ZeRO-Offload, Ren et al. 2021) masters, their gradients and
the optimizer state live in host memory and the optimizer is built for ``device_type="cpu"``, so
ds-core's kernel seam picks a CPU optimizer kernel when one is installed (else torch's fused CPU
AdamW). In fp32 without offload the masters are views of the model's own flat buffers: no copy.

With ``offload_optimizer.device: nvme`` (ZeRO-Infinity, Rajbhandari et al. 2021) masters and state
live in files between steps and step 4 streams them through host memory in sub-groups, reading
the next and writing the previous while one is stepped (``swap_optimizer.py``); the gradient
partitions stay where the reducer keeps them. Under stage 3 with ``offload_param.device: nvme`` the
updated weights go straight to the parameter shard files (``stage3.py``).
"""

from __future__ import annotations

import torch

from ds_core import comm
from ds_core.errors import ConfigError
from ds_core.optim.fused import copy_target, fuses

from .partition import Partitions
from .swap import SwapError, wait_all

__all__ = ["ZeroOptimizer"]


class ZeroOptimizer:
    """Steps this rank's partition of every parameter group; see the module docstring.

    ``grad_partitions``: the reducer's fp32 gradient partition of each group (stepped in place unless
    the optimizer state is offloaded).
    """

    def __init__(self, ctx, cfg, parts: Partitions, grad_partitions: list[torch.Tensor]) -> None:
        self.parts = parts
        self.stage = cfg.stage
        self.precision = ctx.precision.name
        self.offload = cfg.offload
        self.allgather_bucket_numel = cfg.allgather_bucket_size
        self.master_device = torch.device("cpu") if self.offload else ctx.device
        self.comm_device = ctx.device
        self.accelerator = ctx.accelerator
        pin = (cfg.offload_optimizer.pin_memory and self.offload and ctx.device.type != "cpu"
               and ctx.accelerator.supports("pinned_memory"))
        self.nvme = cfg.offload_optimizer.device == "nvme"
        self.swapped = None
        if self.nvme:
            self.aliased = False
            self.optimizer = self._build_swapped(ctx, cfg, pin)
            return
        self.masters: list[torch.nn.Parameter] = []
        precision = ctx.precision
        # aliased: the master is the model's own slice (fp32 on the device, or the 16-bit weights with
        # *_master_weights_and_grads), nothing to copy back
        self.aliased = not precision.has_masters and not self.offload
        grads = []
        for gi, g in enumerate(parts.groups):
            if self.aliased:
                master = torch.nn.Parameter(g.own())
            else:
                master = torch.nn.Parameter(torch.empty(g.partition_numel, dtype=precision.stepped_dtype,
                                                        device=self.master_device, pin_memory=pin))
                with torch.no_grad():
                    master.copy_(_own(g))
            if not self.offload:  # the reducer's own partition: no copy at the step
                grad = grad_partitions[gi]
            else:
                grad = torch.zeros(g.partition_numel, dtype=precision.grad_dtype, device=self.master_device,
                                   pin_memory=pin)
            if grad.dtype == master.dtype:  # else (fp32 masters, 16-bit gradients) the stepper reads ``grads``
                master.grad = grad
            grads.append(grad)
            self.masters.append(master)
        self.grads = grads
        self.low_precision = None
        if precision.low_precision:
            # 16-bit masters / gradients / optimizer state (ds_core.engine.low_precision): each rank rounds
            # its own partition, so each rank has its own rounding stream
            from ds_core.engine.low_precision import LowPrecisionStepper

            self.low_precision = LowPrecisionStepper(
                self._groups(self.masters), [[g] for g in grads],
                lambda groups, device_type: ctx.make_optimizer(groups, device_type),
                self.master_device.type, precision, stream=ctx.rank + 1)
            self.optimizer = self.low_precision.optimizer
        else:
            self.optimizer = ctx.make_optimizer(self._groups(self.masters), self.master_device.type)

    def _groups(self, params_by_group) -> list[dict]:
        return [{**g.hyper, "params": p if isinstance(p, list) else [p]}
                for g, p in zip(self.parts.groups, params_by_group)]

    def _build_swapped(self, ctx, cfg, pin: bool) -> torch.optim.Optimizer:
        """NVMe offload: the optimizer over one parameter per sub-group, its state in swap files."""
        from .swap import SwapStore
        from .swap_optimizer import SwappedOptimizerState, probe_state_keys

        off = cfg.offload_optimizer
        keys, fills = probe_state_keys(lambda groups: ctx.make_optimizer(groups, self.master_device.type),
                                       self.parts.groups[0].hyper if self.parts.groups else {})
        width = 1 + len(keys)
        if off.buffer_size < width:
            raise ConfigError(f"offload_optimizer.buffer_size {off.buffer_size} is too small: one element needs "
                              f"{width} fp32 values (master + {keys}); set it to at least {width}, e.g. 1e8")
        chunk = max(1, min(cfg.sub_group_size or off.buffer_size, off.buffer_size // width))
        store = SwapStore(off.nvme_path, ctx.rank, "optimizer", "offload_optimizer", aio=ctx.aio)
        self.swapped = SwappedOptimizerState(store, [g.partition_numel for g in self.parts.groups], keys,
                                             chunk, off.buffer_count, pin, fills)
        for gi, g in enumerate(self.parts.groups):
            self.swapped.write_masters(gi, _own(g))
        self.masters = self.swapped.masters
        opt = ctx.make_optimizer(self._groups(self.swapped.params_by_group()), self.master_device.type)
        # checkpoints read and load one state entry per group (the CPU-offload layout), so they move
        # between CPU and NVMe offload; torch's own methods would speak per sub-group
        opt.state_dict = lambda: self.swapped.state_dict(opt)
        opt.load_state_dict = lambda sd: self.swapped.load_state_dict(opt, sd)
        return opt

    @property
    def param_groups(self):
        return self.optimizer.param_groups

    def step(self, coef: float, grad_partitions: list[torch.Tensor]) -> None:
        """Step the partitions with gradients × ``coef``, write the new weights back, all-gather."""
        grads = grad_partitions
        if self.swapped is None and self.offload:
            grads = self.grads
            for src, dest in zip(grad_partitions, grads):
                dest.copy_(src, non_blocking=True)
            if self.comm_device.type != "cpu":
                self.accelerator.synchronize()  # the host copies must land before the CPU step reads them
        begin = getattr(self.parts, "begin_update", None)
        if begin is not None:  # stage 3 with NVMe shards: in-memory copies are about to go stale
            begin()
        if self.swapped is not None:
            self._swapped_step(grads, coef)
        elif self.low_precision is not None:
            self.low_precision.step(coef)
            if not self.aliased:
                with torch.no_grad():
                    wait_all([self._write_back(gi, 0, m) for gi, m in enumerate(self.masters)])
        elif fuses(self.optimizer, "grad_scale", "copy_to"):  # one pass: scale, step, 16-bit copy
            copies = None if self.aliased else self._copy_targets()
            self.optimizer.step(grad_scale=coef, copy_to=copies)
            if not self.aliased:
                with torch.no_grad():
                    wait_all([self._write_back(gi, 0, m) for gi, m in enumerate(self.masters)
                              if copies[gi][0] is None])
        else:
            if coef != 1.0:
                for m in self.masters:
                    m.grad.mul_(coef)
            self.optimizer.step()
            if not self.aliased:
                with torch.no_grad():
                    wait_all([self._write_back(gi, 0, m) for gi, m in enumerate(self.masters)])
        self.parts.all_gather(self.allgather_bucket_numel)

    def _swapped_step(self, grads: list[torch.Tensor], coef: float) -> None:
        """The NVMe sub-group step, and agreement on its failure: a rank whose disk failed raises its
        :class:`~ds_zero.swap.SwapError`, and every other rank raises too instead of waiting for it in
        the all-gather that follows."""
        failed = None
        try:
            self.swapped.step(self.optimizer, grads, coef, self._write_back)
        except SwapError as exc:
            failed = exc
        group = self.parts.group
        if comm.get_world_size(group) > 1:
            flags = torch.zeros(comm.get_world_size(group), dtype=torch.int32, device=self.comm_device)
            flags[comm.get_rank(group)] = 1 if failed is not None else 0
            comm.all_reduce(flags, group=group)
            bad = [r for r in range(flags.numel()) if flags[r]]
            if bad and failed is None:
                raise SwapError(f"NVMe swap failed on data-parallel rank(s) {bad} during this optimizer step (see "
                                f"their error: disk full or I/O error under offload_optimizer.nvme_path); the "
                                f"step did not complete on every rank: fix the disk and reload the last checkpoint")
        if failed is not None:
            raise failed

    def _copy_targets(self) -> list[list[torch.Tensor | None]]:
        """Per group, the model-dtype partition the optimizer writes its new values into during its
        pass (bf16/fp16 on the masters' device), or None where :meth:`_write_back` copies after."""
        return [[copy_target(None if getattr(g, "swap", None) is not None else g.own(), m)]
                for g, m in zip(self.parts.groups, self.masters)]

    def _write_back(self, gi: int, lo: int, masters: torch.Tensor):
        """Put updated masters (elements ``[lo, lo + n)`` of group ``gi``'s partition) into the model's
        dtype: into its flat buffer, or (NVMe parameter shards) a swap-file write whose handle is returned."""
        g = self.parts.groups[gi]
        if getattr(g, "swap", None) is not None:
            return g.write_range(lo, masters)
        with torch.no_grad():  # a staging buffer is reused right after: no asynchronous copy from it
            g.own()[lo:lo + masters.numel()].copy_(masters, non_blocking=self.swapped is None)
        return None

    def state_dict(self) -> dict:
        """This rank's partition optimizer state (the checkpoint layout saves every rank's)."""
        return self.optimizer.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state)

    def reload_masters_from_model(self) -> None:
        """Set the fp32 masters from the model's (possibly 16-bit) weights."""
        if self.aliased:
            return
        with torch.no_grad():
            for gi, g in enumerate(self.parts.groups):
                if self.swapped is not None:
                    self.swapped.write_masters(gi, _own(g))
                else:
                    self.masters[gi].copy_(_own(g))

    def close(self) -> None:
        """Remove the NVMe swap files of this optimizer and its parameter shards (nothing without NVMe)."""
        if self.swapped is not None:
            self.swapped.close()
        close = getattr(self.parts, "close", None)
        if close is not None:
            close()


def _own(g) -> torch.Tensor:
    """A group's partition in the model's dtype; NVMe shards are read into memory for the moment."""
    read = getattr(g, "read_own", None)
    return read() if read is not None and getattr(g, "swap", None) is not None else g.own()
