"""The Hugging Face ``Trainer`` on the ds engine: ``from ds_core.integrations.transformers import Trainer``.

``Trainer(model=..., args=TrainingArguments(...), ds_config="ds_config.json", ...)`` is
``transformers.Trainer`` with one more argument: a DeepSpeed/ds config (dict or path) whose ``"auto"``
values are filled from the ``TrainingArguments`` (:func:`ds_core.config.resolve_auto`). The Trainer
keeps its data loading (sharded by Accelerate), callbacks, logging, evaluation and checkpoint rotation;
the ds engine does the rest:

- ``_prepare_for_training`` (transformers 5's seam where DeepSpeed is set up) builds the engine with
  :func:`ds_core.initialize`: the optimizer and scheduler the Trainer would create (``optim``,
  ``learning_rate``, ``lr_scheduler_type``, ...), unless the config has ``optimizer`` / ``scheduler``
  sections. The engine steps the scheduler after each applied optimizer step.
- ``training_step`` runs ``engine(**inputs)``, ``engine.backward(loss)`` and ``engine.step()``, telling
  the engine where the Trainer's accumulation boundaries are (``set_gradient_accumulation_boundary``).
  The Trainer's own ``optimizer.step()``, scheduler step and gradient clipping become no-ops: the
  engine averaged, clipped (``gradient_clipping``, from ``max_grad_norm``) and stepped already.
- ``evaluate`` / ``predict`` run the model through the engine (ZeRO-3 gathers what it needs).
- ``save_model`` writes ``model.safetensors`` + config with ``save_pretrained`` from the engine's
  gathered 16-bit state dict (every rank joins the gather under ZeRO-3); checkpoints add the engine's
  checkpoint (``global_step{N}/`` and ``latest`` in ``checkpoint-{N}/``: sharded weights, optimizer
  state, scheduler, counters); ``train(resume_from_checkpoint=...)`` resumes from it.

Where transformers leaves no seam, the subclass overrides a private method of ``Trainer``:
``_prepare_for_training``, ``_wrap_model``, ``_clip_grad_norm``, ``_get_grad_norm``,
``_save_optimizer_and_scheduler``, ``_load_optimizer_and_scheduler``, ``_load_from_checkpoint``
(transformers 5.20+ names; pinned by the tests).
The loss of each micro-batch is its mean (``num_items_in_batch`` is not passed to the model): the
engine averages micro-batches, as DeepSpeed's does.
"""

from __future__ import annotations

import os
from typing import Any

import torch
import transformers

import ds_core

from ..config import resolve_auto
from ..config.loader import read_config
from ..errors import ConfigError

__all__ = ["Trainer", "engine_config"]


class _EngineOptimizer:
    """What the Trainer holds as its optimizer: the engine's, with ``step`` and ``zero_grad`` as no-ops
    (``training_step`` already stepped the engine)."""

    def __init__(self, engine) -> None:
        self.engine = engine

    @property
    def param_groups(self):
        return self.engine.optimizer.param_groups

    @property
    def state(self):
        return self.engine.optimizer.state

    @property
    def optimizer(self):
        return self.engine.optimizer.optimizer

    def step(self, closure=None) -> None:
        return None

    def zero_grad(self, set_to_none: bool = True) -> None:
        return None

    def state_dict(self) -> dict:
        raise NotImplementedError("the optimizer state is saved in the engine checkpoint (engine.save_checkpoint)")


class _EngineScheduler:
    """What the Trainer holds as its scheduler: the engine steps the real one after applied steps."""

    def __init__(self, engine) -> None:
        self.engine = engine

    def step(self, *args, **kwargs) -> None:
        return None

    def get_last_lr(self) -> list[float]:
        return self.engine.get_lr()

    def state_dict(self) -> dict:
        scheduler = self.engine.lr_scheduler
        return scheduler.state_dict() if scheduler is not None else {}


def engine_config(ds_config, args: transformers.TrainingArguments, max_steps: int, model=None) -> dict:
    """``ds_config`` with its ``"auto"`` values taken from ``args`` (as the Hugging Face integration does)."""
    raw, _ = read_config(ds_config)
    hidden = getattr(getattr(model, "config", None), "hidden_size", None)
    warmup = args.get_warmup_steps(max_steps) if hasattr(args, "get_warmup_steps") else args.warmup_steps
    config = resolve_auto(raw, per_device_train_batch_size=args.per_device_train_batch_size,
                          gradient_accumulation_steps=args.gradient_accumulation_steps, world_size=args.world_size,
                          learning_rate=args.learning_rate, weight_decay=args.weight_decay,
                          adam_beta1=args.adam_beta1, adam_beta2=args.adam_beta2, adam_epsilon=args.adam_epsilon,
                          max_grad_norm=args.max_grad_norm, warmup_steps=int(warmup), num_training_steps=max_steps,
                          hidden_size=hidden, fp16=args.fp16, bf16=args.bf16)
    config.setdefault("train_micro_batch_size_per_gpu", args.per_device_train_batch_size)
    config.setdefault("gradient_accumulation_steps", args.gradient_accumulation_steps)
    if args.max_grad_norm and "gradient_clipping" not in config:
        config["gradient_clipping"] = float(args.max_grad_norm)
    if args.bf16 and "bf16" not in config and "fp16" not in config:
        config["bf16"] = {"enabled": True}
    if args.fp16 and "fp16" not in config and "bf16" not in config:
        config["fp16"] = {"enabled": True}
    config.setdefault("steps_per_print", 0)  # the Trainer logs
    return config


