"""Stage 0: plain data parallelism — every rank holds all parameters, gradients and optimizer state.

The default :class:`~ds_core.engine.strategy.DataParallelStrategy`:

- gradients live in one flat buffer (``precision.FlatGradients``; fp32 unless the precision keeps them
  in 16 bits), averaged by the bucketed,
  backward-overlapped all-reduce of ``reducer.py`` on micro-steps that synchronize;
- fp32: the optimizer steps the model's own parameters, whose ``.grad`` are views of that buffer;
  bf16/fp16: it steps one flat fp32 copy (the master weights, Micikevicius et al. 2018) whose
  gradients are the buffer's views, and the new values are copied back in the model's dtype — by the
  optimizer itself when it fuses the copy into its pass (``ds_core.optim.fused``); with 16-bit masters
  (``bf16_master_weights_and_grads``) the optimizer steps the 16-bit model weights themselves through
  ``low_precision.LowPrecisionStepper``, rounding stochastically;
- its checkpoint state is the optimizer state and the masters (``optimizer.safetensors``,
  ``master.safetensors``); parameters tagged as differing across data ranks (experts) make both
  per-rank files too, since every rank then holds state nobody else has.
"""

from __future__ import annotations

import torch
from safetensors import safe_open

from ..optim.fused import copy_target, fuses
from .checkpoint import CheckpointError, join_optimizer_state, split_optimizer_state
from .checkpoint_layout import sharded_names
from .low_precision import LowPrecisionStepper
from .precision import FlatGradients
from .reducer import DataParallelReducer
from .step import NormTerm

__all__ = ["ReplicatedStrategy"]


