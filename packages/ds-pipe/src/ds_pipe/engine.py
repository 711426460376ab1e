"""The pipeline engine: ``train_batch`` / ``eval_batch`` over the local stage of a ``PipelineModule``.

Everything a stage shares with plain data parallelism — precision and master weights, the
data-parallel gradient average over ``topology.group("data")``, the optimizer wrapper (ZeRO stage 1's
when configured), the scheduler, counters and logging — is a ds-core :class:`~ds_core.engine.Engine`
built for the local stage. This engine only adds what is pipeline-specific: the schedule
(``schedule.py``), the transfers between stages (``p2p.py``), tied weights (``tied.py``), a gradient
norm over all stages, and per-layer checkpoints (``checkpoint.py``).
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

from ds_core import comm
from ds_core.engine import Engine
from ds_core.engine.precision import FlatGradients
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
    zero = config.section("zero_optimization")
    if zero is not None and getattr(zero, "stage", 0) >= 2 and module.num_stages > 1:
        raise ConfigError(f"zero_optimization.stage {zero.stage} partitions gradients during backward, which "
                          f"pipeline parallelism cannot use (gradients accumulate over micro-batches); use "
                          f"stage 0 or 1 with a pipeline, as in DeepSpeed")


class PipelineEngine:
    """Returned by :func:`ds_core.initialize` for a :class:`PipelineModule`; drive it with :meth:`train_batch`."""

    def __init__(self, module: PipelineModule, config, optimizer=None, model_parameters=None,
                 lr_scheduler=None, components: dict | None = None) -> None:
        if not isinstance(module, PipelineModule):
            raise ConfigError(f"the pipeline engine needs a ds_pipe.PipelineModule, got {type(module).__name__}; "
                              f"describe the model as PipelineModule(layers=[...]) or drop the 'pipeline' section")
        _check_config(module, config)
        self.topology = module.topology
        self.stage_id, self.num_stages = module.stage_id, module.num_stages
        config.resolve_batch(self.topology.size("data"))
        self.micro_batches = config.batch.gradient_accumulation_steps
        self.tied = TiedWeights(module, self.topology)  # before the core copies weights into masters
        self.core = Engine(module, config, optimizer=optimizer, model_parameters=model_parameters,
                           lr_scheduler=lr_scheduler, topology=self.topology, components=components)
        self.module = self.core.module
        multi = comm.get_world_size() > 1
        self.global_rank = comm.get_rank()
        column = self.topology.ranks_along("pipe", self.global_rank)
        self.link = StageLink(self.stage_id, column[self.stage_id - 1] if self.stage_id > 0 else None,
                              column[self.stage_id + 1] if self.stage_id < self.num_stages - 1 else None)
        self.pipe_group = self.topology.group("pipe") if multi and self.num_stages > 1 else None
        # The stage-local wrapper would clip by this stage's norm; we clip by the norm of all stages.
        clip = config.gradient_clipping
        self.clip = clip if isinstance(clip, float) else 0.0
        if hasattr(self.core.optimizer, "clip"):
            self.core.optimizer.clip = 0.0
        self._grad_norm: float | None = None
        self.agg_train_loss: torch.Tensor | None = None
        # every last-stage rank reports its loss: data replicas, and tensor/sequence ranks of one replica
        self._loss_ranks = max(1, comm.get_world_size() // self.num_stages)

    @classmethod
    def initialize(cls, args=None, model=None, optimizer=None, model_parameters=None, training_data=None,
                   lr_scheduler=None, collate_fn=None, config=None, dist_init_required=None, components=None):
        if dist_init_required is not False and not comm.is_initialized():
            comm.init_distributed()
        engine = cls(model, config, optimizer=optimizer, model_parameters=model_parameters,
                     lr_scheduler=lr_scheduler, components=components)
        loader = None
        if training_data is not None:
            from ds_core.engine.data import build_dataloader

            loader = build_dataloader(training_data, engine.train_micro_batch_size_per_gpu(),
                                      engine.dp_world_size, comm.get_rank(engine.core.dp_group),
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
        return self._grad_norm

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
            dist.all_reduce(t)
        if t[0] == 0:
            return float(t[1])
        self.core.optimizer.zero_grad()
        self.core.reducer.attach_grads()
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
                self.tied.reduce(self._flat_grads())
            elif isinstance(cmd, ReduceGrads):
                self.core.reducer.begin(True)
                self.core.reducer.finish()
            elif isinstance(cmd, OptimizerStep):
                self._optimizer_step(loss)
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
    def _flat_grads(self) -> FlatGradients:
        grads = self.core.flat_grads
        if not isinstance(grads, FlatGradients):
            raise DSError(f"the gradient reducer {type(self.core.reducer).__name__} keeps no full gradient "
                          f"buffer, which tied weights and the pipeline gradient norm need; use the default "
                          f"reducer or ZeRO stage 1")
        return grads

    def _clip_over_stages(self) -> None:
        """Global gradient norm over every stage (tied copies counted once), then clip by it.

        Parameters sharded over another axis (tensor parallelism) add their squared norms over that
        axis's group first, so each shard counts once."""
        grads = self._flat_grads()
        groups = self.core.axis_groups

        def sq_of(t: torch.Tensor, shard) -> torch.Tensor:
            sq = torch.linalg.vector_norm(t, dtype=torch.float64).pow(2).reshape(1)
            group = groups.get(shard) if shard is not None else None
            if group is not None and comm.get_world_size(group) > 1:
                dist.all_reduce(sq, group=group)
            return sq

        segments = getattr(grads, "segments", None) or [(None, None, 0, grads.numel)]
        sq = sum(sq_of(grads.buffer[start:end], shard) for _, shard, start, end in segments)
        for p in self.tied.duplicates():
            sq -= sq_of(grads.view_of(p), shard_axis(p))
        if self.pipe_group is not None:
            dist.all_reduce(sq, group=self.pipe_group)
        norm = math.sqrt(max(float(sq), 0.0)) / self.core.optimizer.loss_scale
        if not math.isfinite(norm):
            if self.core.precision == "fp16":  # overflow on another stage: this stage's wrapper skips too
                grads.buffer[0] = float("inf")
        elif self.clip > 0:
            coef = self.clip / (norm + 1e-6)  # torch.nn.utils.clip_grad_norm_'s rule
            if coef < 1:
                grads.buffer.mul_(coef)
        self._grad_norm = norm

    def _optimizer_step(self, loss: float) -> None:
        """Engine.step at an accumulation boundary, for a whole pipeline batch."""
        core = self.core
        self._clip_over_stages()
        applied = core.optimizer.step()
        if hasattr(core.optimizer, "global_grad_norm"):
            core.optimizer.global_grad_norm = self._grad_norm if applied else float("inf")
        core.optimizer.zero_grad()
        core.reducer.attach_grads()
        if applied and core.lr_scheduler is not None:
            core.lr_scheduler.step()
        core.micro_steps += self.micro_batches
        core.finish_step(loss)  # counters, throughput, monitors and the log line for this batch

    # -- checkpoints -----------------------------------------------------------------------------
    def save_checkpoint(self, save_dir, tag: str | None = None, client_state: dict | None = None,
                        save_latest: bool = True):
        return ckpt.save(self, save_dir, tag or f"global_step{self.global_steps}", client_state or {})

    def load_checkpoint(self, load_dir, tag: str | None = None, load_optimizer_states: bool = True,
                        load_lr_scheduler_states: bool = True, load_module_only: bool = False):
        return ckpt.load(self, load_dir, tag, load_optimizer_states and not load_module_only,
                         load_lr_scheduler_states and not load_module_only)

    def destroy(self) -> None:
        self.core.destroy()
