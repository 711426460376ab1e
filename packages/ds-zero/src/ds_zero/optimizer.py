"""The ZeRO optimizer wrapper (the engine's ``optimizer_wrapper`` component) for stages 1 and 2.

Each rank keeps fp32 master weights and optimizer state for its own partition only — 1/N of them
(P_os, Rajbhandari et al. 2020, section 5.1) — one flat master tensor per parameter group, so the
group's hyper-parameters apply to every element of it. A step:

1. takes this rank's averaged gradient partition from the reducer (a view of stage 1's full
   gradient, or stage 2's partition; with offload, a copy into host memory);
2. computes the global gradient norm from one all-reduce of the squared partition norms — an fp16
   overflow anywhere makes that sum non-finite, so the same collective agrees on skipping the step;
   groups partitioned over another axis (experts) sum over their own group and then over their shard
   axis (the other experts), so every rank ends with the same total;
3. unscales and clips in one multiply (``clip / (norm + 1e-6)``, the rule of ``clip_grad_norm_``);
4. steps the partition optimizer, copies the masters back in the model's dtype, and all-gathers the
   updated partitions into every rank's model (``allgather_bucket_size`` elements at a time).

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

import inspect
import math

import torch
import torch.distributed as dist

from ds_core import comm
from ds_core.engine.mixed import copy_target, fuses
from ds_core.engine.optimizers import build_optimizer
from ds_core.engine.precision import LossScaler
from ds_core.errors import ConfigError, DSError

from .partition import Partitions
from .swap import SwapError, wait_all

__all__ = ["ZeroOptimizer", "build"]


class ZeroOptimizer:
    """Steps this rank's partition of every parameter group; see the module docstring."""

    def __init__(self, engine, cfg, parts: Partitions, reducer, client=None) -> None:
        self.parts = parts
        self.reducer = reducer
        self.stage = cfg.stage
        self.precision = engine.precision
        self.offload = cfg.offload
        self.allgather_bucket_numel = cfg.allgather_bucket_size
        clip = engine.config.gradient_clipping
        self.clip = clip if isinstance(clip, float) else 0.0
        self.scaler = LossScaler.from_config(engine.config.fp16) if self.precision == "fp16" else None
        self.global_grad_norm: float | None = None
        self.skipped_steps = 0
        self.master_device = torch.device("cpu") if self.offload else engine.device
        self.comm_device = engine.device
        pin = (cfg.offload_optimizer.pin_memory and self.offload and engine.device.type != "cpu"
               and engine.accelerator.supports("pinned_memory"))
        self.nvme = cfg.offload_optimizer.device == "nvme"
        self.swapped = None
        if self.nvme:
            self.aliased = False
            self.optimizer = self._build_swapped(engine, cfg, client, pin)
            return
        device_grads = reducer.grad_partitions()
        self.masters: list[torch.nn.Parameter] = []
        # aliased: the master is the model's own slice (fp32 on the device), nothing to copy back
        self.aliased = self.precision == "fp32" and not self.offload
        for gi, g in enumerate(parts.groups):
            if self.aliased:
                master = torch.nn.Parameter(g.own())
            else:
                master = torch.nn.Parameter(torch.empty(g.partition_numel, dtype=torch.float32,
                                                        device=self.master_device, pin_memory=pin))
                with torch.no_grad():
                    master.copy_(_own(g))
            if not self.offload:  # the reducer's own partition: no copy at the step
                master.grad = device_grads[gi]
            else:
                master.grad = torch.zeros(g.partition_numel, dtype=torch.float32, device=self.master_device,
                                          pin_memory=pin)
            self.masters.append(master)
        self.optimizer = self._build_optimizer(engine, client, self._groups(self.masters))

    def _groups(self, params_by_group) -> list[dict]:
        return [{**g.hyper, "params": p if isinstance(p, list) else [p]}
                for g, p in zip(self.parts.groups, params_by_group)]

    def _build_swapped(self, engine, cfg, client, pin: bool) -> torch.optim.Optimizer:
        """NVMe offload: the optimizer over one parameter per sub-group, its state in swap files."""
        from .swap import SwapStore
        from .swap_optimizer import SwappedOptimizerState, probe_state_keys

        off = cfg.offload_optimizer
        keys, fills = probe_state_keys(lambda groups: self._build_optimizer(engine, client, groups),
                                       self.parts.groups[0].hyper if self.parts.groups else {})
        width = 1 + len(keys)
        if off.buffer_size < width:
            raise ConfigError(f"offload_optimizer.buffer_size {off.buffer_size} is too small: one element needs "
                              f"{width} fp32 values (master + {keys}); set it to at least {width}, e.g. 1e8")
        chunk = max(1, min(cfg.sub_group_size or off.buffer_size, off.buffer_size // width))
        store = SwapStore(off.nvme_path, engine.global_rank, "optimizer", "offload_optimizer",
                          aio=getattr(engine.config, "aio", None))
        self.swapped = SwappedOptimizerState(store, [g.partition_numel for g in self.parts.groups], keys,
                                             chunk, off.buffer_count, pin, fills)
        for gi, g in enumerate(self.parts.groups):
            self.swapped.write_masters(gi, _own(g))
        self.masters = self.swapped.masters
        opt = self._build_optimizer(engine, client, self._groups(self.swapped.params_by_group()))
        # checkpoints read and load one state entry per group (the CPU-offload layout), so they move
        # between CPU and NVMe offload; torch's own methods would speak per sub-group
        opt.state_dict = lambda: self.swapped.state_dict(opt)
        opt.load_state_dict = lambda sd: self.swapped.load_state_dict(opt, sd)
        return opt

    def _build_optimizer(self, engine, client, groups: list[dict]) -> torch.optim.Optimizer:
        if client is None:
            if engine.config.optimizer is None:
                raise DSError("no optimizer: pass optimizer= to initialize() or add an 'optimizer' section "
                              "to the config")
            return build_optimizer(engine.config.optimizer, groups, device_type=self.master_device.type)
        if isinstance(client, torch.optim.Optimizer):  # same class and hyper-parameters, over the partitions
            return type(client)(groups, **_constructor_defaults(client))
        if callable(client):
            return client(groups)
        raise ConfigError(f"optimizer {client!r} is neither a torch.optim.Optimizer nor a callable taking "
                          f"parameter groups")

    # -- the engine's optimizer-wrapper protocol -------------------------------------------------
    @property
    def loss_scale(self) -> float:
        return self.scaler.scale if self.scaler else 1.0

    @property
    def param_groups(self):
        return self.optimizer.param_groups

    def _global_sq_norm(self, grads: list[torch.Tensor]) -> float:
        """Sum over ranks of the squared norms of every gradient partition (inf/nan if any overflowed)."""
        sums: dict[tuple, torch.Tensor] = {}
        for g, grad in zip(self.parts.groups, grads):
            local = sums.setdefault((g.axis, g.shard), torch.zeros((), dtype=torch.float64, device=self.comm_device))
            local += torch.linalg.vector_norm(grad, dtype=torch.float32).to(local) ** 2
        total = 0.0
        for (axis, shard), local in sums.items():
            for name in (axis, shard):
                group = self.parts.axis_groups.get(name) if name is not None else None
                if name is not None and comm.get_world_size(group) > 1:
                    dist.all_reduce(local, group=group)
            total += float(local)
        return total

    def step(self) -> bool:
        """Unscale, agree on overflow, clip, step the partitions, all-gather. False if skipped."""
        if self.swapped is not None:
            grads = self.reducer.grad_partitions()
        else:
            grads = [m.grad for m in self.masters]
            self.reducer.partition_grads(grads)
        sq = self._global_sq_norm(grads)
        inv = 1.0
        if self.scaler is not None:
            if not math.isfinite(sq):
                self.scaler.update(True)
                self.skipped_steps += 1
                self.global_grad_norm = float("inf")
                return False
            inv = 1.0 / self.scaler.scale
        norm = math.sqrt(sq) * inv if math.isfinite(sq) else sq
        self.global_grad_norm = norm
        coef = inv
        if self.clip > 0 and math.isfinite(norm):
            clip_coef = self.clip / (norm + 1e-6)  # torch.nn.utils.clip_grad_norm_'s rule
            if clip_coef < 1:
                coef *= clip_coef
        begin = getattr(self.parts, "begin_update", None)
        if begin is not None:  # stage 3 with NVMe shards: in-memory copies are about to go stale
            begin()
        if self.swapped is not None:
            self._swapped_step(grads, coef)
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
        if self.scaler is not None:
            self.scaler.update(False)
        return True

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
            dist.all_reduce(flags, group=group)
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

    def zero_grad(self) -> None:
        self.reducer.zero()

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


def _constructor_defaults(client: torch.optim.Optimizer) -> dict:
    """``client.defaults`` restricted to what its constructor takes (torch's AdamW records
    ``decoupled_weight_decay`` in its defaults but does not accept it)."""
    params = inspect.signature(type(client).__init__).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return dict(client.defaults)
    return {k: v for k, v in client.defaults.items() if k in params}


def _groups_for(engine, client) -> list[dict]:
    """The parameter groups to partition: the client optimizer's (keeping its hyper-parameters) or the engine's."""
    if isinstance(client, torch.optim.Optimizer):
        return [{**{k: v for k, v in g.items() if k != "params"},
                 "params": [p for p in g["params"] if p.requires_grad]} for g in client.param_groups]
    return engine.param_groups


def build(engine, client=None):
    """``optimizer_wrapper`` factory: None at stage 0, else a :class:`ZeroOptimizer` bound to the reducer."""
    cfg = engine.config.section("zero_optimization")
    if cfg is None or cfg.stage == 0:
        return None
    reducer = engine.reducer
    if not hasattr(reducer, "bind"):
        raise DSError(f"ZeRO stage {cfg.stage} needs ds-zero's gradient reducer, but the engine has "
                      f"{type(reducer).__name__}; another feature replaced it — remove that feature's "
                      f"section or use stage 0")
    if cfg.stage == 3:
        return _build_stage3(engine, cfg, reducer, client)
    if any(getattr(p, "ds_shard", None) is not None for p in engine.module.parameters()):
        raise ConfigError(f"the model was built under ds_zero.Init (its parameters are partitioned) but "
                          f"zero_optimization.stage is {cfg.stage}; set stage to 3 or build the model "
                          f"without Init")
    parts = Partitions(_groups_for(engine, client), engine.module, engine.dp_group, engine.dtype, engine.device,
                       axis_groups=getattr(engine, "axis_groups", None))
    reducer.bind(parts)
    return ZeroOptimizer(engine, cfg, parts, reducer, client)


def _build_stage3(engine, cfg, reducer, client) -> ZeroOptimizer:
    """Stage 3: shard every parameter (``stage3.py``), install the gather hooks (``gather.py``), and
    step the shards with the same :class:`ZeroOptimizer` as stages 1 and 2."""
    from .gather import ParameterCoordinator
    from .stage3 import Stage3Partitions

    param = cfg.offload_param
    offload = param.device in ("cpu", "nvme")
    pin = (offload and param.pin_memory and engine.device.type != "cpu"
           and engine.accelerator.supports("pinned_memory"))
    swap = None
    if param.device == "nvme":
        from .swap import SwapStore
        from .swap_params import ShardSwapper

        store = SwapStore(param.nvme_path, engine.global_rank, "param", "offload_param",
                          aio=getattr(engine.config, "aio", None))
        swap = ShardSwapper(store, param.buffer_count, param.buffer_size, pin)
    parts = Stage3Partitions(_groups_for(engine, client), engine.module, engine.dp_group, engine.dtype,
                             engine.device, cfg.stage3_param_persistence_threshold,
                             shard_device=torch.device("cpu") if offload else None, pin=pin, swap=swap)
    coordinator = ParameterCoordinator(parts, engine.module)
    reducer.bind(parts, coordinator)
    opt = ZeroOptimizer(engine, cfg, parts, reducer, client)
    parts.optimizer = opt
    parts.coordinator = coordinator
    return opt
