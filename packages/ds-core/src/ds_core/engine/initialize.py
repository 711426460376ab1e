"""``ds_core.initialize``: DeepSpeed's entry point, returning (engine, optimizer, dataloader, scheduler)."""

from __future__ import annotations

import os
import random
from typing import Any

import torch

from .. import comm
from ..comm.topology import Topology
from ..config import parse_config
from ..errors import ConfigError
from .components import select_components

__all__ = ["initialize", "init_distributed", "resolve_topology", "config_axes"]


def init_distributed(dist_backend: str | None = None, auto_mpi_discovery: bool = True,
                     distributed_port: int | None = None, timeout=None, **kwargs):
    """Create the default process group from the launcher's environment (see ds_core.comm), with
    DeepSpeed's signature.

    ``auto_mpi_discovery``: take rank and world size from MPI/PMI/SLURM variables when torchrun's are
    absent (the default); ``False`` requires torchrun's (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``).
    ``distributed_port``: the rendezvous port when the launcher set no ``MASTER_PORT``.
    ``timeout``: a ``datetime.timedelta`` or seconds for collectives (default 30 minutes).
    """
    from ..comm.env import detect
    from ..errors import CommError

    if not comm.is_initialized():
        env = detect()
        if env.source not in ("torchrun", "single") and not auto_mpi_discovery:
            raise CommError(f"rank {env.rank} of {env.world_size} comes from {env.source} variables, and "
                            f"auto_mpi_discovery=False takes them only from torchrun's (RANK, WORLD_SIZE, "
                            f"MASTER_ADDR, MASTER_PORT): launch with torchrun/ds run, or pass "
                            f"auto_mpi_discovery=True")
        if distributed_port is not None and env.source != "single" and "MASTER_PORT" not in os.environ:
            os.environ["MASTER_PORT"] = str(int(distributed_port))
    if timeout is not None:
        kwargs["timeout"] = timeout
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


def config_axes(config) -> dict[str, tuple[int, str]]:
    """Axes the config asks for: ``sequence_parallel_size`` (a top-level key), and every feature section
    whose parsed model has ``ds_axes() -> {axis: size}`` (ds-parallel's ``tensor_parallel`` section asks
    for ``{"tensor": autotp_size}``). ``axis -> (size, where)``; sizes of 1 ask for nothing."""
    if config is None:
        return {}
    wanted: list[tuple[str, int, str]] = []
    seq = getattr(config, "sequence_parallel_size", 1) or 1
    if seq > 1:
        wanted.append(("sequence", int(seq), "config sequence_parallel_size"))
    for name, section in config.features.items():
        ask = getattr(section, "ds_axes", None)
        if callable(ask):
            wanted += [(axis, int(size), f"config section {name!r}") for axis, size in (ask() or {}).items()]
    asked: dict[str, tuple[int, str]] = {}
    for axis, size, where in wanted:
        if size <= 1:
            continue
        if axis in asked and asked[axis][0] != size:
            raise ConfigError(f"{asked[axis][1]} asks for {axis}={asked[axis][0]} and {where} for {axis}={size}; "
                              f"one run has one size per axis: make them agree")
        asked[axis] = (size, where)
    return asked


