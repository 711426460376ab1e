"""Lightning's strategy for ds: ``Trainer(strategy="ds_stage_2")`` or ``Trainer(strategy=DSStrategy(...))``.

Importing this module registers :class:`DSStrategy` in Lightning's ``StrategyRegistry`` as ``ds`` (the
stage comes from the config), ``ds_stage_1``, ``ds_stage_2``, ``ds_stage_3`` and ``ds_stage_3_offload``
(optimizer state and parameters in host memory). Unlike Lightning's own DeepSpeed strategy it runs on
CPUs (gloo) as well as on GPUs.

How the pieces meet:

- ``setup`` builds the ds engine around the ``LightningModule`` with :func:`ds_core.initialize`: the
  optimizer from ``configure_optimizers`` (or the config's ``optimizer`` section), the config completed
  from the Trainer (micro-batch size from the train dataloader, ``accumulate_grad_batches``,
  ``gradient_clip_val``, the precision flag);
- ``training_step`` runs through the engine's ``forward`` (Lightning's forward redirection), the
  precision plugin's ``backward`` and ``optimizer_step`` call ``engine.backward`` and ``engine.step``
  — the engine accumulates, reduces, clips and steps, as with ``deepspeed_stage_2``;
- a learning-rate scheduler from ``configure_optimizers`` is stepped by the engine after each applied
  optimizer step (so never on a skipped fp16 step, and once per accumulated batch), not by Lightning;
  it is saved in the engine's checkpoint;
- ``save_checkpoint`` writes an engine checkpoint *directory* at the path Lightning picks (e.g.
  ``epoch=0-step=4.ckpt/``), Lightning's own state (loops, callbacks such as ``ModelCheckpoint``) going
  into ``client_state``; ``load_checkpoint`` (``ckpt_path=``) restores weights, optimizer state,
  scheduler, counters and that state.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.plugins.precision import Precision
from lightning.pytorch.strategies import DDPStrategy, StrategyRegistry
from lightning.pytorch.trainer.states import TrainerFn

import ds_core

from ..config.loader import read_config
from ..errors import ConfigError

__all__ = ["DSStrategy", "DSPrecision", "STRATEGY_NAMES"]

#: registry name -> the ``DSStrategy`` arguments it stands for
STRATEGY_NAMES = {
    "ds": {},
    "ds_stage_1": {"stage": 1},
    "ds_stage_2": {"stage": 2},
    "ds_stage_3": {"stage": 3},
    "ds_stage_3_offload": {"stage": 3, "offload_optimizer": True, "offload_parameters": True},
}

_PRECISION_SECTIONS = {"bf16": "bf16", "16": "fp16"}


class DSPrecision(Precision):
    """Lightning's precision plugin for the ds engine: ``backward`` and ``optimizer_step`` go to the engine,
    which owns the dtype (the config's ``bf16``/``fp16`` sections), loss scaling and clipping."""

    def __init__(self, precision: str = "32-true") -> None:
        self.precision = str(precision)

    def backward(self, tensor: torch.Tensor, model: pl.LightningModule, optimizer, *args: Any, **kwargs: Any) -> None:
        model.trainer.strategy.engine.backward(tensor, *args, **kwargs)

    def optimizer_step(self, optimizer, model: pl.LightningModule, closure: Callable[[], Any], **kwargs: Any) -> Any:
        result = closure()
        self._after_closure(model, optimizer)
        if model.automatic_optimization and result is None:
            raise ConfigError("training_step returned None (skip this batch): under ds every rank must run "
                              "backward each step; return the loss, or zero it (loss * 0) to skip")
        model.trainer.strategy.engine.step()
        return result

    def clip_gradients(self, optimizer, clip_val=0.0, gradient_clip_algorithm=None) -> None:
        """The engine clips (``gradient_clipping``, from ``Trainer(gradient_clip_val=)``)."""


def _config_dict(config) -> dict:
    if config is None:
        return {}
    if isinstance(config, (str, os.PathLike)):
        raw, _ = read_config(str(config))
        return dict(raw)
    if isinstance(config, Mapping):
        return {k: (dict(v) if isinstance(v, Mapping) else v) for k, v in config.items()}
    raise ConfigError(f"DSStrategy(config={config!r}): pass a dict or the path of a DeepSpeed/ds JSON config")


class DSStrategy(DDPStrategy):
    """Train a ``LightningModule`` with the ds engine (ZeRO 0-3, offload, bf16/fp16) on any accelerator.

    ``config``: a DeepSpeed/ds config (dict or JSON path); ``stage``: ZeRO stage (overrides the config's
    ``zero_optimization.stage``); ``offload_optimizer`` / ``offload_parameters``: host-memory offload;
    ``exclude_frozen_parameters``: leave frozen parameters out of checkpoints.
    """

    strategy_name = "ds"

    def __init__(self, config: dict | str | os.PathLike | None = None, stage: int | None = None,
                 offload_optimizer: bool = False, offload_parameters: bool = False,
                 exclude_frozen_parameters: bool = False, accelerator=None, parallel_devices=None,
                 cluster_environment=None, checkpoint_io=None, precision_plugin=None,
                 process_group_backend: str | None = None, **kwargs: Any) -> None:
        super().__init__(accelerator=accelerator, parallel_devices=parallel_devices,
                         cluster_environment=cluster_environment, checkpoint_io=checkpoint_io,
                         precision_plugin=precision_plugin, process_group_backend=process_group_backend, **kwargs)
        self.config = _config_dict(config)
        zero = dict(self.config.get("zero_optimization") or {})
        if stage is not None:
            if stage not in (0, 1, 2, 3):
                raise ConfigError(f"DSStrategy(stage={stage!r}): the ZeRO stage is 0, 1, 2 or 3")
            zero["stage"] = stage
        if offload_optimizer:
            zero.setdefault("offload_optimizer", {"device": "cpu"})
        if offload_parameters:
            if zero.get("stage", 0) != 3:
                raise ConfigError("DSStrategy(offload_parameters=True) needs ZeRO stage 3 (stage=3)")
            zero.setdefault("offload_param", {"device": "cpu"})
        if zero:
            self.config["zero_optimization"] = zero
        self.exclude_frozen_parameters = exclude_frozen_parameters
        self.engine = None

    # -- precision: whatever Lightning's connector picks becomes a DSPrecision --------------------------
    @property
    def precision_plugin(self) -> Precision:
        return self._precision_plugin if self._precision_plugin is not None else DSPrecision()

    @precision_plugin.setter
    def precision_plugin(self, plugin: Precision | None) -> None:
        if plugin is not None and not isinstance(plugin, DSPrecision):
            plugin = DSPrecision(getattr(plugin, "precision", "32-true"))
        self._precision_plugin = plugin

    # -- processes ---------------------------------------------------------------------------------------
    def setup_distributed(self) -> None:
        self.set_world_ranks()
        env = self.cluster_environment
        if not torch.distributed.is_initialized() and env is not None and os.name != "nt":
            os.environ.update(MASTER_ADDR=env.main_address, MASTER_PORT=str(env.main_port),
                              RANK=str(self.global_rank), WORLD_SIZE=str(self.world_size),
                              LOCAL_RANK=str(self.local_rank))
        self._process_group_backend = self._get_process_group_backend()
        ds_core.init_distributed(self._process_group_backend, timeout=self._timeout)

    # -- the engine --------------------------------------------------------------------------------------
    @property
    def restore_checkpoint_after_setup(self) -> bool:
        return True  # the engine must exist to load its checkpoint

    @property
    def handles_gradient_accumulation(self) -> bool:
        return True

    def _setup_model(self, model):
        return model

    def setup_optimizers(self, trainer: pl.Trainer) -> None:
        self.optimizers, self.lr_scheduler_configs = [], []  # the engine builds them in setup()

    def setup(self, trainer: pl.Trainer) -> None:
        self.accelerator.setup(trainer)
        self.model_to_device()
        if trainer.state.fn == TrainerFn.FITTING:
            self._build_engine(trainer)
        # validate/test/predict after fit() run through the engine (ZeRO-3 gathers what they touch)
        self.setup_precision_plugin()
        self.barrier()

    def _full_config(self, trainer: pl.Trainer) -> dict:
        config = dict(self.config)
        if "train_micro_batch_size_per_gpu" not in config and "train_batch_size" not in config:
            config["train_micro_batch_size_per_gpu"] = self._micro_batch_size(trainer)
        if "gradient_accumulation_steps" not in config:
            config["gradient_accumulation_steps"] = trainer.accumulate_grad_batches
        elif trainer.accumulate_grad_batches not in (1, config["gradient_accumulation_steps"]):
            raise ConfigError(f"Trainer(accumulate_grad_batches={trainer.accumulate_grad_batches}) and the config's "
                              f"gradient_accumulation_steps={config['gradient_accumulation_steps']} differ; set one")
        if trainer.gradient_clip_val and "gradient_clipping" not in config:
            if trainer.gradient_clip_algorithm not in (None, "norm"):
                raise ConfigError(f"gradient_clip_algorithm={trainer.gradient_clip_algorithm!r}: ds clips by the "
                                  f"global norm only; use gradient_clip_algorithm='norm'")
            config["gradient_clipping"] = float(trainer.gradient_clip_val)
        flag = self.precision_plugin.precision.split("-")[0]
        section = _PRECISION_SECTIONS.get(flag)
        if section and "bf16" not in config and "fp16" not in config:
            config[section] = {"enabled": True}
        config.setdefault("steps_per_print", 0)  # Lightning's progress bar and loggers report
        return config

    @staticmethod
    def _micro_batch_size(trainer: pl.Trainer) -> int:
        try:
            loader = trainer.fit_loop._data_source.dataloader()
        except Exception:  # a DataModule not set up yet, or no dataloader: count samples as 1 per step
            return 1
        return int(getattr(loader, "batch_size", None) or 1)

    def _build_engine(self, trainer: pl.Trainer) -> None:
        from lightning.pytorch.core.optimizer import _init_optimizers_and_lr_schedulers

        module = self.lightning_module
        config = self._full_config(trainer)
        if self.engine is not None:  # a second fit(): the previous engine lets go of the module first
            self.engine.destroy()
            self.engine = None
        optimizer = scheduler = None
        if "optimizer" not in config:
            optimizers, schedulers = _init_optimizers_and_lr_schedulers(module)
            if len(optimizers) != 1 or len(schedulers) > 1:
                raise ConfigError(f"configure_optimizers returned {len(optimizers)} optimizer(s) and "
                                  f"{len(schedulers)} scheduler(s); ds drives one optimizer and at most one "
                                  f"scheduler")
            optimizer = optimizers[0]
            if schedulers:
                if schedulers[0].interval != "step" or schedulers[0].reduce_on_plateau:
                    raise ConfigError("the scheduler from configure_optimizers must use interval='step' (the "
                                      "engine steps it after each applied optimizer step); ReduceLROnPlateau "
                                      "is not supported")
                scheduler = schedulers[0].scheduler
        engine, opt, _, _ = ds_core.initialize(model=module, optimizer=optimizer, lr_scheduler=scheduler,
                                               config=config, dist_init_required=False)
        self.engine = engine
        self.model = engine
        self.optimizers = [opt]

    # -- steps -------------------------------------------------------------------------------------------
    def optimizer_state(self, optimizer) -> dict:
        return {}  # saved by the engine, not in Lightning's dict

    def lightning_module_state_dict(self) -> dict:
        return {}  # the engine saves the weights (gathered or sharded) itself

    # -- checkpoints -------------------------------------------------------------------------------------
    def save_checkpoint(self, checkpoint: dict, filepath, storage_options=None) -> None:
        if storage_options is not None:
            raise TypeError("DSStrategy writes engine checkpoint directories; storage_options is not used")
        if self.engine is None:
            raise ConfigError("DSStrategy saves checkpoints while fitting (the engine exists from fit()); "
                              "outside fit, save the LightningModule's state_dict yourself")
        filepath = self.broadcast(str(filepath))
        client = {k: v for k, v in checkpoint.items() if k not in ("state_dict", "optimizer_states")}
        self.engine.save_checkpoint(filepath, tag="checkpoint", client_state=client,
                                    exclude_frozen_parameters=self.exclude_frozen_parameters)

    def load_checkpoint(self, checkpoint_path, weights_only: bool | None = None) -> dict[str, Any]:
        if self.engine is None:
            raise ConfigError(f"cannot load {checkpoint_path} outside fit(): DSStrategy checkpoints are engine "
                              f"directories; resume with trainer.fit(model, ckpt_path=...)")
        fitting = self.lightning_module.trainer.state.fn == TrainerFn.FITTING
        _, client = self.engine.load_checkpoint(checkpoint_path, load_optimizer_states=fitting,
                                                load_lr_scheduler_states=fitting,
                                                load_module_strict=self.lightning_module.strict_loading)
        return client

    @property
    def lightning_restore_optimizer(self) -> bool:
        return False  # the engine restored it

    def load_model_state_dict(self, checkpoint: Mapping[str, Any], strict: bool = True) -> None:
        pass  # the engine loaded the weights in load_checkpoint

    def load_optimizer_state_dict(self, checkpoint: Mapping[str, Any]) -> None:
        pass

    def remove_checkpoint(self, filepath) -> None:
        if self.is_global_zero:
            import shutil

            shutil.rmtree(filepath, ignore_errors=True)

    @classmethod
    def register_strategies(cls, strategy_registry) -> None:
        for name, kwargs in STRATEGY_NAMES.items():
            if name not in strategy_registry:
                strategy_registry.register(name, cls, description=f"ds engine: {kwargs or 'stage from the config'}",
                                           **kwargs)


DSStrategy.register_strategies(StrategyRegistry)
