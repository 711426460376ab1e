"""ZeRO stages 1, 2 and 3 as data-parallel strategies (ds-core's ``DataParallelStrategy`` protocol).

Each stage is one object that owns everything it partitions — the layout, the gradient reducer, the
partition stepper and their checkpoint state — built in :meth:`prepare` in the order they depend on
each other, with nothing bound afterwards:

- :class:`ZeroStrategy` (stage 2, P_os+g): ``Partitions`` (``partition.py``) → the bucketed
  reduce-into-partitions reducer (``reduce.py``) → a ``ZeroOptimizer`` over its gradient partitions
  (``optimizer.py``); checkpoints in ``checkpoint.py``.
- :class:`Zero1Strategy` (stage 1, P_os): the same, with ds-core's all-reduce of full gradients
  (and so each parameter's full averaged gradient, which pipelines with tied weights need).
- :class:`Stage3Strategy` (P_os+g+p): ``Stage3Partitions`` (``stage3.py``) → the gather/release
  coordinator (``gather.py``) → the per-parameter reduce-scatter (``reduce3.py``) → the same
  ``ZeroOptimizer``; the coordinator's per-step lifecycle is driven by the engine hooks; checkpoints in
  ``checkpoint3.py``.

:func:`build` is the ``data_parallel_strategy`` factory named in ``ds_feature.json``.
"""

from __future__ import annotations

import weakref

import torch

from ds_core.engine.step import NormTerm
from ds_core.errors import ConfigError

from . import checkpoint as ckpt
from .optimizer import ZeroOptimizer
from .partition import Partitions
from .reduce import AllReduceGradients, PartitionedGradientReducer

__all__ = ["ZeroStrategy", "Zero1Strategy", "Stage3Strategy", "build"]


def build(section):
    """The ``data_parallel_strategy`` factory: None at stage 0 (the engine's default), else the stage's."""
    if section is None or section.stage == 0:
        return None
    if section.stage == 1:
        return Zero1Strategy(section)
    if section.stage == 2:
        return ZeroStrategy(section)
    return Stage3Strategy(section)


def _sq(t: torch.Tensor) -> torch.Tensor:
    return torch.linalg.vector_norm(t, dtype=torch.float32).double() ** 2


class ZeroStrategy:
    """ZeRO stage 2 (and the base of stage 1); see the module docstring."""

    layout = "zero"

    def __init__(self, cfg) -> None:
        self.cfg = cfg
        self.stage = cfg.stage
        self.name = f"ZeRO stage {cfg.stage}"
        self.optimizer = None

    # -- prepare -----------------------------------------------------------------------------------
    def prepare(self, ctx) -> None:
        self.ctx = ctx
        if any(getattr(p, "ds_shard", None) is not None for p in ctx.module.parameters()):
            raise ConfigError(f"the model was built under ds_zero.Init (its parameters are partitioned) but "
                              f"zero_optimization.stage is {self.stage}; set stage to 3 or build the model "
                              f"without Init")
        self.parts = Partitions(list(ctx.param_groups), ctx.module, ctx.groups.data, ctx.precision.dtype,
                                ctx.device, axis_groups=dict(ctx.groups.axes))
        self.reducer = self._reducer(ctx)
        self.zero = ZeroOptimizer(ctx, self.cfg, self.parts, self.reducer.grad_partitions())
        self.optimizer = self.zero.optimizer

    def _reducer(self, ctx):
        cfg = self.cfg
        return PartitionedGradientReducer(self.parts, ctx, cfg.reduce_bucket_size, cfg.overlap_comm,
                                          cfg.reduce_scatter)

    # -- what tests, memory reports and GatheredParameters read --------------------------------------
    @property
    def masters(self):
        return self.zero.masters

    @property
    def swapped(self):
        return self.zero.swapped

    @property
    def aliased(self) -> bool:
        return self.zero.aliased

    @property
    def offload(self) -> bool:
        return self.zero.offload

    @property
    def param_groups(self):
        return self.optimizer.param_groups

    @property
    def state(self):
        """The optimizer state of this rank's partition, as DeepSpeed's optimizer wrappers expose it."""
        return self.optimizer.state

    def reload_masters_from_model(self) -> None:
        self.zero.reload_masters_from_model()

    # -- the protocol ------------------------------------------------------------------------------
    def begin_backward(self, sync: bool) -> None:
        self.reducer.begin(sync)

    def end_backward(self) -> None:
        self.reducer.finish()

    def grad_norm_terms(self) -> list[NormTerm]:
        """One term per group: its partition's squared norm, summed over its axis group (and its shard
        axis's: other experts), so every rank ends with the same total."""
        axis_groups = self.parts.axis_groups
        return [NormTerm(_sq(grad), (axis_groups[g.axis],) + ((axis_groups[g.shard],) if g.shard else ()))
                for g, grad in zip(self.parts.groups, self.reducer.grad_partitions())]

    def step(self, coef: float) -> bool:
        self.zero.step(coef, self.reducer.grad_partitions())
        return True

    def zero_grad(self) -> None:
        self.reducer.zero()
        self.reducer.attach_grads()

    def sync_from_module(self) -> None:
        self.zero.reload_masters_from_model()

    def module_keys(self) -> set[str]:
        return set()

    def save(self, writer) -> None:
        ckpt.save_partitions(self, writer)

    def load(self, reader, load_optimizer_states: bool) -> None:
        ckpt.load_partitions(self, reader, load_optimizer_states)

    def close(self) -> None:
        self.reducer.remove()
        self.zero.close()


