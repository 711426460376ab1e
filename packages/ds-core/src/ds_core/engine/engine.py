"""The training engine: the forward / backward / step contract and nothing else.

Each concern is a component chosen from the config (see ``components.py``): the gradient reducer,
the optimizer wrapper (precision, loss scaling, clipping) and the checkpoint layout. The engine
only sequences them: forward, backward with accumulation boundaries, step, logging, checkpoints.
"""

from __future__ import annotations

import inspect
import math
from contextlib import contextmanager
from typing import Any

import torch

from .. import comm
from ..accelerator import get_accelerator
from ..errors import DSError
from ..params import reduce_axis, shard_axis
from . import checkpoint_layout
from .checkpoint import checkpoint_options
from .mixed import MixedPrecisionOptimizer
from .monitor import Monitor, Throughput, format_log_line
from .precision import DTYPES, FlatGradients, LossScaler
from .reducer import DataParallelReducer, broadcast_parameters
from .timers import make_timers

__all__ = ["Engine", "NonFiniteLossError"]

COMM_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


class NonFiniteLossError(DSError, FloatingPointError):
    """The loss became NaN or Inf in a run without loss scaling."""


def _param_groups(module: torch.nn.Module, model_parameters) -> list[dict]:
    if model_parameters is None:
        return [{"params": [p for p in module.parameters() if p.requires_grad]}]
    items = list(model_parameters)
    if items and isinstance(items[0], dict):
        return [{**g, "params": [p for p in g["params"] if p.requires_grad]} for g in items]
    return [{"params": [p for p in items if p.requires_grad]}]


