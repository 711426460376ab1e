"""The pipeline engine: ``train_batch`` / ``eval_batch`` over the local stage of a ``PipelineModule``.

A pipeline is a *schedule* that drives ds-core's :class:`~ds_core.engine.Engine` built for the local
stage — precision, the data-parallel strategy (stage 0 or ZeRO-1) and its checkpoint state, the step
decision, the scheduler, counters and logging are all that engine's. This module only adds what is
pipeline-specific: the schedule (``schedule.py``) whose backward passes go through ``engine.backward``
and whose batch ends with ``engine.reduce_gradients`` and ``engine.optimizer_step``, the transfers
between stages (``p2p.py``), tied weights (``tied.py``), the gradient norm over all stages (a
``grad_norm`` engine hook), and per-layer model files (``checkpoint.py``).
"""

from __future__ import annotations

import math

import torch

from ds_core import comm
from ds_core.engine import Engine
from ds_core.engine.initialize import resolve_topology
from ds_core.engine.strategy import FullGradients
from ds_core.errors import ConfigError, DSError
from ds_core.params import shard_axis

from . import checkpoint as ckpt
from .executor import BatchState, run_instructions
from .module import PipelineModule
from .p2p import StageLink
from .schedule import InferenceSchedule, OptimizerStep, ReduceGrads, ReduceTiedGrads, TrainSchedule
from .tied import TiedWeights

__all__ = ["PipelineEngine", "PipelineError", "engine_class"]


class PipelineError(DSError, RuntimeError):
    """A batch failed on some rank; every rank raises this with that rank's error."""


def engine_class() -> type:
    """The ``engine_class`` component factory named in ``ds_feature.json``."""
    return PipelineEngine


def _check_config(module: PipelineModule, config) -> None:
    pcfg = config.section("pipeline")
    if pcfg is not None:
        if pcfg.stages != "auto" and pcfg.stages != module.num_stages:
            raise ConfigError(f"pipeline.stages {pcfg.stages} != the PipelineModule's {module.num_stages} stages; "
                              f"set pipeline.stages to 'auto' or build the module with num_stages={pcfg.stages}")
        if pcfg.partition_method is not None and pcfg.partition_method != module.partition_method:
            raise ConfigError(f"pipeline.partition_method {pcfg.partition_method!r} != the PipelineModule's "
                              f"{module.partition_method!r}; layers are placed when the module is built: pass "
                              f"partition_method= to PipelineModule or drop the key")
        if pcfg.activation_checkpoint_interval and not module.activation_checkpoint_interval:
            module.activation_checkpoint_interval = pcfg.activation_checkpoint_interval