class Zero1Strategy(ZeroStrategy):
    """ZeRO stage 1: full gradients all-reduced (ds-core's bucketed reducer), optimizer state partitioned."""

    def _reducer(self, ctx):
        return AllReduceGradients(self.parts, ctx, self.cfg.reduce_bucket_size)

    def gradient_of(self, param: torch.Tensor) -> torch.Tensor:
        """``param``'s full fp32 gradient (a view of the all-reduced buffer): ``FullGradients``."""
        return self.reducer.grads.view_of(param)


class Stage3Strategy(ZeroStrategy):
    """ZeRO stage 3; see the module docstring."""

    layout = "zero-3"

    def prepare(self, ctx) -> None:
        from .gather import ParameterCoordinator
        from .prefetch import Stage3Settings
        from .quantize import WEIGHT_BLOCK
        from .reduce3 import Stage3GradientReducer
        from .stage3 import Stage3Partitions
        from .zeropp import node_groups, secondary_partition

        self.ctx = ctx
        cfg = self.cfg
        hpz = secondary_partition(int(cfg.zero_hpz_partition_size), ctx.groups.data)  # checked before any gather
        param = cfg.offload_param
        offload = param.device in ("cpu", "nvme")
        pin = (offload and param.pin_memory and ctx.device.type != "cpu"
               and ctx.accelerator.supports("pinned_memory"))
        swap = None
        if param.device == "nvme":
            from .swap import SwapStore
            from .swap_params import ShardSwapper

            store = SwapStore(param.nvme_path, ctx.rank, "param", "offload_param", aio=ctx.aio)
            swap = ShardSwapper(store, param.buffer_count, param.buffer_size, pin)
        self.parts = Stage3Partitions(list(ctx.param_groups), ctx.module, ctx.groups.data, ctx.precision.dtype,
                                      ctx.device, cfg.stage3_param_persistence_threshold,
                                      shard_device=torch.device("cpu") if offload else None, pin=pin, swap=swap)
        coordinator = ParameterCoordinator(self.parts, ctx.module)
        coordinator.configure(Stage3Settings.from_config(cfg))
        # ZeRO++ (zeropp.py): qwZ quantizes the prefetcher's gathers, hpZ gives them a secondary group
        coordinator.prefetcher.quant = WEIGHT_BLOCK if cfg.zero_quantized_weights else 0
        coordinator.prefetcher.hpz = hpz
        # the model outlives a dropped engine: take the module hooks off with this strategy
        weakref.finalize(self, coordinator.remove)
        self.coordinator = coordinator
        nodes = node_groups(hpz, ctx.groups.data) if cfg.zero_quantized_gradients else None
        self.reducer = Stage3GradientReducer(self.parts, ctx, cfg.overlap_comm, coordinator,
                                             quantized=cfg.zero_quantized_gradients, nodes=nodes,
                                             bucket_numel=cfg.reduce_bucket_size)
        self.zero = ZeroOptimizer(ctx, cfg, self.parts, self.reducer.grads)
        self.optimizer = self.zero.optimizer
        self.parts.optimizer = self.zero  # GatheredParameters refreshes the masters after a modification
        self.parts.coordinator = coordinator
        # [Note: stage-3 step lifecycle] ranks compare the module order of their forward before backward
        # reduces anything (a rank that ran other modules fails there, naming them); the gather step ends
        # after backward, and again before the optimizer step, so no gather of old values is in flight.
        ctx.hooks.subscribe("backward_start", lambda sync: coordinator.check_path())
        ctx.hooks.subscribe("backward_end", lambda sync: coordinator.end_step())
        ctx.hooks.subscribe("before_step", coordinator.end_step)

    def module_keys(self) -> set[str]:
        from .checkpoint3 import managed_names

        return set(managed_names(self.ctx.module, self.parts))

    def gathered_state_dict(self, rank0_only: bool = True) -> dict[str, torch.Tensor]:
        """The full module state in the model's dtype on the host (a collective; ``{}`` off rank 0 with
        ``rank0_only``): what ``engine._zero3_consolidated_16bit_state_dict()`` returns."""
        from .checkpoint3 import _gathered

        keep = not rank0_only or self.ctx.rank == 0
        return _gathered(self.ctx.module, self.parts, keep)

    def save(self, writer) -> None:
        from .checkpoint3 import save_shards

        save_shards(self, writer)

    def load(self, reader, load_optimizer_states: bool) -> None:
        from .checkpoint3 import load_shards

        load_shards(self, reader, load_optimizer_states)

    def close(self) -> None:
        self.reducer.remove()
        self.coordinator.remove()
        self.zero.close()