class Trainer(transformers.Trainer):
    """``transformers.Trainer`` training through the ds engine; ``ds_config``: a DeepSpeed/ds config."""

    def __init__(self, *args: Any, ds_config: Any = None, **kwargs: Any) -> None:
        if ds_config is None:
            raise ConfigError("ds_core.integrations.transformers.Trainer needs ds_config= (a DeepSpeed/ds config "
                              "dict or JSON path, e.g. {'zero_optimization': {'stage': 2}})")
        training_args = kwargs.get("args", args[1] if len(args) > 1 else None)
        if training_args is not None and getattr(training_args, "deepspeed", None):
            raise ConfigError("TrainingArguments(deepspeed=...) starts DeepSpeed's own integration; pass the config "
                              "to this Trainer as ds_config= instead and leave deepspeed unset")
        if not hasattr(transformers.Trainer, "_prepare_for_training"):
            raise ImportError(f"ds_core.integrations.transformers.Trainer needs transformers 5.20 or later (the "
                              f"Trainer's _prepare_for_training step); found {transformers.__version__}: "
                              f"pip install 'ds-core[transformers]'")
        super().__init__(*args, **kwargs)
        self.ds_config = ds_config
        self.engine = None
        self.model_accepts_loss_kwargs = False  # each micro-batch's mean loss; the engine averages them

    # -- building the engine ---------------------------------------------------------------------------
    def _prepare_for_training(self, max_steps, train_dataloader, resume_from_checkpoint):
        if self._created_lr_scheduler:
            self.lr_scheduler = None
            self._created_lr_scheduler = False
        config = engine_config(self.ds_config, self.args, max_steps, self.model)
        if self.engine is not None:  # a second train(): a fresh engine over the same model
            self.engine.destroy()
            self.engine = None
        optimizer = scheduler = None
        if "optimizer" not in config:
            optimizer = self.create_optimizer()
            if "scheduler" not in config:
                scheduler = self.create_scheduler(num_training_steps=max_steps, optimizer=optimizer)
        elif "scheduler" not in config:
            raise ConfigError("the ds config has an optimizer section but no scheduler: add a scheduler section "
                              "(e.g. WarmupLR), or drop the optimizer section to use the Trainer's optimizer and "
                              "scheduler")
        engine, *_ = ds_core.initialize(model=self.model, optimizer=optimizer, lr_scheduler=scheduler,
                                        config=config)
        self.engine = engine
        self.optimizer = _EngineOptimizer(engine)
        self.lr_scheduler = _EngineScheduler(engine)
        self.model_wrapped = engine
        if resume_from_checkpoint is not None:
            self._load_engine_checkpoint(resume_from_checkpoint)
        for attr in ("model", "optimizer", "lr_scheduler"):
            setattr(self.callback_handler, attr, getattr(self, attr))
        self.callback_handler.train_dataloader = train_dataloader
        return engine, train_dataloader

    def _wrap_model(self, model, training: bool = True, dataloader=None):
        if self.engine is not None:
            return self.engine  # evaluation and prediction also go through the engine (ZeRO-3 gathers)
        return super()._wrap_model(model, training, dataloader)

    # -- the step ----------------------------------------------------------------------------------------
    def training_step(self, model, inputs, num_items_in_batch=None) -> torch.Tensor:
        engine = self.engine
        engine.train()
        inputs = self._prepare_inputs(inputs)
        with self.compute_loss_context_manager():
            loss = self.compute_loss(engine, inputs)
        engine.set_gradient_accumulation_boundary(bool(self.accelerator.sync_gradients))
        engine.backward(loss)
        engine.step()
        return loss.detach() / self.current_gradient_accumulation_steps

    def _clip_grad_norm(self, model):
        return None  # the engine clipped (gradient_clipping)

    def _get_grad_norm(self, model, grad_norm=None):
        norm = self.engine.get_global_grad_norm() if self.engine is not None else None
        return None if norm is None else torch.tensor(norm)

    # -- saving and resuming -----------------------------------------------------------------------------
    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        if self.engine is None:
            return super().save_model(output_dir, _internal_call)
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        state = self.engine._zero3_consolidated_16bit_state_dict()  # a collective under ZeRO-3
        if self.args.should_save:
            self._save(output_dir, state_dict=state)
        if self.args.push_to_hub and not _internal_call:
            self.push_to_hub(commit_message="Model save", revision=self.args.hub_revision)

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        self.engine.save_checkpoint(output_dir)  # global_step{N}/ and latest, next to the model files

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        pass  # the engine checkpoint was loaded in _prepare_for_training

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        if not os.path.isfile(os.path.join(resume_from_checkpoint, "latest")):
            raise ConfigError(f"{resume_from_checkpoint} holds no ds engine checkpoint (no 'latest' file): resume "
                              f"from a checkpoint-N directory this Trainer saved")
        # the weights come from the engine checkpoint, once the engine exists

    def _load_engine_checkpoint(self, checkpoint: str) -> None:
        self.engine.load_checkpoint(checkpoint)