class ReplicatedStrategy:
    """Stage 0 (see the module docstring)."""

    layout = "replicated"
    name = "data parallel (stage 0)"

    def __init__(self) -> None:
        self.optimizer: torch.optim.Optimizer | None = None

    # -- prepare -----------------------------------------------------------------------------------
    def prepare(self, ctx) -> None:
        self.ctx = ctx
        self.precision = precision = ctx.precision
        self.model_params = ctx.params
        self.grads = FlatGradients(self.model_params, ctx.device, dtype=precision.grad_dtype)
        groups = ctx.groups
        self.reducer = DataParallelReducer(self.grads, groups.data, reduce=ctx.reduce,
                                           fp32_model=precision.grads_are_views, axis_groups=dict(groups.axes))
        self.shard_groups = dict(groups.axes)
        if precision.has_masters:
            self.flat_master = torch.empty(self.grads.numel, dtype=precision.master_dtype,
                                           device=self.grads.buffer.device)
            self.masters: dict[int, torch.nn.Parameter] = {}
            with torch.no_grad():
                for p, off in zip(self.grads.params, self.grads.offsets):
                    master = self.flat_master[off:off + p.numel()].view_as(p)
                    master.copy_(p.detach())
                    master = torch.nn.Parameter(master)
                    if not precision.low_precision:
                        master.grad = self.grads.view_of(p)
                    self.masters[id(p)] = master
            groups_for_opt = [{**g, "params": [self.masters[id(p)] for p in g["params"]]} for g in ctx.param_groups]
        else:
            self.masters = {id(p): p for p in self.model_params}
            groups_for_opt = [dict(g) for g in ctx.param_groups]
        self.low_precision = None
        if precision.low_precision:
            # 16-bit masters / gradients / optimizer state: see low_precision.py. One rounding stream
            # on every rank: the replicas must stay identical.
            grads = [[self.grads.view_of(p) for p in g["params"]] for g in ctx.param_groups]
            self.low_precision = LowPrecisionStepper(groups_for_opt, grads, ctx.make_optimizer, ctx.device.type,
                                                     precision, stream=0)
            self.optimizer = self.low_precision.optimizer
        else:
            self.optimizer = ctx.make_optimizer(groups_for_opt, ctx.device.type)
        self.sharded = sharded_names(ctx.module, ctx.topology.outer_axes())
        self._fused_copies: set[int] = set()
        self._by_master = {id(self.masters[id(p)]): p for p in self.grads.params}

    def master_of(self, p: torch.Tensor) -> torch.Tensor:
        return self.masters[id(p)]

    @property
    def param_groups(self):
        return self.optimizer.param_groups

    @property
    def state(self):
        """The optimizer state (per master parameter), as DeepSpeed's optimizer wrappers expose it."""
        return self.optimizer.state

    # -- backward ----------------------------------------------------------------------------------
    def begin_backward(self, sync: bool) -> None:
        self.reducer.begin(sync)

    def end_backward(self) -> None:
        self.reducer.finish()

    def gradient_of(self, param: torch.Tensor) -> torch.Tensor:
        return self.grads.view_of(param)

    # -- step --------------------------------------------------------------------------------------
    def grad_norm_terms(self) -> list[NormTerm]:
        buf = self.grads.buffer
        segments = self.grads.segments
        if len(segments) <= 1 and (not segments or segments[0][1] is None):
            return [NormTerm(torch.linalg.vector_norm(buf, dtype=torch.float32).double() ** 2)]
        return [NormTerm(torch.linalg.vector_norm(buf[start:end], dtype=torch.float32).double() ** 2,
                         () if shard is None else (self.shard_groups.get(shard),))
                for _, shard, start, end in segments]

    def step(self, coef: float) -> bool:
        buf = self.grads.buffer
        self._fused_copies = set()
        if self.low_precision is not None:
            self.low_precision.step(coef)
        elif fuses(self.optimizer, "grad_scale", "copy_to"):
            self.optimizer.step(grad_scale=coef, copy_to=self._copy_targets())
        else:
            if coef != 1.0:
                buf.mul_(coef)
            self.optimizer.step()
        if self.precision.has_masters:
            with torch.no_grad():
                for p in self.grads.params:
                    if id(p) not in self._fused_copies:
                        p.copy_(self.masters[id(p)])
        return True

    def _copy_targets(self) -> list[list[torch.Tensor | None]] | None:
        """Per optimizer group, the model parameter each master's new value is written into (bf16/fp16,
        contiguous, same device) or None where a separate copy is needed; records which were fused."""
        self._fused_copies = set()
        if not self.precision.has_masters:
            return None
        targets = []
        for group in self.optimizer.param_groups:
            row = []
            for m in group["params"]:
                p = self._by_master.get(id(m))
                row.append(copy_target(p, m))
                if row[-1] is not None:
                    self._fused_copies.add(id(p))
            targets.append(row)
        return targets

    def zero_grad(self) -> None:
        self.grads.zero()
        self.reducer.attach_grads()

    def sync_from_module(self) -> None:
        if self.precision.has_masters:
            with torch.no_grad():
                for p in self.grads.params:
                    self.masters[id(p)].copy_(p.detach())

    # -- checkpoints -------------------------------------------------------------------------------
    def module_keys(self) -> set[str]:
        return set()

    def save(self, writer) -> None:
        tensors, opt_meta = split_optimizer_state(self.optimizer.state_dict())
        writer.replicated("optimizer", tensors)
        writer.meta["optimizer"] = opt_meta
        masters = {"flat": self.flat_master} if self.precision.has_masters else None
        if masters is not None:
            writer.replicated("master", masters)
        if self.sharded:  # every rank holds state nobody else has
            writer.per_rank("optimizer", tensors)
            if masters is not None:
                writer.per_rank("master", masters)
            writer.rank_meta["optimizer"] = opt_meta

    def load(self, reader, load_optimizer_states: bool) -> None:
        meta = reader.meta
        tensors, opt_meta, master = reader.replicated("optimizer"), meta.get("optimizer"), reader.replicated("master")
        if self.sharded:
            saved_by_ranks: set[str] = set()
            for file in reader.rank_files("model"):
                with safe_open(str(file), framework="pt") as f:
                    saved_by_ranks |= set(f.keys())
            same = (reader.engine_meta.get("world_size") == self.ctx.world_size
                    and set(meta.get("sharded", [])) <= saved_by_ranks)
            if load_optimizer_states and not same:
                raise CheckpointError(
                    f"{reader.path}: sharded parameters (experts) were saved by {reader.engine_meta.get('world_size')} "
                    f"ranks; optimizer state cannot follow them to {self.ctx.world_size} ranks: pass "
                    f"load_optimizer_states=False to load the parameters only")
            if same:
                tensors, opt_meta = reader.per_rank("optimizer"), reader.rank_meta.get("optimizer")
                master = reader.per_rank("master")
        state = None
        if load_optimizer_states:
            state = join_optimizer_state(tensors or {}, opt_meta)
            if len(state["param_groups"]) != len(self.optimizer.param_groups):
                raise CheckpointError(f"{reader.path}: optimizer has {len(state['param_groups'])} parameter "
                                      f"groups, this run has {len(self.optimizer.param_groups)}; pass "
                                      f"load_optimizer_states=False to load the model only")
        reader.load_module()
        with torch.no_grad():
            if state is not None and master is not None and self.precision.has_masters:
                self.flat_master.copy_(master["flat"])
            else:
                self.sync_from_module()
        if state is not None:
            self.optimizer.load_state_dict(state)

    def close(self) -> None:
        self.reducer.remove()

