"""What a component is given instead of the engine: narrow, typed, read-only contexts.

- :class:`ModelContext` goes to model transforms (the ``model_wrapper`` component kind, e.g. a
  tensor-parallel plan or compression wrappers): the feature's own config section, the topology, the
  device, the precision and the engine hooks.
- :class:`TrainingContext` goes to the data-parallel strategy's ``prepare``: the (transformed) module,
  its parameter groups, the process groups of every axis its parameters use, the device, the
  precision, how gradients are averaged, how to build the optimizer, the hooks and the strategy's own
  config section.

Nothing in them reaches back into the engine, so a component can be read — and tested — alone.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from .. import comm
from ..errors import CommError, ConfigError, DSError
from ..params import DEFAULT_AXIS, reduce_axis, shard_axis
from .hooks import EngineHooks
from .precision import Precision

__all__ = ["ModelContext", "TrainingContext", "ProcessGroups", "ReduceSettings", "OptimizerFactory"]

COMM_DTYPES = {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass(frozen=True)
class ProcessGroups:
    """The process group of ``data`` and of every other axis the module's parameters are tagged with
    (``ds_core.params``); all ``None`` in a one-process world."""

    topology: Any
    data: Any = None
    axes: Mapping[str, Any] = field(default_factory=dict)

    @classmethod
    def for_module(cls, topology, module: torch.nn.Module) -> ProcessGroups:
        tagged = {reduce_axis(p) for p in module.parameters()} | {shard_axis(p) for p in module.parameters()}
        tagged -= {None, DEFAULT_AXIS}
        multi = comm.get_world_size() > 1
        return cls(topology, topology.group(DEFAULT_AXIS) if multi else None,
                   {a: topology.group(a) if multi else None for a in sorted(tagged)})

    def group(self, axis: str | None):
        """The group of ``axis`` (``data`` for ``None``); an axis no parameter is tagged with is an error."""
        if axis in (None, DEFAULT_AXIS):
            return self.data
        if axis not in self.axes:
            raise CommError(f"parameters are tagged with axis {axis!r} but no process group was made for it "
                            f"(tagged axes: {sorted(self.axes) or 'none'}); tag the parameters before "
                            f"initialize() builds the engine")
        return self.axes[axis]

    def size(self, axis: str | None = None) -> int:
        return comm.get_world_size(self.group(axis))

    def all_axes(self) -> dict[str, Any]:
        """``data`` and every tagged axis -> group."""
        return {DEFAULT_AXIS: self.data, **self.axes}


@dataclass(frozen=True)
class ReduceSettings:
    """How gradients are averaged over the data axis (DeepSpeed's ``prescale_gradients``,
    ``gradient_predivide_factor`` and ``communication_data_type``)."""

    prescale: bool = False
    predivide: float = 1.0
    comm_dtype: torch.dtype | None = None  #: all-reduce a 16-bit copy (half the bytes); None: fp32

    @classmethod
    def from_config(cls, config) -> ReduceSettings:
        return cls(config.prescale_gradients, config.gradient_predivide_factor,
                   COMM_DTYPES[config.communication_data_type] if config.communication_data_type else None)

    @property
    def before(self) -> float:
        """Multiply a gradient by this before it is summed over ranks (1 without prescaling)."""
        return 1.0 / self.predivide if self.prescale else 1.0

    def after(self, world: int) -> float:
        """Multiply the sum by this: together with :attr:`before`, the mean over the ``world`` data ranks
        (the gradient of the mean loss of the global batch, whichever group summed it)."""
        return self.predivide / world if self.prescale else 1.0 / world


class OptimizerFactory:
    """Builds the torch optimizer a strategy steps, over the parameter groups the strategy made
    (fp32 masters, partitions, or the model's own parameters).

    From the client's ``optimizer=`` when given — the same object when the groups are its own
    parameters, else a new one of its class with its hyper-parameters; a callable is called with the
    groups — otherwise from the config's ``optimizer`` section (``ds_core.optim.build_optimizer``).
    """

    def __init__(self, client, config_section) -> None:
        if client is not None and not isinstance(client, torch.optim.Optimizer) and not callable(client):
            raise ConfigError(f"optimizer {client!r} is neither a torch.optim.Optimizer nor a callable taking "
                              f"parameter groups")
        if client is None and config_section is None:
            raise DSError("no optimizer: pass optimizer= to initialize() or add an 'optimizer' section to the "
                          "config")
        self.client = client
        self.section = config_section

    def __call__(self, groups: list[dict], device_type: str) -> torch.optim.Optimizer:
        client = self.client
        if client is None:
            from ..optim.optimizers import build_optimizer

            return build_optimizer(self.section, groups, device_type=device_type)
        if isinstance(client, torch.optim.Optimizer):
            if _same_params(groups, client.param_groups):
                return client
            return type(client)(groups, **_constructor_defaults(client))
        return client(groups)


def _same_params(groups: list[dict], other: list[dict]) -> bool:
    return len(groups) == len(other) and all(
        [id(p) for p in a["params"]] == [id(p) for p in b["params"]] for a, b in zip(groups, other))


def _constructor_defaults(client: torch.optim.Optimizer) -> dict:
    """``client.defaults`` restricted to what its constructor takes (torch's AdamW records
    ``decoupled_weight_decay`` in its defaults but does not accept it)."""
    params = inspect.signature(type(client).__init__).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return dict(client.defaults)
    return {k: v for k, v in client.defaults.items() if k in params}


@dataclass(frozen=True)
class ModelContext:
    """Given to model transforms (``model_wrapper`` factories): ``factory(context, module) -> module``."""

    section: Any  #: the feature's own config section (parsed), or None
    topology: Any  #: the run's :class:`~ds_core.comm.Topology`
    device: torch.device
    precision: Precision
    hooks: EngineHooks
    rank: int
    world_size: int
    #: the ``layout`` name of the data-parallel strategy that will take the parameters ("replicated",
    #: "zero", "zero-3", ...), for transforms that compose only with some strategies
    strategy: str = "replicated"
    #: the config's ``seq_parallel_communication_data_type`` (None: fp32), for a transform that splits
    #: sequences over the topology's ``sequence`` axis
    sequence_comm_dtype: torch.dtype | None = None
    #: optimizer steps taken so far, read live (restored by ``load_checkpoint``): schedules follow it
    global_steps: Callable[[], int] = field(default=lambda: 0)


@dataclass(frozen=True)
class TrainingContext:
    """Given to :meth:`DataParallelStrategy.prepare` (see ``strategy.py``)."""

    module: torch.nn.Module  #: the model after transforms, on ``device`` in ``precision.dtype``
    param_groups: tuple[dict, ...]  #: trainable parameters with their hyper-parameters
    groups: ProcessGroups
    device: torch.device
    precision: Precision
    reduce: ReduceSettings
    make_optimizer: OptimizerFactory
    hooks: EngineHooks
    accelerator: Any
    rank: int  #: global rank
    world_size: int
    section: Any = None  #: the strategy's own config section (e.g. ``zero_optimization``), or None
    aio: Any = None  #: the ``aio`` section, for strategies that swap to NVMe

    @property
    def topology(self):
        return self.groups.topology

    @property
    def params(self) -> list[torch.nn.Parameter]:
        return [p for g in self.param_groups for p in g["params"]]
