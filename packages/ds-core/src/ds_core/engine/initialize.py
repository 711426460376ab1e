"""``ds_core.initialize``: DeepSpeed's entry point, returning (engine, optimizer, dataloader, scheduler)."""

from __future__ import annotations

import os
import random
from typing import Any

import torch

from .. import comm
from ..config import parse_config
from ..errors import ConfigError
from .components import select_components

__all__ = ["initialize", "init_distributed"]


def init_distributed(dist_backend: str | None = None, **kwargs):
    """Create the default process group from the launcher's environment (see ds_core.comm)."""
    return comm.init_distributed(dist_backend=dist_backend, **kwargs)


def _config_source(args, config, config_params):
    if config is not None and config_params is not None:
        raise ConfigError("pass config= or config_params=, not both")
    source = config if config is not None else config_params
    from_args = getattr(args, "deepspeed_config", None) or getattr(args, "ds_config", None)
    if source is not None and from_args is not None:
        raise ConfigError("a config was given both in args.deepspeed_config and config=; keep one")
    source = source if source is not None else from_args
    if source is None:
        raise ConfigError("no config: pass config= (dict, JSON string or path) or args.deepspeed_config")
    return source


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy as np

        np.random.seed(seed)
    except ImportError:
        pass


def initialize(args=None, model: torch.nn.Module | None = None, optimizer=None, model_parameters=None,
               training_data=None, lr_scheduler=None, mpu=None, dist_init_required: bool | None = None,
               collate_fn=None, config: Any = None, config_params: Any = None):
    """Build the engine from a DeepSpeed-compatible config.

    Returns ``(engine, optimizer, dataloader, lr_scheduler)``; ``dataloader`` is ``None`` unless
    ``training_data`` is given. The config is validated (batch triple included) before any process
    group is created.
    """
    if model is None:
        raise ConfigError("initialize() needs model=")
    source = _config_source(args, config, config_params)
    world_env = int(os.environ.get("WORLD_SIZE", "1"))
    cfg = parse_config(source)
    components = select_components(cfg, model)
    if "engine_class" in components:  # a feature with its own training contract (e.g. pipeline)
        cls = components["engine_class"][1]()
        others = {k: v for k, v in components.items() if k != "engine_class"}
        return cls.initialize(args=args, model=model, optimizer=optimizer, model_parameters=model_parameters,
                              training_data=training_data, lr_scheduler=lr_scheduler,
                              collate_fn=collate_fn, config=cfg, dist_init_required=dist_init_required,
                              components=others)
    # Check the batch triple against the launch's world size before touching process groups.
    preset = comm.get_topology()
    cfg.resolve_batch(preset.size("data") if preset else world_env)
    if dist_init_required is not False and not comm.is_initialized():
        comm.init_distributed()
    comm.watchdog.start()  # also over a process group the caller made
    # A feature may have set the topology already (an MoE layer asks for an expert axis).
    topology = comm.get_topology() or comm.Topology(comm.get_world_size())
    comm.set_topology(topology)
    cfg.resolve_batch(topology.size("data"))
    comm.comms_logger.configure(cfg.comms_logger)
    if cfg.seed is not None:
        _seed_everything(cfg.seed)

    from .engine import Engine

    engine = Engine(model, cfg, optimizer=optimizer, model_parameters=model_parameters,
                    lr_scheduler=lr_scheduler, topology=topology, components=components)
    loader = None
    if training_data is not None:
        from .data import build_dataloader

        loader = build_dataloader(training_data, engine.train_micro_batch_size_per_gpu(),
                                  engine.dp_world_size, comm.get_rank(engine.dp_group),
                                  seed=cfg.seed or 0, collate_fn=collate_fn)
    return engine, engine.optimizer, loader, engine.lr_scheduler