class Engine:
    """Returned by :func:`ds_core.initialize`; drive it with ``engine(batch)``, ``backward``, ``step``."""

    def __init__(self, module: torch.nn.Module, config, optimizer=None, model_parameters=None,
                 lr_scheduler=None, topology=None, components: dict | None = None) -> None:
        components = components or {}
        self.config = config
        self.accelerator = get_accelerator()
        self.topology = topology
        self.dp_group = topology.group("data") if topology and comm.get_world_size() > 1 else None
        self.global_rank = comm.get_rank()
        self.local_rank = comm.get_local_rank()
        self.world_size = comm.get_world_size()
        self.dp_world_size = comm.get_world_size(self.dp_group)
        self.precision = config.precision
        self.dtype = DTYPES[self.precision]
        self.device = self.accelerator.device(self.local_rank if self.accelerator.device_type != "cpu" else None)

        module = module.to(device=self.device, dtype=self.dtype)
        if "model_wrapper" in components:
            module = components["model_wrapper"][1](self, module)
        self.module = module
        # Process groups of the axes tagged parameters use (ds_core.params); untagged use data.
        axes = {reduce_axis(p) for p in self.module.parameters()} | {shard_axis(p) for p in self.module.parameters()}
        axes.discard(None)
        multi = topology is not None and comm.get_world_size() > 1
        self.axis_groups = {a: topology.group(a) if multi else None for a in axes}
        broadcast_parameters(self.module, self.dp_group, axis_groups=self.axis_groups)

        self.global_steps = 0
        self.global_samples = 0
        self.micro_steps = 0
        self._sync_enabled = True
        self._loss_sum = 0.0
        self._loss_count = 0
        self._tokens = 0
        self.last_loss: float | None = None

        self.param_groups = _param_groups(self.module, model_parameters)
        params = [p for g in self.param_groups for p in g["params"]]
        # A component factory may return None to keep the default (e.g. ZeRO stage 0).
        self.grads: FlatGradients | None = None
        self.reducer = self._component(components, "gradient_reducer", self)
        if self.reducer is None:
            self.grads = FlatGradients(params, self.device)
            self.reducer = DataParallelReducer(
                self.grads, self.dp_group, prescale=config.prescale_gradients,
                predivide=config.gradient_predivide_factor, fp32_model=self.precision == "fp32",
                comm_dtype=COMM_DTYPES[config.communication_data_type] if config.communication_data_type else None,
                axis_groups=self.axis_groups)
        self.client_optimizer = optimizer
        self.optimizer = self._component(components, "optimizer_wrapper", self, optimizer)
        if self.optimizer is None:
            self.optimizer = self._default_optimizer(optimizer, params)
        self.lr_scheduler = self._scheduler(lr_scheduler)
        self.checkpoint_layout = (self._component(components, "checkpoint_layout", self)
                                  or checkpoint_layout.DefaultLayout())

        self.timers = make_timers(config.wall_clock_breakdown, accelerator=self.accelerator)
        self.monitor = Monitor(config, rank=self.global_rank)
        self.throughput = Throughput(window=max(1, config.steps_per_print or 10), accelerator=self.accelerator)

    # -- construction helpers ------------------------------------------------------------------
    @staticmethod
    def _component(components: dict, kind: str, *args):
        if kind not in components:
            return None
        return components[kind][1](*args)

    def _default_optimizer(self, client, params) -> MixedPrecisionOptimizer:
        if self.grads is None:
            raise DSError("a feature replaced the gradient reducer but not the optimizer wrapper; "
                          "the default optimizer wrapper needs the default reducer's gradient buffer")
        clip = self.config.gradient_clipping
        scaler = LossScaler.from_config(self.config.fp16) if self.precision == "fp16" else None
        wrapper = MixedPrecisionOptimizer(params, self.grads, self.precision, scaler,
                                          clip if isinstance(clip, float) else 0.0, self.dp_group,
                                          shard_groups=self.axis_groups)
        groups = wrapper.param_groups_for_optimizer(self.param_groups)
        if client is None:
            if self.config.optimizer is None:
                raise DSError("no optimizer: pass optimizer= to initialize() or add an 'optimizer' "
                              "section to the config")
            from .optimizers import build_optimizer

            wrapper.optimizer = build_optimizer(self.config.optimizer, groups,
                                                device_type=self.accelerator.device_type)
        elif isinstance(client, torch.optim.Optimizer):
            if self.precision == "fp32":
                wrapper.optimizer = client
            else:  # rebuild the same optimizer over the fp32 masters, keeping its hyper-parameters
                mapped = [{**{k: v for k, v in g.items() if k != "params"},
                           "params": [wrapper.master_of(p) for p in g["params"]]} for g in client.param_groups]
                accepted = inspect.signature(type(client)).parameters
                defaults = {k: v for k, v in client.defaults.items() if k in accepted}
                wrapper.optimizer = type(client)(mapped, **defaults)
        elif callable(client):
            wrapper.optimizer = client(groups)
        else:
            raise DSError(f"optimizer {client!r} is neither a torch.optim.Optimizer nor a callable "
                          f"taking parameter groups")
        return wrapper

    def _scheduler(self, client):
        opt = self.optimizer.optimizer if hasattr(self.optimizer, "optimizer") else self.optimizer
        if client is None:
            if self.config.scheduler is None:
                return None
            from .schedulers import build_scheduler

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

    # -- batch sizes and state -----------------------------------------------------------------
    def train_batch_size(self) -> int:
        return self.config.batch.train_batch_size

    def train_micro_batch_size_per_gpu(self) -> int:
        return self.config.batch.micro_batch_size

    def gradient_accumulation_steps(self) -> int:
        return self.config.batch.gradient_accumulation_steps

    def is_gradient_accumulation_boundary(self) -> bool:
        return (self.micro_steps + 1) % self.gradient_accumulation_steps() == 0

    def get_lr(self) -> list[float]:
        return [g["lr"] for g in self.optimizer.param_groups]

    def get_global_grad_norm(self) -> float | None:
        return self.optimizer.global_grad_norm

    def get_loss_scale(self) -> float:
        return self.optimizer.loss_scale

    @property
    def skipped_steps(self) -> int:
        return getattr(self.optimizer, "skipped_steps", 0)

    def train(self, mode: bool = True) -> Engine:
        self.module.train(mode)
        return self

    def eval(self) -> Engine:
        return self.train(False)

    @contextmanager
    def no_sync(self):
        """Backward passes inside accumulate locally without communicating."""
        previous, self._sync_enabled = self._sync_enabled, False
        try:
            yield
        finally:
            self._sync_enabled = previous

    # -- the training contract -----------------------------------------------------------------
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

    def forward(self, *inputs, **kwargs):
        first = inputs[0] if inputs else None
        if isinstance(first, torch.Tensor) and first.dim() >= 2 and not first.is_floating_point():
            self._tokens += first.numel()
        with self.timers("forward"):
            return self.module(*self.cast_inputs(inputs), **self.cast_inputs(kwargs))

    __call__ = forward

    def backward(self, loss: torch.Tensor, retain_graph: bool = False) -> torch.Tensor:
        value = float(loss.detach().float())
        if self.precision != "fp16" and not math.isfinite(value):
            raise NonFiniteLossError(
                f"loss is {value} at optimizer step {self.global_steps}, micro-step {self.micro_steps} "
                f"({self.precision}); lower the learning rate, enable gradient_clipping, or check the "
                f"inputs of this batch")
        self._loss_sum += value
        self._loss_count += 1
        scaled = loss.float() * self.optimizer.loss_scale if self.precision == "fp16" else loss
        if self.gradient_accumulation_steps() > 1:
            scaled = scaled / self.gradient_accumulation_steps()
        self.reducer.begin(self.is_gradient_accumulation_boundary() and self._sync_enabled)
        with self.timers("backward"):
            scaled.backward(retain_graph=retain_graph)
        with self.timers("reduce"):
            self.reducer.finish()
        return loss

    def step(self) -> None:
        """Apply the optimizer at a gradient-accumulation boundary; otherwise only count the micro-step."""
        if self.is_gradient_accumulation_boundary():
            with self.timers("step"):
                applied = self.optimizer.step()
                self.optimizer.zero_grad()
                self.reducer.attach_grads()
                if applied and self.lr_scheduler is not None:
                    self.lr_scheduler.step()
            self.finish_step()
        self.micro_steps += 1

    def zero_grad(self) -> None:
        self.optimizer.zero_grad()
        self.reducer.attach_grads()

    @property
    def flat_grads(self):
        """The flat fp32 gradient buffer of every trainable parameter, when the reducer keeps one
        (the default reducer and ZeRO stage 1; ``None`` under ZeRO stage 2)."""
        return self.grads if self.grads is not None else getattr(self.reducer, "grads", None)

    def finish_step(self, loss: float | None = None) -> None:
        """Count an applied optimizer step and log it. Engines that drive the optimizer themselves
        (the pipeline engine) call this after their step; ``loss`` overrides the averaged loss."""
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
            if self.precision == "fp16":
                events.append(("Train/Samples/loss_scale", self.get_loss_scale(), self.global_samples))
            self.monitor.write_events(events)
        every = self.config.steps_per_print
        if every and self.global_steps % every == 0:
            if self.global_rank == 0:
                print("[ds] " + format_log_line(
                    self.global_steps, self.last_loss, self.get_lr()[0], self.get_global_grad_norm(),
                    self.throughput.samples_per_sec, self.throughput.tokens_per_sec), flush=True)
                if self.config.wall_clock_breakdown:
                    print("[ds] " + self.timers.log(["forward", "backward", "reduce", "step"],
                                                    normalizer=every), flush=True)
            elif self.config.wall_clock_breakdown:
                self.timers.reset()

    def destroy(self) -> None:
        """Close the monitors (flushing TensorBoard and W&B) and remove the gradient hooks."""
        self.monitor.close()
        self.reducer.remove()

    # -- checkpoints ---------------------------------------------------------------------------
    def save_checkpoint(self, save_dir, tag: str | None = None, client_state: dict | None = None,
                        save_latest: bool = True):
        tag = tag or f"global_step{self.global_steps}"
        with checkpoint_options(save_latest=save_latest):
            return self.checkpoint_layout.save(self, save_dir, tag, client_state or {})

    def load_checkpoint(self, load_dir, tag: str | None = None, load_optimizer_states: bool = True,
                        load_lr_scheduler_states: bool = True, load_module_only: bool = False):
        return self.checkpoint_layout.load(self, load_dir, tag,
                                           load_optimizer_states and not load_module_only,
                                           load_lr_scheduler_states and not load_module_only)