class PipelineEngine:
    """Returned by :func:`ds_core.initialize` for a :class:`PipelineModule`; drive it with :meth:`train_batch`."""

    def __init__(self, module: PipelineModule, config, optimizer=None, model_parameters=None,
                 lr_scheduler=None, components: dict | None = None, topology=None) -> None:
        if not isinstance(module, PipelineModule):
            raise ConfigError(f"the pipeline engine needs a ds_pipe.PipelineModule, got {type(module).__name__}; "
                              f"describe the model as PipelineModule(layers=[...]) or drop the 'pipeline' section")
        _check_config(module, config)
        if topology is not None and topology is not module.topology and not topology.same_layout(module.topology):
            raise ConfigError(f"initialize(topology={topology!r}) differs from the PipelineModule's "
                              f"{module.topology!r}; build the module with topology= the one you pass")
        self.topology = module.topology
        # the axes the config asks for (tensor_parallel.autotp_size, sequence_parallel_size) must be the module's
        resolve_topology(module, self.topology, comm.get_world_size(), config)
        self.stage_id, self.num_stages = module.stage_id, module.num_stages
        config.resolve_batch(self.topology.size("data"))
        self.micro_batches = config.batch.gradient_accumulation_steps
        self.tied = TiedWeights(module, self.topology)  # before the strategy copies weights into masters
        self.core = Engine(module, config, optimizer=optimizer, model_parameters=model_parameters,
                           lr_scheduler=lr_scheduler, topology=self.topology, components=components,
                           module_layout=ckpt.LayerFiles(module))
        if not isinstance(self.core.strategy, FullGradients):
            strategy = getattr(self.core.strategy, "name", type(self.core.strategy).__name__)
            self.core.destroy()
            raise ConfigError(f"{strategy} keeps no full gradient of each parameter, which the pipeline needs "
                              f"(gradients accumulate over micro-batches and tied weights are summed across "
                              f"stages before averaging); use stage 0 or ZeRO stage 1 with a pipeline, as in "
                              f"DeepSpeed")
        self.module = self.core.module
        self.global_rank = comm.get_rank()
        column = self.topology.ranks_along("pipe", self.global_rank)
        self.link = StageLink(self.stage_id, column[self.stage_id - 1] if self.stage_id > 0 else None,
                              column[self.stage_id + 1] if self.stage_id < self.num_stages - 1 else None)
        multi = comm.get_world_size() > 1
        self.pipe_group = self.topology.group("pipe") if multi and self.num_stages > 1 else None
        # the step decision clips by the norm of every stage: this hook turns the stage's into that
        self.core.hooks.subscribe("grad_norm", self._norm_over_stages)
        self.agg_train_loss: torch.Tensor | None = None
        # every last-stage rank reports its loss: data replicas, and tensor/sequence ranks of one replica
        self._loss_ranks = max(1, self.topology.world_size // self.num_stages)

    @classmethod
    def initialize(cls, args=None, model=None, optimizer=None, model_parameters=None, training_data=None,
                   lr_scheduler=None, collate_fn=None, config=None, dist_init_required=None, components=None,
                   topology=None):
        if dist_init_required is not False and not comm.is_initialized():
            comm.init_distributed()
        engine = cls(model, config, optimizer=optimizer, model_parameters=model_parameters,
                     lr_scheduler=lr_scheduler, components=components, topology=topology)
        loader = None
        if training_data is not None:
            from ds_core.engine.data import build_dataloader

            loader = build_dataloader(training_data, engine.train_micro_batch_size_per_gpu(),
                                      engine.dp_world_size, engine.core.data_rank,
                                      seed=config.seed or 0, collate_fn=collate_fn)
        return engine, engine.optimizer, loader, engine.lr_scheduler

    # -- what DeepSpeed's PipelineEngine exposes ------------------------------------------------
    def is_first_stage(self) -> bool:
        return self.stage_id == 0

    def is_last_stage(self) -> bool:
        return self.stage_id == self.num_stages - 1

    optimizer = property(lambda self: self.core.optimizer)
    lr_scheduler = property(lambda self: self.core.lr_scheduler)
    config = property(lambda self: self.core.config)
    global_steps = property(lambda self: self.core.global_steps)
    global_samples = property(lambda self: self.core.global_samples)
    micro_steps = property(lambda self: self.core.micro_steps)
    dp_world_size = property(lambda self: self.core.dp_world_size)
    world_size = property(lambda self: self.core.world_size)

    def train_batch_size(self) -> int:
        return self.core.train_batch_size()

    def train_micro_batch_size_per_gpu(self) -> int:
        return self.core.train_micro_batch_size_per_gpu()

    def gradient_accumulation_steps(self) -> int:
        return self.micro_batches

    def get_lr(self) -> list[float]:
        return self.core.get_lr()

    def get_global_grad_norm(self) -> float | None:
        return self.core.get_global_grad_norm()

    def get_loss_scale(self) -> float:
        return self.core.get_loss_scale()

    def train(self, mode: bool = True):
        self.module.train(mode)
        return self

    def eval(self):
        return self.train(False)

    def _only_batches(self, *_, **__):
        raise DSError("a pipeline engine runs whole batches: call engine.train_batch(data_iter) (forward, "
                      "backward and step of all gradient_accumulation_steps micro-batches) or "
                      "engine.eval_batch(data_iter), not forward/backward/step")

    forward = backward = step = __call__ = _only_batches

    # -- batches ---------------------------------------------------------------------------------
    def _agree(self, st: BatchState, loss_sum: float) -> float:
        """One all-reduce: did any rank fail, and the summed loss. Raises on every rank on failure."""
        t = torch.tensor([1.0 if st.error else 0.0, loss_sum], dtype=torch.float64)
        if comm.get_world_size() > 1:
            comm.all_reduce(t)
        if t[0] == 0:
            return float(t[1])
        self.core.zero_grad()
        self.link.reset_links()
        if comm.get_world_size() > 1:
            messages = comm.all_gather_strings(st.error or "")
        else:
            messages = [st.error]
        first = next(r for r, m in enumerate(messages) if m)
        where = self.topology.coordinates(first)
        text = (f"pipeline batch failed on rank {first} (stage {where['pipe']}, data {where['data']}): "
                f"{messages[first]}")
        if st.error is None:
            text += f" (rank {self.global_rank} stopped because of it)"
        raise PipelineError(text) from st.exception

    def train_batch(self, data_iter=None) -> torch.Tensor:
        """Forward and backward of ``gradient_accumulation_steps`` micro-batches, then one optimizer
        step. Returns the mean loss (over micro-batches and data-parallel ranks) on every stage."""
        self.module.train()
        sched = TrainSchedule(self.micro_batches, self.num_stages, self.stage_id)
        st = BatchState("train", self.micro_batches)
        cmds = sched.instructions()
        run_instructions(self, st, [c for c in cmds if c.micro_batch >= 0], data_iter)
        loss_sum = float(sum(st.losses)) / self.micro_batches if self.is_last_stage() and not st.error else 0.0
        total = self._agree(st, loss_sum)
        loss = total / self._loss_ranks
        for cmd in cmds:
            if isinstance(cmd, ReduceTiedGrads):
                self.tied.reduce(self.core.strategy)
            elif isinstance(cmd, ReduceGrads):
                self.core.reduce_gradients()
            elif isinstance(cmd, OptimizerStep):
                self.core.optimizer_step(loss)
                self.core.micro_steps += self.micro_batches
        self.agg_train_loss = torch.tensor(loss)
        return self.agg_train_loss

    def eval_batch(self, data_iter=None, return_logits: bool = False):
        """Forward of ``gradient_accumulation_steps`` micro-batches; the mean loss on every stage
        (and, with ``return_logits``, ``(loss, logits)`` with the last stage's outputs, ``None`` elsewhere)."""
        was_training = self.module.training
        self.module.eval()
        st = BatchState("eval", self.micro_batches)
        try:
            sched = InferenceSchedule(self.micro_batches, self.num_stages, self.stage_id)
            run_instructions(self, st, sched.instructions(), data_iter)
        finally:
            self.module.train(was_training)
        loss_sum = float(sum(st.losses)) / self.micro_batches if self.is_last_stage() and not st.error else 0.0
        loss = torch.tensor(self._agree(st, loss_sum) / self._loss_ranks)
        if not return_logits:
            return loss
        logits = torch.cat(st.logits) if self.is_last_stage() and st.logits else None
        return loss, logits

    # -- the step --------------------------------------------------------------------------------
    def _norm_over_stages(self, sq: float) -> float:
        """The ``grad_norm`` hook: this stage's squared norm -> the sum over every stage, tied copies
        counted once (every stage but a tie's first owner subtracts its copy). A copy sharded over an
        axis (tensor parallelism) entered the stage's norm summed over that axis, so its shards' squares
        are summed over the same group before they are subtracted."""
        strategy = self.core.strategy
        total = torch.tensor([sq], dtype=torch.float64)
        for p in self.tied.duplicates():
            copy = torch.linalg.vector_norm(strategy.gradient_of(p), dtype=torch.float64).pow(2).reshape(1)
            axis = shard_axis(p)
            group = self.core.groups.group(axis) if axis is not None else None
            if group is not None and comm.get_world_size(group) > 1:
                comm.all_reduce(copy, group=group)
            total -= copy
        if self.pipe_group is not None:
            comm.all_reduce(total, group=self.pipe_group)
        value = float(total)
        return max(value, 0.0) if math.isfinite(value) else value

    # -- checkpoints -----------------------------------------------------------------------------
    def save_checkpoint(self, save_dir, tag: str | None = None, client_state: dict | None = None,
                        save_latest: bool = True):
        """Per-layer model files, the strategy's state of each stage, the engine's JSON (``checkpoint.py``)."""
        return self.core.save_checkpoint(save_dir, tag, client_state, save_latest,
                                         extra_meta=ckpt.pipeline_meta(self.module))

    def load_checkpoint(self, load_dir, tag: str | None = None, load_optimizer_states: bool = True,
                        load_lr_scheduler_states: bool = True, load_module_only: bool = False):
        with_state = load_optimizer_states and not load_module_only
        return self.core.load_checkpoint(load_dir, tag, load_optimizer_states=with_state,
                                         load_lr_scheduler_states=load_lr_scheduler_states,
                                         load_module_only=load_module_only,
                                         check=lambda reader: ckpt.check(self, reader, with_state))

    def destroy(self) -> None:
        self.core.destroy()