def resolve_topology(model: torch.nn.Module | None, topology, world_size: int, config=None):
    """The run's topology: ``topology`` if given, else the one the model's layers were built with
    (``ds_topology``), else one built from the axes they and the config ask for (``ds_axes``, e.g. an
    MoE layer's ``{"expert": ep_size}``; :func:`config_axes`). Checked against ``world_size`` and every
    layer's and config section's needs before any process group exists; layers that asked for axes
    are then given it (their ``ds_topology``)."""
    built: list[tuple[str, Topology]] = []
    asked: dict[str, tuple[int, str]] = dict(config_axes(config))
    users = []
    for name, m in (model.named_modules() if model is not None else ()):
        own = getattr(m, "ds_topology", None)
        if isinstance(own, Topology):
            built.append((name or type(m).__name__, own))
        for axis, size in (getattr(m, "ds_axes", None) or {}).items():
            label = name or type(m).__name__
            if axis in asked and asked[axis][0] != size:
                first = asked[axis][1]
                both = (f"layers {first[6:]} and {label}" if first.startswith("layer ")
                        else f"{first} and layer {label}")
                raise ConfigError(f"{both} ask for {axis}={asked[axis][0]} and {axis}={size}; one run has one "
                                  f"size per axis: build them alike")
            asked[axis] = (size, f"layer {label}")
            users.append(m)
    if topology is None:
        topology = built[0][1] if built else Topology(world_size, **{a: s for a, (s, _) in asked.items()})
    if not isinstance(topology, Topology):
        raise ConfigError(f"topology={topology!r} is not a ds_core.comm.Topology; build one with "
                          f"ds_core.comm.Topology(world_size, pipe=..., expert=..., tensor=...)")
    topology.check_world(world_size)
    for name, other in built:
        if other is not topology and not other.same_layout(topology):
            raise ConfigError(f"layer {name} was built with {other!r} but the run uses {topology!r}; build the "
                              f"model with the topology you pass to initialize (topology=)")
    for axis, (size, label) in asked.items():
        if topology.size(axis) != size:
            raise ConfigError(f"{label} needs {axis}={size} but the run's topology has {axis}="
                              f"{topology.size(axis)} ({topology!r}); build the model with that topology "
                              f"(topology=) or pass a topology with {axis}={size}")
    for m in users:
        bind = getattr(m, "use_topology", None)
        if bind is not None:
            bind(topology)
    return topology


def initialize(args=None, model: torch.nn.Module | None = None, optimizer=None, model_parameters=None,
               training_data=None, lr_scheduler=None, mpu=None, dist_init_required: bool | None = None,
               collate_fn=None, config: Any = None, config_params: Any = None, topology: Topology | None = None):
    """Build the engine from a DeepSpeed-compatible config.

    Returns ``(engine, optimizer, dataloader, lr_scheduler)``; ``dataloader`` is ``None`` unless
    ``training_data`` is given. ``topology`` (a :class:`~ds_core.comm.Topology`) lays the ranks out
    over named axes; without it one is built from what the model's layers need (data parallelism over
    every rank by default). The config, the batch triple and the topology are checked before any
    process group is created.
    """
    if model is None:
        raise ConfigError("initialize() needs model=")
    source = _config_source(args, config, config_params)
    world_env = comm.get_world_size() if comm.is_initialized() else int(os.environ.get("WORLD_SIZE", "1"))
    cfg = parse_config(source)
    components = select_components(cfg, model)
    comm.comms_logger.configure(cfg.comms_logger)
    if cfg.seed is not None:
        _seed_everything(cfg.seed)
    if "engine_class" in components:  # a feature with its own training contract (e.g. pipeline)
        cls = components["engine_class"][1]()
        others = {k: v for k, v in components.items() if k != "engine_class"}
        return cls.initialize(args=args, model=model, optimizer=optimizer, model_parameters=model_parameters,
                              training_data=training_data, lr_scheduler=lr_scheduler,
                              collate_fn=collate_fn, config=cfg, dist_init_required=dist_init_required,
                              components=others, topology=topology)
    # Check the topology and the batch triple against the launch's world size before any process group.
    topology = resolve_topology(model, topology, world_env, cfg)
    cfg.resolve_batch(topology.size("data"))
    if dist_init_required is not False and not comm.is_initialized():
        comm.init_distributed()
    comm.watchdog.start()  # also over a process group the caller made
    topology.check_world(comm.get_world_size())

    from .engine import Engine

    engine = Engine(model, cfg, optimizer=optimizer, model_parameters=model_parameters,
                    lr_scheduler=lr_scheduler, topology=topology, components=components)
    loader = None
    if training_data is not None:
        from .data import build_dataloader

        loader = build_dataloader(training_data, engine.train_micro_batch_size_per_gpu(),
                                  engine.dp_world_size, engine.data_rank,
                                  seed=cfg.seed or 0, collate_fn=collate_fn)
    return engine, engine.optimizer, loader, engine.lr_scheduler
