"""The training engine: the forward / backward / step contract, and nothing else.

``Engine`` is a ``torch.nn.Module`` wrapping the model (``engine.module``), as DeepSpeed's is: ``train``,
``eval``, ``parameters``, ``named_parameters``, ``state_dict`` (keys prefixed ``module.``) behave as for
any wrapper. It sequences three things and owns none of their internals:

- model transforms (``model_wrapper`` components), applied once, given a ``ModelContext``;
- the data-parallel strategy (``strategy.py``: stage 0 here, ZeRO from ds-zero), given a
  ``TrainingContext``: it averages gradients around each backward and applies the optimizer;
- the step decision shared by every strategy (``step.py``): global norm, overflow agreed by all ranks,
  clipping — so a strategy only ever sees "step with this coefficient".

Features that must act at other points subscribe to the engine hooks (``hooks.py``). Checkpoints are
the module files + the strategy's state + the engine's JSON (``checkpoint_layout.py``).
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Any

import torch

from .. import comm
from ..accelerator import get_accelerator
from ..data_efficiency.runtime import build_data_efficiency
from ..errors import ConfigError, DSError
from ..monitor.monitor import Monitor, Throughput, format_log_line
from ..monitor.timers import make_timers
from ..profiling.report import RunReport
from . import checkpoint_layout
from .checkpoint import CheckpointError, checkpoint_options
from .components import model_transforms
from .context import (
    COMM_DTYPES,
    ModelContext,
    OptimizerFactory,
    ProcessGroups,
    ReduceSettings,
    TrainingContext,
)
from .hooks import EngineHooks, StepInfo
from .precision import LossScaler, Precision
from .reducer import broadcast_parameters
from .step import decide_step
from .strategy import build_strategy, check_strategy

__all__ = ["Engine", "NonFiniteLossError"]


class NonFiniteLossError(DSError, FloatingPointError):
    """The loss became NaN or Inf in a run without loss scaling."""


def _param_groups(module: torch.nn.Module, optimizer, model_parameters) -> list[dict]:
    """Trainable parameters with their hyper-parameters: a client optimizer's groups, ``model_parameters``
    (parameters or groups), or all of the module's."""
    if isinstance(optimizer, torch.optim.Optimizer):
        items = optimizer.param_groups
    elif model_parameters is not None:
        items = list(model_parameters)
    else:
        return [{"params": [p for p in module.parameters() if p.requires_grad]}]
    if items and isinstance(items[0], dict):
        return [{**g, "params": [p for p in g["params"] if p.requires_grad]} for g in items]
    return [{"params": [p for p in items if p.requires_grad]}]


def _set_overflow(strategy, overflow: bool) -> None:
    """``strategy.overflow``: whether the last step was skipped (an fp16 overflow), which frameworks read
    from DeepSpeed's optimizer wrappers (``engine.optimizer.overflow``)."""
    try:
        strategy.overflow = overflow
    except AttributeError:  # a strategy with __slots__ or a read-only property keeps its own
        pass


class Engine(torch.nn.Module):
    """Returned by :func:`ds_core.initialize`; drive it with ``engine(batch)``, ``backward``, ``step``."""

    def __init__(self, module: torch.nn.Module, config, optimizer=None, model_parameters=None,
                 lr_scheduler=None, topology=None, components: dict | None = None, module_layout=None) -> None:
        super().__init__()
        components = components or {}
        self.config = config
        self.accelerator = get_accelerator()
        self.global_rank = comm.get_rank()
        self.local_rank = comm.get_local_rank()
        self.world_size = comm.get_world_size()
        self.topology = topology if topology is not None else comm.Topology(self.world_size)
        self.topology.check_world(self.world_size, "Engine")
        self.precision = config.precision
        self.precision_spec = Precision.from_config(config)
        self.dtype = self.precision_spec.dtype
        self.device = self.accelerator.device(self.local_rank if self.accelerator.device_type != "cpu" else None)
        self.hooks = EngineHooks()

        module = module.to(device=self.device, dtype=self.dtype)
        strategy, origin = build_strategy(components, config)  # not prepared: transforms see its layout
        seq_dtype = COMM_DTYPES.get(getattr(config, "seq_parallel_communication_data_type", None) or "fp32")
        for feature, factory, section in model_transforms(components):
            ctx = ModelContext(config.section(section) if section else None, self.topology, self.device,
                               self.precision_spec, self.hooks, self.global_rank, self.world_size,
                               strategy=strategy.layout, sequence_comm_dtype=seq_dtype,
                               global_steps=lambda: self.global_steps)
            module = factory(ctx, module)
            if not isinstance(module, torch.nn.Module):
                raise DSError(f"the model_wrapper of feature {feature!r} returned {type(module).__name__}, not a "
                              f"torch.nn.Module; it must return the (transformed) module")
        self.module = module
        self.groups = ProcessGroups.for_module(self.topology, module)
        self.dp_group = self.groups.data
        self.dp_world_size = comm.get_world_size(self.dp_group)
        self.data_rank = comm.get_rank(self.dp_group)
        self.scope = self.topology.scope(self.global_rank)
        # curriculum / layer drop / random-LTD: acts on the training forward's inputs and the model's blocks
        self.data_efficiency = build_data_efficiency(config, module, self.dp_group)
        if self.data_efficiency is not None and module_layout is not None:  # a schedule driver runs the module
            raise ConfigError("curriculum_learning / progressive_layer_drop / data_efficiency act in engine(...), "
                              "which a pipeline's schedule does not call; shorten sequences in your data "
                              "pipeline instead, or train without the pipeline section")
        broadcast_parameters(module, self.dp_group, axis_groups=dict(self.groups.axes))

        self.global_steps = 0
        self.global_samples = 0
        self.micro_steps = 0
        self.skipped_steps = 0
        self.global_grad_norm: float | None = None
        self.last_loss: float | None = None
        self._sync_enabled = True
        self._loss_sum = 0.0
        self._loss_count = 0
        self._tokens = 0
        self._broken: str | None = None  # why the state is inconsistent (a failed step or load), if it is
        self._module_layout = module_layout

        self.param_groups = _param_groups(module, optimizer, model_parameters)
        self.clip = config.gradient_clipping if isinstance(config.gradient_clipping, float) else 0.0
        self.loss_scaler = LossScaler.from_config(config.fp16) if self.precision_spec.loss_scaling else None
        section = components.get("data_parallel_strategy", (None, None, None))[2]
        ctx = TrainingContext(
            module=module, param_groups=tuple(self.param_groups), groups=self.groups, device=self.device,
            precision=self.precision_spec, reduce=ReduceSettings.from_config(config),
            make_optimizer=OptimizerFactory(optimizer, config.optimizer), hooks=self.hooks,
            accelerator=self.accelerator, rank=self.global_rank, world_size=self.world_size,
            section=config.section(section) if section else None, aio=getattr(config, "aio", None))
        strategy.prepare(ctx)
        check_strategy(strategy, origin)
        self.strategy = strategy
        self._boundary: bool | None = None  # set_gradient_accumulation_boundary's override
        _set_overflow(strategy, False)
        self.client_optimizer = optimizer
        self.lr_scheduler = self._scheduler(lr_scheduler)

        self.timers = make_timers(config.wall_clock_breakdown, accelerator=self.accelerator)
        self.monitor = Monitor(config, rank=self.global_rank)
        self.throughput = Throughput(window=max(1, config.steps_per_print or 10), accelerator=self.accelerator)
        self.run_report = RunReport(config.raw, self.global_rank, self.device, self.gradient_accumulation_steps())

    def _scheduler(self, client):
        opt = self.strategy.optimizer
        if client is None:
            if self.config.scheduler is None:
                return None
            from ..optim.schedulers import build_scheduler

            return build_scheduler(self.config.scheduler, opt)
        if callable(client) and not hasattr(client, "step"):
            return client(opt)
        if getattr(client, "optimizer", opt) is not opt:  # bound to the client's optimizer: rebind
            for new, old in zip(opt.param_groups, client.optimizer.param_groups):
                for key in ("lr", "initial_lr"):
                    if key in old:
                        new[key] = old[key]
            client.optimizer = opt
        return client

    # -- what DeepSpeed's engine exposes ---------------------------------------------------------------
    @property
    def optimizer(self):
        """The data-parallel strategy: it owns the optimizer (``.optimizer``) and its state, as
        DeepSpeed's ZeRO/fp16 optimizer wrappers do."""
        return self.strategy

    @property
    def reducer(self):
        """The strategy's gradient reducer, when it has one (for inspection)."""
        return getattr(self.strategy, "reducer", None)

    def train_batch_size(self) -> int:
        return self.config.batch.train_batch_size

    def train_micro_batch_size_per_gpu(self) -> int:
        return self.config.batch.micro_batch_size

    def gradient_accumulation_steps(self) -> int:
        return self.config.batch.gradient_accumulation_steps

    def is_gradient_accumulation_boundary(self) -> bool:
        if self._boundary is not None:
            return self._boundary
        return (self.micro_steps + 1) % self.gradient_accumulation_steps() == 0

    def set_gradient_accumulation_boundary(self, is_boundary: bool | None) -> None:
        """Say whether the next backward/step is an accumulation boundary, overriding the count of
        micro-steps (what Accelerate and the HF Trainer call when they own the accumulation loop).
        ``None`` returns to counting."""
        self._boundary = None if is_boundary is None else bool(is_boundary)

    def zero_gather_16bit_weights_on_model_save(self) -> bool:
        """Whether ``zero_optimization.stage3_gather_16bit_weights_on_model_save`` is set: frameworks
        then save the gathered 16-bit weights (:meth:`_zero3_consolidated_16bit_state_dict`)."""
        zero = self.config.get("zero_optimization") or {}
        return bool(zero.get("stage3_gather_16bit_weights_on_model_save", False))

    def _zero3_consolidated_16bit_state_dict(self, exclude_frozen_parameters: bool = False):
        """The full module state in the model's dtype on the host, on global rank 0 (``None`` elsewhere),
        as DeepSpeed returns it. Under ZeRO-3 the partitioned parameters are gathered one at a time:
        a collective, every rank must call it. Keys are the module's (no ``module.`` prefix)."""
        gather = getattr(self.strategy, "gathered_state_dict", None)
        if gather is not None:
            state = gather(rank0_only=True)
        else:
            state = {k: v.detach().to("cpu", copy=True) for k, v in self.module.state_dict().items()}
        if self.global_rank != 0:
            return None
        if exclude_frozen_parameters:
            frozen = set(checkpoint_layout.frozen_names(self.module))
            state = {k: v for k, v in state.items() if k not in frozen}
        return state

    def get_lr(self) -> list[float]:
        return [g["lr"] for g in self.strategy.optimizer.param_groups]

    def get_global_grad_norm(self) -> float | None:
        return self.global_grad_norm

    def get_loss_scale(self) -> float:
        return self.loss_scaler.scale if self.loss_scaler is not None else 1.0

    @contextmanager
    def no_sync(self):
        """Backward passes inside accumulate locally without communicating."""
        previous, self._sync_enabled = self._sync_enabled, False
        try:
            yield
        finally:
            self._sync_enabled = previous

    # -- torch.compile -------------------------------------------------------------------------------
    def compile(self, backend: str = "inductor", compile_kwargs: dict | None = None, schedule=None) -> None:
        """Compile the wrapped module's forward with ``torch.compile`` (DeepSpeed's ``engine.compile``), in
        place: parameters, state-dict keys, gradient hooks and checkpoints are unchanged, and backward runs
        the compiled graph's backward. ``compile_kwargs`` go to ``torch.compile`` (``mode``, ``dynamic``,
        ``fullgraph``, ...). Stages 0, 1 and 2 are supported; ZeRO-3 is refused: its parameters are
        gathered by module hooks around each layer's forward, which the graph cannot capture."""
        if schedule is not None:
            raise DSError(f"engine.compile(schedule={schedule!r}): DeepCompile schedules are not supported; "
                          f"call engine.compile() without schedule")
        if getattr(self.strategy, "layout", None) == "zero-3":
            raise DSError("engine.compile() is not supported with ZeRO stage 3 (its parameters are gathered by "
                          "hooks around each module's forward, which torch.compile cannot trace); use "
                          "zero_optimization.stage 2, or run stage 3 uncompiled")
        if self.is_compiled:
            return
        self.module.compile(backend=backend, **(compile_kwargs or {}))
        self._compiled = True

    @property
    def is_compiled(self) -> bool:
        """True after :meth:`compile`."""
        return getattr(self, "_compiled", False)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """``nn.Module.load_state_dict``; the strategy's master weights then follow the loaded weights."""
        result = super().load_state_dict(state_dict, strict=strict, assign=assign)
        self.strategy.sync_from_module()
        return result

    # -- the training contract -----------------------------------------------------------------------
    def cast_inputs(self, x: Any) -> Any:
        """Move inputs to the device; floating tensors take the model's dtype in bf16/fp16."""
        if isinstance(x, torch.Tensor):
            x = x.to(self.device, non_blocking=True)
            return x.to(self.dtype) if x.is_floating_point() and self.dtype != torch.float32 else x
        if isinstance(x, (list, tuple)):
            return type(x)(self.cast_inputs(v) for v in x)
        if isinstance(x, dict):
            return {k: self.cast_inputs(v) for k, v in x.items()}
        return x

    def curriculum_seqlen(self) -> int | None:
        """The curriculum's current sequence length (``None`` without a curriculum)."""
        return getattr(self.data_efficiency, "current_difficulty", None)

    def curriculum_enabled_legacy(self) -> bool:
        return self.config.curriculum_learning.enabled

    def get_pld_theta(self) -> float | None:
        """Progressive layer drop's current keep probability θ (``None`` when it is off)."""
        return getattr(self.data_efficiency, "theta", None)

    def forward(self, *inputs, **kwargs):
        if self.data_efficiency is not None and self.module.training:
            inputs, kwargs = self.data_efficiency.before_forward(self.global_steps, inputs, kwargs)
        first = inputs[0] if inputs else kwargs.get("input_ids")  # HF models are called with keywords
        if isinstance(first, torch.Tensor) and first.dim() >= 2 and not first.is_floating_point():
            self._tokens += first.numel()
        self.hooks.fire("forward_start")
        with self.timers("forward"):
            return self.run_report.forward(self.global_steps + 1, self.module, lambda: self.module(
                *self.cast_inputs(inputs), **self.cast_inputs(kwargs)))

    def backward(self, loss, retain_graph: bool = False, scale_wrt_gas: bool = True, *, grad_tensors=None,
                 sync: bool | None = None):
        """Backward of ``loss`` (scaled by 1/accumulation and the fp16 loss scale), with the strategy's
        gradient averaging around it at an accumulation boundary.

        Schedule drivers (the pipeline) pass ``grad_tensors``: ``loss`` is then the tensors to
        differentiate, taken as they are, and ``sync`` says whether this backward averages gradients.
        """
        if grad_tensors is None:
            value = float(loss.detach().float())
            if not self.precision_spec.loss_scaling and not math.isfinite(value):
                raise NonFiniteLossError(
                    f"loss is {value} at optimizer step {self.global_steps}, micro-step {self.micro_steps} "
                    f"({self.precision}); lower the learning rate, enable gradient_clipping, or check the "
                    f"inputs of this batch")
            self._loss_sum += value
            self._loss_count += 1
            tensors = loss.float() * self.loss_scaler.scale if self.loss_scaler is not None else loss
            if scale_wrt_gas and self.gradient_accumulation_steps() > 1:
                tensors = tensors / self.gradient_accumulation_steps()
        else:
            tensors = loss
        if sync is None:
            sync = self.is_gradient_accumulation_boundary() and self._sync_enabled
        self.hooks.fire("backward_start", sync)
        self.strategy.begin_backward(sync)
        with self.timers("backward"):
            torch.autograd.backward(tensors, grad_tensors, retain_graph=retain_graph)
        with self.timers("reduce"):
            self.strategy.end_backward()
        self.hooks.fire("backward_end", sync)
        return loss

    def reduce_gradients(self) -> None:
        """Average every gradient accumulated so far (after backward passes that did not synchronize):
        the pipeline's once-per-batch reduction."""
        self.strategy.begin_backward(True)
        self.strategy.end_backward()

    def step(self) -> None:
        """Apply the optimizer at a gradient-accumulation boundary; otherwise only count the micro-step."""
        if self.is_gradient_accumulation_boundary():
            self.optimizer_step()
        self.micro_steps += 1

    def optimizer_step(self, loss: float | None = None) -> bool:
        """One optimizer step over the accumulated gradients: the shared step decision (norm, overflow
        agreed by all ranks, clipping), the strategy's update, the scheduler, counters and the log line.
        Schedule drivers call it once per batch; ``loss`` then overrides the averaged loss it logs."""
        self._refuse_if_broken("step")
        with self.timers("step"):
            self.hooks.fire("before_step")
            scaler = self.loss_scaler
            decision = decide_step(self.strategy.grad_norm_terms(), scaler.scale if scaler else None, self.clip,
                                   self.hooks)
            applied = False
            if decision.apply:
                try:
                    applied = bool(self.strategy.step(decision.coef))
                except BaseException as exc:
                    self._broken = (f"optimizer step {self.global_steps + 1} failed ({type(exc).__name__}: "
                                    f"{exc}) after it had started updating weights")
                    raise
            if scaler is not None:
                scaler.update(not decision.apply)
            _set_overflow(self.strategy, not applied)
            if not applied:
                self.skipped_steps += 1
            self.global_grad_norm = decision.grad_norm if applied else float("inf")
            self.strategy.zero_grad()
            if applied and self.lr_scheduler is not None:
                self.lr_scheduler.step()
        self.finish_step(loss)
        self.hooks.fire("after_step", StepInfo(self.global_steps, applied, self.global_grad_norm,
                                               self.get_lr()[0]))
        return applied

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.strategy.zero_grad()

    def _refuse_if_broken(self, what: str) -> None:
        if self._broken is not None:
            error = CheckpointError if what == "save" else DSError
            raise error(f"cannot {what}: {self._broken}, so weights, master weights and optimizer state may "
                        f"disagree; load the last good checkpoint (engine.load_checkpoint) and continue from it")

    def finish_step(self, loss: float | None = None) -> None:
        """Count an applied optimizer step and log it; ``loss`` overrides the averaged loss."""
        self.global_steps += 1
        self.global_samples += self.train_batch_size()
        if loss is not None:
            self._loss_sum, self._loss_count = loss, 1
        self.last_loss = self._loss_sum / max(1, self._loss_count)
        tokens = self._tokens * self.dp_world_size
        self._loss_sum, self._loss_count, self._tokens = 0.0, 0, 0
        self.throughput.update(self.train_batch_size(), tokens or None)
        if self.monitor.enabled:
            events = [("Train/Samples/train_loss", self.last_loss, self.global_samples),
                      ("Train/Samples/lr", self.get_lr()[0], self.global_samples)]
            if self.loss_scaler is not None:
                events.append(("Train/Samples/loss_scale", self.get_loss_scale(), self.global_samples))
            self.monitor.write_events(events)
        extra = self.run_report.after_step(self.global_steps, self.throughput.seconds_per_step)
        every = self.config.steps_per_print
        if every and self.global_steps % every == 0:
            if self.global_rank == 0:
                self.run_report.print("[ds] " + format_log_line(
                    self.global_steps, self.last_loss, self.get_lr()[0], self.get_global_grad_norm(),
                    self.throughput.samples_per_sec, self.throughput.tokens_per_sec, **extra))
                if self.config.wall_clock_breakdown:
                    print("[ds] " + self.timers.log(["forward", "backward", "reduce", "step"],
                                                    normalizer=every), flush=True)
            elif self.config.wall_clock_breakdown:
                self.timers.reset()

    def destroy(self) -> None:
        """Close the monitors (flushing TensorBoard and W&B) and release the strategy's hooks."""
        self.monitor.close()
        self.run_report.close()
        self.strategy.close()

    # -- checkpoints ---------------------------------------------------------------------------------
    def module_files(self):
        """The module layout checkpoints use: the model files (``checkpoint_layout.ModuleFiles``), or the
        one a schedule driver passed (the pipeline's per-layer files)."""
        if self._module_layout is not None:
            return self._module_layout
        return checkpoint_layout.ModuleFiles(self.module, self.topology.outer_axes(), self.strategy.module_keys())

    def save_checkpoint(self, save_dir, tag: str | None = None, client_state: dict | None = None,
                        save_latest: bool = True, extra_meta: dict | None = None,
                        exclude_frozen_parameters: bool = False):
        """Write ``save_dir/tag`` (see docs/engine.md). ``client_state``: tensors and JSON values, nested
        in any way; ``exclude_frozen_parameters``: leave parameters that do not train out of the model
        files (loading then keeps the model's own values for them)."""
        self._refuse_if_broken("save")
        tag = tag or f"global_step{self.global_steps}"
        with checkpoint_options(save_latest=save_latest):
            return checkpoint_layout.save_engine(self, save_dir, tag, client_state or {}, extra_meta=extra_meta,
                                                 exclude_frozen=exclude_frozen_parameters)

    def load_checkpoint(self, load_dir, tag: str | None = None, load_module_strict: bool = True,
                        load_optimizer_states: bool = True, load_lr_scheduler_states: bool = True,
                        load_module_only: bool = False, check=None):
        """Load a checkpoint; returns ``(path, client_state)``. ``load_module_strict=False`` allows module
        tensors missing from the checkpoint or not in the model (shapes must still match);
        ``load_module_only`` loads the weights and nothing else (no optimizer, scheduler or counters).
        ``check(reader)`` is an extra check run before anything changes."""
        holder = {}

        def track(reader):  # a load that fails after the module changed leaves the engine unusable
            holder["reader"] = reader
            if check is not None:
                check(reader)

        try:
            out = checkpoint_layout.load_engine(
                self, load_dir, tag, load_optimizer_states and not load_module_only,
                load_lr_scheduler_states and not load_module_only, check=track, strict=load_module_strict)
        except BaseException as exc:
            reader = holder.get("reader")
            if reader is not None and reader.module_loaded:
                self._broken = f"loading {reader.path} failed after the model weights were loaded ({exc})"
            raise
        self._broken = None
        # gradients accumulated before the load belong to no step of the loaded state
        self.strategy.zero_grad()
        self._loss_sum, self._loss_count, self._tokens = 0.0, 0, 0
        return out
